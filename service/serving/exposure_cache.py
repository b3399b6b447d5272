"""An LRU cache of exposures held in memory, bounded in bytes, with single-flight loading.

An entry is the exposure's metadata plus its image, variance and mask planes read once
into memory (12 bytes per pixel) and, when measurements run on a device, copied once to
it (12 more). Concurrent requests for one file wait for a single
load. Entries are keyed by the file's real path, size, mtime and inode, so a file that
is replaced is read again. An exposure larger than the whole cache is never stored: each
request then reads it memory-mapped and closes it afterwards.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
import json
import os
from pathlib import Path
import threading
from typing import Any

import numpy as np

from forcedphot.photometry.backend import Backend
from forcedphot.photometry.cutouts import BYTES_PER_PLANE_PIXEL, DeviceCopies, ResidentPlanes
from forcedphot.photometry.exposure import DEFAULT_LIMITS, Exposure, ExposureError, ExposureLimits, open_exposure
from forcedphot.photometry.exposure_summary import open_summarized

BYTES_PER_PIXEL = BYTES_PER_PLANE_PIXEL  # float32 image, float32 variance, int32 mask


class InMemoryExposure:
    """An :class:`~forcedphot.photometry.exposure.Exposure` whose planes are in memory (read-only).

    Every attribute of the exposure is available; :meth:`read_rows` returns read-only
    views. :meth:`view` gives a copy with its own WCS object, so threads can use one
    cached exposure at once (astropy WCS objects are not safe to share between threads).
    """

    def __init__(self, meta: Exposure, planes: tuple[np.ndarray, np.ndarray, np.ndarray], wcs: Any | None = None,
                 resident: DeviceCopies | None = None):
        self._meta = meta
        self._planes = planes
        self.wcs = meta.wcs if wcs is None else wcs
        self._resident = resident or DeviceCopies()

    @classmethod
    def load(cls, exposure: Exposure) -> InMemoryExposure:
        """Read every row of an open exposure, and its archive (PSF, ...), into memory; the
        planes in native byte order, so that the CPU kernels read them in place."""
        planes = tuple(np.array(plane, dtype=plane.dtype.newbyteorder("="), copy=True) for plane in exposure.read_rows(0, exposure.height))
        if exposure.archive is not None:
            exposure.archive.load()
        for plane in planes:
            plane.flags.writeable = False
        return cls(exposure, planes)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._meta, name)

    @property
    def rows_in_place(self) -> bool:
        """:meth:`read_rows` gives views of the planes in memory."""
        return True

    @property
    def nbytes(self) -> int:
        """Bytes held: the host planes plus any device copies."""
        return sum(plane.nbytes for plane in self._planes) + self._resident.nbytes

    def resident_planes(self, backend: Backend, upload: bool = True) -> ResidentPlanes | None:
        """The planes on ``backend``'s device, copied once for this entry and every view
        of it (see :meth:`Exposure.resident_planes`)."""
        return self._resident.get(self, self._meta.mask_planes, backend, upload)

    def read_rows(self, y_start: int, y_stop: int, needed: Sequence[tuple[int, int]] | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows ``[y_start, y_stop)`` of image, variance and mask, as read-only views (all
        in memory: ``needed`` changes nothing)."""
        if not 0 <= y_start <= y_stop <= self._meta.height:
            raise ExposureError(f"{self._meta.path}: row range [{y_start}, {y_stop}) is outside [0, {self._meta.height}]")
        image, variance, mask = self._planes
        return image[y_start:y_stop], variance[y_start:y_stop], mask[y_start:y_stop]

    def view(self) -> InMemoryExposure:
        """The same pixels with a private copy of the WCS."""
        return InMemoryExposure(self._meta, self._planes, self._meta.wcs.deepcopy(), self._resident)

    def close(self) -> None:
        """Nothing to close: the file was closed after loading."""


def _file_key(path: Path) -> tuple:
    stat = os.stat(path)
    return (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)


