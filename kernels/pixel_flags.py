"""Mask-plane flags in the footprint and the central 3x3 box, as LSST ``base_PixelFlags``.

Reference: lsst/meas_base ``src/PixelFlags.cc`` (``PixelFlagsAlgorithm::measure``) and
``python/lsst/meas/base/forcedMeasurement.py`` (``_attachPsfShapeFootprints``), read for
this module.

Footprint
---------
Forced measurement from a DataFrame builds each footprint from the PSF: the ellipse of
the PSF second moments at the object's position, scaled by ``psfFootprintScaling = 3``,
turned into pixels with ``SpanSet::fromShape`` and clipped to the image bbox. For a round
PSF that is the disc of radius ``footprint_radius = 3 sigma`` with afw's rim rule
(:func:`~forcedphot.kernels.local_background.disc_membership`: centres at distance
``<= r``, none on a row tangent to the circle). The footprint's peak, the nearest pixel
``(floor(cx + 0.5), floor(cy + 0.5))``, is always counted here; LSST records it as a peak
only, which makes a difference only for ``r < 0.71`` px. Pixels with ``inside`` False
(padding beyond the image edge) are never looked at: that is the clip to the image.

Flags, for each plane ``p`` with bit ``b``
----------------------------------------
* ``p``: bit ``b`` set in any footprint pixel (LSST ``_anyBits``).
* ``pCenter``: bit set in any pixel of the 3x3 box centred on the nearest pixel
  (lower-left ``(floor(cx + 0.5) - 1, floor(cy + 0.5) - 1)``, afw ``positionToIndex``),
  clipped to the image.
* ``pCenterAll``: bit set in every pixel of that clipped box (LSST ``_allBits``). afw
  starts ``_allBits`` at all-ones, so when the clipped box is empty (the centre lies more
  than 1.5 px off the image) every ``CenterAll`` flag is True; kept here (an ``all`` over no
  pixels).
* ``nodata`` is its own flag only: since November 2024 LSST no longer sets ``edge`` for
  NO_DATA pixels in the footprint.

Not here: ``offimage`` (centre outside ``Box2D(bbox)``), which also sets edge, edgeCenter
and edgeCenterAll, is the caller's; so is the general ``flag`` for a non-finite centre
(LSST sets the footprint flags and skips the centre ones; here a NaN centre finds no
pixel: any-flags False, CenterAll True).

Work
----
Only the window of stamp rows and columns that holds some object's footprint or box is
read (its bounds come from the positions and radii), so the cost scales with the
footprint area, not with ``K^2``.
"""

import math
from math import ceil, floor
from typing import Any, NamedTuple

from array_api_compat import array_namespace, device

from .local_background import disc_membership

Array = Any


class PixelFlags(NamedTuple):
    """Results of :func:`pixel_flags`: ``(N, P)`` bool arrays, column ``p`` for the
    ``p``-th entry of the ``planes`` argument.

    Attributes
    ----------
    any : bool
        The plane's bit is set in some footprint pixel (LSST ``pixelFlags_<name>``).
    center : bool
        Set in some pixel of the clipped central 3x3 box (``<name>Center``).
    center_all : bool
        Set in every pixel of that box (``<name>CenterAll``).
    """

    any: Array
    center: Array
    center_all: Array

    def as_dict(self, names: list[str]) -> dict[str, Array]:
        """``{name: any, name + "Center": center, name + "CenterAll": center_all}`` for
        the planes ``names`` (in the order they were given to :func:`pixel_flags`)."""
        out: dict[str, Array] = {}
        for p, name in enumerate(names):
            out[name], out[name + "Center"], out[name + "CenterAll"] = self.any[:, p], self.center[:, p], self.center_all[:, p]
        return out


def _window(xp: Any, c: Array, r: Array, k: int) -> tuple[int, int]:
    """Half-open range of stamp indices along one axis that holds every object's footprint
    (``c +- r``) and 3x3 box, clipped to ``[0, k)``; empty if no object is finite."""
    near = xp.floor(c + 0.5)
    r = xp.where(xp.isfinite(r), r, 0.0)
    lo = xp.minimum(near - 1.0, xp.floor(c - r))
    hi = xp.maximum(near + 1.0, xp.ceil(c + r))
    ok = xp.isfinite(lo) & xp.isfinite(hi)
    if not bool(xp.any(ok)):
        return 0, 0
    start = min(max(floor(float(xp.min(xp.where(ok, lo, math.inf)))), 0), k)
    stop = max(min(ceil(float(xp.max(xp.where(ok, hi, -math.inf)))) + 1, k), start)
    return start, stop


