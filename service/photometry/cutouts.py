"""Plan and stage pixel cutouts of many objects as ``(N, K, K)`` stacks, in bounded batches.

Objects are sorted by row and cut into batches (:class:`Windows`: which objects, their
central pixels and cutout coordinates). Pixels then reach the kernels in one of two ways:

* **host staging** (the CPU): each batch covers a band of image rows, read once (a
  memory-mapped view, or a tile-compressed section); windows wholly on the image are
  copied from it row by row (compiled; a FITS file's big-endian rows swapped on the way),
  those crossing the edge sliced and padded as
  :func:`~forcedphot.kernels.cutouts.gather_cutouts` pads them on a device;
* **device-resident planes** (:class:`ResidentPlanes`): the exposure's three planes are
  copied to the device once and each batch is gathered there by
  :func:`~forcedphot.kernels.cutouts.gather_cutouts` from the central pixels alone.

Cutout convention: for an object at local position ``(x, y)`` the cutout is centred on
the nearest pixel ``(floor(x + 0.5), floor(y + 0.5))``; cutout pixel ``[n, j, i]`` is
image pixel ``(floor(x + 0.5) - h + i, floor(y + 0.5) - h + j)`` and the object sits at
cutout coordinates ``(cx, cy) = (h + x - floor(x + 0.5), h + y - floor(y + 0.5))``.
Beyond the image edge the image and variance are NaN, the mask holds the NO_DATA bit and
``inside`` is False.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
import threading
from typing import Any, Protocol

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from forcedphot.kernels.cutouts import Cutouts, gather_cutouts
from forcedphot.kernels.fused_cpu import copies_in_place, stage_windows
from forcedphot.photometry.backend import Backend
from forcedphot.photometry.lsst_fits import AFW_DEFAULT_MASK_PLANES

# Bytes a staged pixel costs: image + variance (float32), mask (int32), inside (bool),
# plus the float64 working arrays the kernels create for it (about ten).
BYTES_PER_STAGED_PIXEL = 4 + 4 + 4 + 1 + 10 * 8
BYTES_PER_BAND_PIXEL = 13  # a band of rows read on the host: the three planes and padding
BYTES_PER_PLANE_PIXEL = 4 + 4 + 4  # an exposure's float32 image, float32 variance, int32 mask
# Bytes an object read in place costs the fused CPU kernels beyond its PSF stamp (float64
# pixels): its results (~90 values) and positions.
BYTES_PER_IN_PLACE_OBJECT = 1024
# At most this many objects in a batch read in place, whatever the memory allows: progress,
# deadlines and cancellation are looked at between batches, and this many take ~0.1-0.3 s
# on a CPU core (a job whose batch outlives its runner's stale time is taken for stuck)
MAX_IN_PLACE_OBJECTS = 4096
FEW_WINDOWS = 8  # up to this many windows are cut out one slice at a time


class RowReader(Protocol):
    """What staging needs from an exposure (and, where it has one, ``fully_local``: every
    row is on this machine, so the rows a batch needs are not worked out for it)."""

    width: int
    height: int

    def read_rows(self, y_start: int, y_stop: int, needed: Sequence[tuple[int, int]] | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class Windows:
    """One batch of cutout windows, host arrays."""

    index: np.ndarray  # (n,) positions of these objects in the caller's arrays
    ix: np.ndarray  # (n,) int64 central pixel column, local pixels
    iy: np.ndarray  # (n,) int64 central pixel row
    cx: np.ndarray  # (n,) float64 cutout coordinates of the object
    cy: np.ndarray
    size: int  # odd cutout side K

    def __len__(self) -> int:
        return len(self.index)


@dataclass(frozen=True)
class ResidentPlanes:
    """An exposure's image, variance and mask planes on a backend's device, and the mask
    value that pads cutouts beyond its edge."""

    image: Any  # (H, W) float32
    variance: Any  # (H, W) float32
    mask: Any  # (H, W) int32
    no_data: int
    nbytes: int  # device bytes the three planes take

    @property
    def planes(self) -> tuple[Any, Any, Any]:
        return self.image, self.variance, self.mask

    def gather(self, ix: Any, iy: Any, size: int) -> Cutouts:
        """Cutouts of side ``size`` at central pixels ``(ix, iy)`` (device int64 arrays)."""
        return gather_cutouts(*self.planes, ix, iy, size, self.no_data)


def no_data_bit(mask_planes: dict[str, int]) -> int:
    """The bit that marks padding beyond the image edge: the exposure's NO_DATA plane,
    else afw's default."""
    return mask_planes.get("NO_DATA", AFW_DEFAULT_MASK_PLANES["NO_DATA"])