class ExposureCache:
    """LRU of :class:`InMemoryExposure` bounded by ``max_bytes``.

    ``on_event(name)`` is called with "hit", "miss" or "bypass" for each lease (metrics).
    With a device ``backend`` every entry's planes are also copied to the device when
    loaded, and ``max_bytes`` bounds host and device bytes together (24 per pixel).
    ``memory_map``: files are read through memory maps (see :func:`open_exposure`; a
    server process passes False).
    """

    def __init__(self, max_bytes: int, on_event: Callable[[str], None] | None = None, limits: ExposureLimits = DEFAULT_LIMITS,
                 backend: Backend | None = None, memory_map: bool = True):
        self.max_bytes = int(max_bytes)
        self.limits, self.memory_map = limits, memory_map
        self.device = backend if backend is not None and backend.name != "numpy" else None
        self._entries: OrderedDict[tuple, tuple[InMemoryExposure, int]] = OrderedDict()  # entry, bytes when stored
        self._loading: dict[tuple, Future] = {}
        self._lock = threading.Lock()
        self._bytes = 0
        self._on_event = on_event or (lambda name: None)

    @property
    def nbytes(self) -> int:
        """Bytes of pixels held."""
        return self._bytes

    @contextmanager
    def lease(self, path: str | os.PathLike, name: str | None = None) -> Iterator[tuple[Exposure | InMemoryExposure, str]]:
        """Yield ``(exposure, outcome)`` for ``path``; outcome is "hit", "miss" or "bypass".

        ``name`` is how errors refer to the file (default: its path). The exposure is
        safe to use from the calling thread only, until the block ends.
        """
        name = name or os.fspath(path)
        try:
            key = _file_key(Path(path))
        except OSError as exc:
            raise ExposureError(f"{name}: cannot read: {exc.strerror}") from None
        cached, outcome = self._get(key, Path(path), name)
        self._on_event(outcome)
        if cached is not None:
            yield cached.view(), outcome
            return
        with open_exposure(path, name=name, limits=self.limits, memory_map=self.memory_map) as exposure:  # too large for the cache
            yield exposure, outcome

    def _get(self, key: tuple, path: Path, name: str) -> tuple[InMemoryExposure | None, str]:
        with self._lock:
            stored = self._entries.get(key)
            if stored is not None:
                self._entries.move_to_end(key)
                return stored[0], "hit"
            future = self._loading.get(key)
            leader = future is None
            if leader:
                future = self._loading[key] = Future()
        if not leader:
            entry = future.result()  # another thread is loading it: wait, share its outcome
            return entry, "hit" if entry is not None else "bypass"
        try:
            entry = self._load(path, name)
        except BaseException as exc:
            with self._lock:
                del self._loading[key]
            future.set_exception(exc)
            raise
        with self._lock:
            del self._loading[key]
            if entry is not None:
                self._store(key, entry)
        future.set_result(entry)
        return entry, "miss" if entry is not None else "bypass"

    def _load(self, path: Path, name: str) -> InMemoryExposure | None:
        with open_exposure(path, name=name, limits=self.limits, memory_map=self.memory_map) as exposure:
            per_pixel = BYTES_PER_PIXEL * (2 if self.device is not None else 1)
            if exposure.width * exposure.height * per_pixel > self.max_bytes or not exposure.fully_local:
                return None  # too large; or a partial copy of a remote file, whose rows are fetched as they are read
            entry = InMemoryExposure.load(exposure)
        if self.device is not None:
            entry.resident_planes(self.device)
        return entry

    def _store(self, key: tuple, entry: InMemoryExposure) -> None:
        """Insert under the lock, evicting least recently used entries to make room. An
        entry counts the bytes it held when stored (a caller that later copies it to a
        device other than the cache's own is not accounted)."""
        size = entry.nbytes
        while self._entries and self._bytes + size > self.max_bytes:
            _, (_, evicted_size) = self._entries.popitem(last=False)
            self._bytes -= evicted_size
        self._entries[key] = (entry, size)
        self._bytes += size



class HandleCache:
    """An LRU of open exposures (headers, WCS and file handles; no pixels read), bounded
    in count. For light curves: one cutout from each of many files, where reading whole
    planes would waste the time and the memory.

    A handle is used by one thread at a time (:meth:`lease` holds its lock); a replaced
    file (other size, mtime or inode) is opened again. ``memory_map`` as for
    :class:`ExposureCache`.
    """

    def __init__(self, max_open: int = 512, limits: ExposureLimits = DEFAULT_LIMITS, memory_map: bool = True):
        self.max_open, self.limits, self.memory_map = max_open, limits, memory_map
        self._open: OrderedDict[tuple, tuple[Exposure, threading.Lock]] = OrderedDict()
        self._lock = threading.Lock()

    @contextmanager
    def lease(self, path: str | os.PathLike, name: str | None = None, summary: str | None = None) -> Iterator[Exposure]:
        """The open exposure of ``path``, held for this thread; opened on a miss from its
        ``summary`` (JSON, see :mod:`~forcedphot.photometry.exposure_summary`) when that still
        describes the file, else from the file."""
        name = name or os.fspath(path)
        try:
            key = _file_key(Path(path))
        except OSError as exc:
            raise ExposureError(f"{name}: cannot read: {exc.strerror}") from None
        with self._lock:
            entry = self._open.get(key)
            if entry is not None:
                self._open.move_to_end(key)
        if entry is None:
            stored = (open_summarized(path, json.loads(summary), name=name, limits=self.limits, memory_map=self.memory_map)
                      if summary else None)
            opened = (stored or open_exposure(path, name=name, limits=self.limits, memory_map=self.memory_map), threading.Lock())
            with self._lock:
                entry = self._open.setdefault(key, opened)  # another thread may have opened it meanwhile
                while len(self._open) > self.max_open:
                    _, (evicted, lock) = self._open.popitem(last=False)
                    with lock:
                        evicted.close()
            if entry is not opened:
                opened[0].close()
        exposure, lock = entry
        with lock:
            yield exposure

    def close(self) -> None:
        """Close every handle."""
        with self._lock:
            while self._open:
                _, (exposure, lock) = self._open.popitem()
                with lock:
                    exposure.close()
