"""Gather ``(N, K, K)`` cutouts from an exposure's planes, on whatever device holds them.

One integer-array indexing step per plane for every object: cutout pixel ``[n, j, i]`` is plane pixel
``(row, column) = (iy[n] - h + j, ix[n] - h + i)`` with ``h = K // 2``. Pixels beyond the
planes' edges are padding: the image and variance there are NaN, the mask holds the
caller's NO_DATA value and ``inside`` is False. Shapes depend only on ``N`` and ``K``, and
nothing is read back from the arrays, so on a GPU the gather is a few launches with no
synchronisation.
"""

import math
from typing import Any, NamedTuple

from array_api_compat import array_namespace, device

Array = Any


class Cutouts(NamedTuple):
    """``(N, K, K)`` stacks, in the namespace and on the device of the planes.

    Attributes
    ----------
    image, variance : float
        The planes' values (their dtype); NaN beyond the edge.
    mask : int
        The mask plane's bits; the NO_DATA value beyond the edge.
    inside : bool
        The pixel lies on the planes.
    """

    image: Array
    variance: Array
    mask: Array
    inside: Array


def gather_cutouts(image: Array, variance: Array, mask: Array, ix: Array, iy: Array, size: int, no_data: int) -> Cutouts:
    """Cutouts of side ``size`` centred on pixels ``(ix, iy)`` of ``(H, W)`` planes.

    Parameters
    ----------
    image, variance : (H, W) float arrays
        Image and variance planes (or a band of rows of them: then ``iy`` counts rows from
        the band's first row, and only rows beyond the *image's* edge may be missing from
        the band).
    mask : (H, W) int array
        Mask plane.
    ix, iy : (N,) int64 arrays
        Column and row of each cutout's central pixel, 0-based plane pixels (the pixel
        nearest the object: ``floor(x + 0.5)``).
    size : int
        Odd cutout side K.
    no_data : int
        Mask value of padding (the exposure's NO_DATA bit, shifted).

    Returns
    -------
    Cutouts
        ``(N, K, K)`` image, variance, mask and inside, same namespace and device.
    """
    if size % 2 != 1:
        raise ValueError(f"gather_cutouts: size must be odd, got {size}")
    xp = array_namespace(image, variance, mask, ix, iy)
    height, width = image.shape
    h = size // 2
    offsets = xp.arange(-h, h + 1, dtype=xp.int64, device=device(ix))
    rows = iy[:, None] + offsets[None, :]
    cols = ix[:, None] + offsets[None, :]
    inside = (((rows >= 0) & (rows < height))[:, :, None]) & (((cols >= 0) & (cols < width))[:, None, :])
    r = xp.clip(rows, 0, height - 1)[:, :, None]
    c = xp.clip(cols, 0, width - 1)[:, None, :]

    def take(plane: Array, fill: float | int) -> Array:
        return xp.where(inside, plane[r, c], xp.asarray(fill, dtype=plane.dtype, device=device(plane)))

    return Cutouts(take(image, math.nan), take(variance, math.nan), take(mask, no_data), inside)