def upload_planes(reader: RowReader, mask_planes: dict[str, int], backend: Backend) -> ResidentPlanes:
    """Read every row of an exposure and copy its three planes to ``backend`` (three uploads)."""
    image, variance, mask = reader.read_rows(0, reader.height)
    host = [np.ascontiguousarray(plane, dtype=dtype)  # native byte order, as devices need
            for plane, dtype in zip((image, variance, mask), (np.float32, np.float32, np.int32))]
    return ResidentPlanes(*(backend.to_device(plane) for plane in host), no_data=1 << no_data_bit(mask_planes),
                          nbytes=sum(plane.nbytes for plane in host))


class DeviceCopies:
    """An exposure's planes on each backend's device, copied once however many threads ask."""

    def __init__(self) -> None:
        self._planes: dict[str, ResidentPlanes] = {}
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Device bytes held."""
        return sum(planes.nbytes for planes in self._planes.values())

    def get(self, reader: RowReader, mask_planes: dict[str, int], backend: Backend, upload: bool) -> ResidentPlanes | None:
        """The planes of ``reader`` on ``backend``'s device: copied at the first call with
        ``upload``; None when they are not there and ``upload`` is False."""
        with self._lock:
            if backend.name not in self._planes and upload:
                self._planes[backend.name] = upload_planes(reader, mask_planes, backend)
            return self._planes.get(backend.name)

    def clear(self) -> None:
        """Drop every device copy."""
        with self._lock:
            self._planes.clear()


def objects_per_batch(size: int, batch_bytes: int, pixel_bytes: int = BYTES_PER_STAGED_PIXEL) -> int:
    """How many ``size`` x ``size`` cutouts fit in ``batch_bytes`` at ``pixel_bytes`` a cutout
    pixel (at least one)."""
    return max(1, int(batch_bytes) // (size * size * pixel_bytes))


def on_image(ix: np.ndarray, iy: np.ndarray, h: int, width: int, height: int) -> np.ndarray:
    """(n,) bool: the windows of half-side ``h`` centred on pixels ``(ix, iy)`` lie wholly on
    a ``width`` x ``height`` image."""
    return (ix - h >= 0) & (ix + h < width) & (iy - h >= 0) & (iy + h < height)


def plan_windows(x: np.ndarray, y: np.ndarray, size: int, *, batch_bytes: int, band_width: int | None = None,
                 pixel_bytes: int = BYTES_PER_STAGED_PIXEL, in_place: int | None = None) -> Iterator[Windows]:
    """Batches of windows of odd ``size`` for objects at local positions ``(x, y)``.

    All positions must be finite. Objects are visited in order of increasing row.
    ``batch_bytes`` bounds each batch's stack (``pixel_bytes`` per cutout pixel: staged
    cutouts and the array-API kernels' work, :data:`BYTES_PER_STAGED_PIXEL`) and, when the rows are read on the host (``band_width``: the image width),
    the band of rows read for it (:data:`BYTES_PER_BAND_PIXEL` per band pixel); one
    object always fits. ``in_place`` = bytes an object costs: the windows are read in place
    from a band that costs nothing (the fused CPU kernels on a memory-mapped file or an
    exposure in memory; a window crossing the image's edge is padded in the kernel's
    per-thread copy), so ``batch_bytes`` bounds only the objects' own bytes; such a batch
    holds at most :data:`MAX_IN_PLACE_OBJECTS`.
    """
    if size % 2 != 1:
        raise ValueError(f"cutout size must be odd, got {size}")
    h = size // 2
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ix = np.floor(x + 0.5).astype(np.int64)
    iy = np.floor(y + 0.5).astype(np.int64)
    order = np.argsort(iy, kind="stable")
    sorted_rows = iy[order]
    if in_place is None:
        step = objects_per_batch(size, batch_bytes, pixel_bytes)
    else:
        step = min(max(1, int(batch_bytes) // in_place), MAX_IN_PLACE_OBJECTS)
    band_rows = None if band_width is None else max(1, int(batch_bytes) // (BYTES_PER_BAND_PIXEL * (band_width + 2 * h)) - 2 * h)
    start = 0
    while start < len(order):
        stop = min(start + step, len(order))
        if band_rows is not None:
            stop = min(stop, int(np.searchsorted(sorted_rows, sorted_rows[start] + band_rows, side="left")))
        stop = max(stop, start + 1)
        index = order[start:stop]
        yield Windows(index, ix[index], iy[index], h + x[index] - ix[index], h + y[index] - iy[index], size)
        start = stop


@dataclass(frozen=True)
class Band:
    """The rows of an exposure's planes that one batch of windows spans, on the host."""

    image: np.ndarray  # (rows, W) float32
    variance: np.ndarray  # (rows, W) float32
    mask: np.ndarray  # (rows, W) int32
    row0: int  # the exposure row of the band's first row
    height: int  # the exposure's height (rows beyond it lie off the image)
    no_data_bit: int

    def interior(self, windows: Windows) -> np.ndarray:
        """(n,) bool: the window lies wholly on the image."""
        return on_image(windows.ix, windows.iy, windows.size // 2, self.image.shape[1], self.height)

    def cutouts(self, windows: Windows) -> Cutouts:
        """Host cutouts of ``windows``: those wholly on the image copied straight from the
        band (a memory-mapped view where the file allows, so only their pages are touched),
        those that cross an edge sliced and padded (see the module docstring)."""
        return _cutouts(self, windows)


def read_band(reader: RowReader, windows: Windows, no_data_bit: int) -> Band:
    """The band of rows the windows of one batch (from :func:`plan_windows` with ``band_width``)
    span; a reader not ``fully_local`` is told which of its rows the windows touch (a
    partial copy of a remote file fetches only those)."""
    h = windows.size // 2
    read_lo, read_hi = max(int(windows.iy.min()) - h, 0), min(int(windows.iy.max()) + h + 1, reader.height)
    needed = None if getattr(reader, "fully_local", False) else window_rows(windows.iy - h, windows.iy + h + 1, read_lo, read_hi)
    return Band(*reader.read_rows(read_lo, read_hi, needed), row0=read_lo, height=reader.height, no_data_bit=no_data_bit)


def window_rows(starts: np.ndarray, stops: np.ndarray, low: int, high: int) -> list[tuple[int, int]]:
    """The union of the row ranges ``[starts, stops)`` clipped to ``[low, high)``, as
    disjoint sorted ranges."""
    starts, stops = np.clip(starts, low, high), np.clip(stops, low, high)
    order = np.argsort(starts, kind="stable")
    starts, reach = starts[order], np.maximum.accumulate(stops[order])
    gaps = np.flatnonzero(starts[1:] > reach[:-1]) + 1
    firsts, lasts = np.concatenate([[0], gaps]), np.concatenate([gaps - 1, [len(starts) - 1]])
    return [(int(a), int(b)) for a, b in zip(starts[firsts], reach[lasts]) if b > a]


def stage_cutouts(reader: RowReader, windows: Windows, no_data_bit: int) -> Cutouts:
    """Host cutouts of one batch (from :func:`plan_windows` with ``band_width``), gathered
    from the band of rows they span (see :meth:`Band.cutouts`)."""
    return read_band(reader, windows, no_data_bit).cutouts(windows)


def _cutouts(band: Band, windows: Windows) -> Cutouts:
    size, h = windows.size, windows.size // 2
    ix, iy = windows.ix, windows.iy
    read_lo, no_data_bit = band.row0, band.no_data_bit
    planes = (band.image, band.variance, band.mask)
    n = len(windows)
    image = np.empty((n, size, size), np.float32)
    variance = np.empty((n, size, size), np.float32)
    mask = np.empty((n, size, size), np.int32)
    inside = np.ones((n, size, size), bool)
    stacks = (image, variance, mask)

    interior = band.interior(windows)
    inner = np.flatnonzero(interior)
    sliced = np.flatnonzero(~interior)  # windows taken by slicing, below
    if copies_in_place(*planes):
        stage_windows(*planes, iy[inner] - h - read_lo, ix[inner] - h, inner, *stacks)
    elif inner.size > FEW_WINDOWS:
        for stack, plane in zip(stacks, planes):
            stack[inner] = sliding_window_view(plane, (size, size))[iy[inner] - h - read_lo, ix[inner] - h]
    else:  # a few windows: slices cost less than the view's set-up
        sliced = np.arange(n)
    # each window's part on the image sliced, the rest (of those crossing the edge) padded
    # as gather_cutouts pads on a device (on the host 3-4x faster than gathering them, at 16
    # windows as at 1,000); the band holds every image row they touch: rows it lacks lie
    # beyond the image
    fills = (np.nan, np.nan, 1 << no_data_bit)
    for i in sliced:
        top, left = iy[i] - h - read_lo, ix[i] - h
        rows = slice(max(top, 0), min(top + size, band.image.shape[0]))
        columns = slice(max(left, 0), min(left + size, band.image.shape[1]))
        within = (i, slice(rows.start - top, rows.stop - top), slice(columns.start - left, columns.stop - left))
        for stack, plane, fill in zip(stacks, planes, fills):
            stack[i] = fill
            stack[within] = plane[rows, columns]
        inside[i] = False
        inside[within] = True
    return Cutouts(image, variance, mask, inside)