def footprint_window(cx: Array, cy: Array, footprint_radius: Array, k: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((x0, x1), (y0, y1))``: the part of a ``(K, K)`` stack that :func:`pixel_flags`
    needs. Reads the arrays: call it on the host's copies and pass it as ``window``."""
    xp = array_namespace(cx, cy, footprint_radius)
    r = xp.astype(footprint_radius, xp.float64)
    return _window(xp, xp.astype(cx, xp.float64), r, k), _window(xp, xp.astype(cy, xp.float64), r, k)


def pixel_flags(
    mask: Array,
    inside: Array,
    cx: Array,
    cy: Array,
    footprint_radius: Array,
    planes: dict[str, int | None],
    window: tuple[tuple[int, int], tuple[int, int]] | None = None,
) -> PixelFlags:
    """LSST pixel flags from a stack of mask cutouts.

    Parameters
    ----------
    mask : (N, K, K) integer array
        Mask bits (afw MASK plane values).
    inside : (N, K, K) bool array
        The pixel lies on the image (padding beyond the edge is False).
    cx, cy : (N,) float arrays
        Object position in stamp pixel coordinates (centre of pixel ``[j, i]`` at ``(i, j)``).
    footprint_radius : (N,) float array
        Footprint radius, px (``3 sigma`` for a PSF footprint); a non-finite radius leaves
        the peak pixel only.
    planes : dict of str to int or None
        Flag name -> bit number (0..30), e.g. ``{"edge": 4, "nodata": 8, ...}``; None for a
        plane the mask does not define (its three flags are never set).
    window : ((x0, x1), (y0, y1)), optional
        :func:`footprint_window` of the positions, computed on the host; without it the
        kernel reads it from the arrays (scalar reads: a synchronisation on a GPU).

    Returns
    -------
    PixelFlags
        ``(N, P)`` bool arrays, one column per entry of ``planes`` in its order (see the
        module docstring for their exact meaning; :meth:`PixelFlags.as_dict` names them).
    """
    xp = array_namespace(mask, inside, cx, cy, footprint_radius)
    if mask.ndim != 3 or mask.shape[1] != mask.shape[2] or inside.shape != mask.shape:
        raise ValueError(
            f"pixel_flags: mask and inside must be (N, K, K) alike, got {mask.shape}, {inside.shape}"
        )
    if not xp.isdtype(mask.dtype, "integral"):
        raise ValueError(f"pixel_flags: mask must hold integers, got {mask.dtype}")
    for name, bit in planes.items():
        if bit is not None and not 0 <= int(bit) <= 30:
            raise ValueError(f"pixel_flags: bit for plane {name!r} must be in 0..30, got {bit}")
    k = mask.shape[1]
    cx = xp.astype(cx, xp.float64)
    cy = xp.astype(cy, xp.float64)
    r = xp.astype(footprint_radius, xp.float64)

    (x0, x1), (y0, y1) = footprint_window(cx, cy, r, k) if window is None else window
    sub = mask[:, y0:y1, x0:x1]
    on_image = inside[:, y0:y1, x0:x1]
    xs = xp.arange(x0, x1, dtype=xp.float64, device=device(cx))[None, None, :]
    ys = xp.arange(y0, y1, dtype=xp.float64, device=device(cx))[None, :, None]
    ccx, ccy, rr = cx[:, None, None], cy[:, None, None], r[:, None, None]
    near_x, near_y = xp.floor(ccx + 0.5), xp.floor(ccy + 0.5)

    dy2 = (ys - ccy) ** 2
    footprint = disc_membership((xs - ccx) ** 2 + dy2, dy2, rr * rr)
    footprint = (footprint | ((xs == near_x) & (ys == near_y))) & on_image
    box = (xp.abs(xs - near_x) <= 1.0) & (xp.abs(ys - near_y) <= 1.0) & on_image

    names = list(planes)
    if not names:
        none = xp.zeros((mask.shape[0], 0), dtype=xp.bool, device=device(mask))
        return PixelFlags(none, none, none)
    any_, center, center_all = [], [], []
    for bit in planes.values():
        if bit is None:
            never = xp.zeros((mask.shape[0],), dtype=xp.bool, device=device(mask))
            any_.append(never)
            center.append(never)
            center_all.append(never)
            continue
        has_bit = (sub & (1 << int(bit))) != 0
        any_.append(xp.any(footprint & has_bit, axis=(1, 2)))
        center.append(xp.any(box & has_bit, axis=(1, 2)))
        center_all.append(~xp.any(box & ~has_bit, axis=(1, 2)))
    return PixelFlags(xp.stack(any_, axis=1), xp.stack(center, axis=1), xp.stack(center_all, axis=1))
