"""Stage pixel cutouts of many objects as ``(N, K, K)`` stacks, in memory-bounded batches.

Objects are sorted by row, so each batch covers a band of image rows: the band is read
once (memory-mapped rows, or a tile-compressed section), padded by ``h = K // 2`` pixels
on every side with NO_DATA, and every object's window is gathered from it in one
vectorised indexing step (no Python loop over objects).

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
    """Read the rows the objects need and gather their windows from the padded band."""
    band_lo, band_hi = int(iy.min()) - h, int(iy.max()) + h + 1  # rows the windows span
    read_lo, read_hi = max(band_lo, 0), min(band_hi, reader.height)
    width = reader.width
    cols_lo, cols_hi = int(ix.min()) - h, int(ix.max()) + h + 1
    shape = (band_hi - band_lo, cols_hi - cols_lo)
    image = np.full(shape, np.nan, dtype=np.float32)
    variance = np.full(shape, np.nan, dtype=np.float32)
    mask = np.full(shape, 1 << no_data_bit, dtype=np.int32)
    inside = np.zeros(shape, dtype=bool)
    if read_lo < read_hi:
        c_lo, c_hi = max(cols_lo, 0), min(cols_hi, width)
        if c_lo < c_hi:
            planes = reader.read_rows(read_lo, read_hi)
            rows = slice(read_lo - band_lo, read_hi - band_lo)
            cols = slice(c_lo - cols_lo, c_hi - cols_lo)
            for padded, plane in zip((image, variance, mask), planes):
                padded[rows, cols] = plane[:, c_lo:c_hi]
            inside[rows, cols] = True
    size = 2 * h + 1
    row0, col0 = iy - h - band_lo, ix - h - cols_lo  # window corners in the padded band

    def gather(padded: np.ndarray) -> np.ndarray:
        return sliding_window_view(padded, (size, size))[row0, col0]

    return CutoutStack(
        index=index,
        image=gather(image),
        variance=gather(variance),
        mask=gather(mask),
        inside=gather(inside),
        cx=h + x[index] - ix,
        cy=h + y[index] - iy,
    )
