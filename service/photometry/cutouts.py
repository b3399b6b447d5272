"""Stage pixel cutouts of many objects as ``(N, K, K)`` stacks, in memory-bounded batches.

Objects are sorted by row, so each batch covers a band of image rows: the band is read
once (a memory-mapped view, or a tile-compressed section) and every object's window is
gathered from it in one vectorised indexing step (no Python loop over objects); windows
crossing the image edge are padded with NO_DATA.

Cutout convention: for an object at local position ``(x, y)`` the cutout is centred on
the nearest pixel ``(floor(x + 0.5), floor(y + 0.5))``; cutout pixel ``[n, j, i]`` is
image pixel ``(floor(x + 0.5) - h + i, floor(y + 0.5) - h + j)`` and the object sits at
cutout coordinates ``(cx, cy) = (h + x - floor(x + 0.5), h + y - floor(y + 0.5))``.
Beyond the image edge the image and variance are NaN, the mask holds the NO_DATA bit and
``inside`` is False.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from forcedphot.photometry.lsst_fits import AFW_DEFAULT_MASK_PLANES

# Bytes a staged pixel costs: image + variance (float32), mask (int32), inside (bool),
# plus the float64 working arrays the kernels create for it (about ten).
BYTES_PER_STAGED_PIXEL = 4 + 4 + 4 + 1 + 10 * 8


class RowReader(Protocol):
    """What staging needs from an exposure."""

    width: int
    height: int

    def read_rows(self, y_start: int, y_stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class CutoutStack:
    """One batch of cutouts; arrays are NumPy on the host."""

    index: np.ndarray  # (n,) positions of these objects in the caller's arrays
    image: np.ndarray  # (n, K, K) float32
    variance: np.ndarray  # (n, K, K) float32
    mask: np.ndarray  # (n, K, K) int32
    inside: np.ndarray  # (n, K, K) bool: pixel lies on the image
    cx: np.ndarray  # (n,) float64 cutout coordinates of the object
    cy: np.ndarray  # (n,) float64


def no_data_bit(mask_planes: dict[str, int]) -> int:
    """The bit that marks padding beyond the image edge: the exposure's NO_DATA plane,
    else afw's default."""
    return mask_planes.get("NO_DATA", AFW_DEFAULT_MASK_PLANES["NO_DATA"])


def objects_per_batch(size: int, batch_bytes: int) -> int:
    """How many ``size`` x ``size`` cutouts fit in ``batch_bytes`` (at least one)."""
    return max(1, int(batch_bytes) // (size * size * BYTES_PER_STAGED_PIXEL))


def stage_cutouts(reader: RowReader, x: np.ndarray, y: np.ndarray, size: int, *, batch_bytes: int, no_data_bit: int) -> Iterator[CutoutStack]:
    """Yield cutout stacks of odd ``size`` for objects at local positions ``(x, y)``.

    All positions must be finite. Objects are visited in order of increasing row; each
    stack's ``index`` says which input objects it holds. ``batch_bytes`` bounds both the
    stack (:data:`BYTES_PER_STAGED_PIXEL` per cutout pixel) and the band of rows read for
    it (13 bytes per band pixel), except that one object always fits.
    """
    if size % 2 != 1:
        raise ValueError(f"cutout size must be odd, got {size}")
    h = size // 2
    ix = np.floor(np.asarray(x, dtype=np.float64) + 0.5).astype(np.int64)
    iy = np.floor(np.asarray(y, dtype=np.float64) + 0.5).astype(np.int64)
    order = np.argsort(iy, kind="stable")
    sorted_rows = iy[order]
    step = objects_per_batch(size, batch_bytes)
    band_rows = max(1, int(batch_bytes) // (13 * (reader.width + 2 * h)) - 2 * h)
    start = 0
    while start < len(order):
        stop = min(start + step, int(np.searchsorted(sorted_rows, sorted_rows[start] + band_rows, side="left")))
        stop = max(stop, start + 1)
        index = order[start:stop]
        yield _stage_band(reader, index, ix[index], iy[index], x, y, h, no_data_bit)
        start = stop


def _stage_band(reader: RowReader, index, ix, iy, x, y, h: int, no_data_bit: int) -> CutoutStack:
    """Gather the objects' windows from the band of rows they span.

    Windows wholly on the image are taken straight from the band (a memory-mapped view
    where the file allows, so only their pages are touched); the few that cross an edge
    are gathered with clipped indices and padded with NO_DATA.
    """
    size = 2 * h + 1
    height, width = reader.height, reader.width
    read_lo, read_hi = max(int(iy.min()) - h, 0), min(int(iy.max()) + h + 1, height)
    planes = reader.read_rows(read_lo, read_hi)
    n = len(index)
    image = np.empty((n, size, size), np.float32)
    variance = np.empty((n, size, size), np.float32)
    mask = np.empty((n, size, size), np.int32)
    inside = np.ones((n, size, size), bool)
    stacks = (image, variance, mask)

    interior = (ix - h >= 0) & (ix + h < width) & (iy - h >= 0) & (iy + h < height)
    inner = np.flatnonzero(interior)
    if inner.size:
        for stack, plane in zip(stacks, planes):
            stack[inner] = sliding_window_view(plane, (size, size))[iy[inner] - h - read_lo, ix[inner] - h]

    edge = np.flatnonzero(~interior)
    if edge.size:
        offsets = np.arange(size) - h
        rows, cols = iy[edge, None] + offsets, ix[edge, None] + offsets
        on = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
        r = (np.clip(rows, 0, height - 1) - read_lo)[:, :, None]
        c = np.clip(cols, 0, width - 1)[:, None, :]
        fills = (np.float32(np.nan), np.float32(np.nan), np.int32(1 << no_data_bit))
        for stack, plane, fill in zip(stacks, planes, fills):
            stack[edge] = np.where(on, plane[r, c], fill)
        inside[edge] = on

    return CutoutStack(
        index=index,
        image=image,
        variance=variance,
        mask=mask,
        inside=inside,
        cx=h + x[index] - ix,
        cy=h + y[index] - iy,
    )
