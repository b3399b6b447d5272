"""Sparse local copies of remote FITS files: only the bytes a request reads are fetched.

A copy is a sparse file of the remote file's size beside a sidecar ``<copy>.blocks``: one
line of JSON (where the bytes come from, the size, the copy's inode and modification
time, which filling it leaves as it was) followed by one byte
per 64 KiB block of the file, 1 once the block is here. When a copy is made its headers
and every non-image data unit (afw's archive: PSF, PhotoCalib, ...; a tile-compressed
image's table of tiles) are fetched, so it opens as any file does; pixel rows are fetched
when :meth:`PartialCopy.ensure` is asked for them (ranged reads through
``lsst-resources``), a tile-compressed plane's rows as the tiles that hold them. A file
compressed as a whole (gzip, bzip2) is fetched whole: nothing in it can be read apart.

Several processes may read and fill one copy: a block is written before it is marked,
and two writers of a block write the same bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
import json
import math
import os
from pathlib import Path
import threading
import time
from typing import Any
import uuid

from astropy.io import fits
import numpy as np

from .fits_preflight import HduExtent, is_whole_file_compressed, walk

BLOCK_BYTES = 1 << 16
MERGE_GAP_BLOCKS = 4  # missing runs this close are fetched as one read (fewer requests, a little more data)
SMALL_IMAGE_BYTES = 1 << 20  # image data units up to this size come with the headers
SUFFIX = ".blocks"


class FetchError(OSError):
    """Bytes of a partial copy could not be fetched from where it comes from."""


def sidecar(path: str | os.PathLike) -> Path:
    """The sidecar of the copy at ``path``."""
    return Path(f"{os.fspath(path)}{SUFFIX}")


class PartialCopy:
    """A partial copy: which blocks are here, and how to fetch the others. It holds no
    open file between calls (a server keeps hundreds of exposures open).

    Use :meth:`of` to find one (None for an ordinary file) and :meth:`create` to make one.
    """

    def __init__(self, path: str, source: dict, offset: int):
        self.path, self.uri, self.size = path, str(source["uri"]), int(source["size"])
        self._inode, self._mtime_ns, self._offset = int(source["inode"]), int(source["mtime_ns"]), offset
        self._lock = threading.Lock()
        self._complete = False  # known to be: a copy once complete stays so

    @classmethod
    def of(cls, path: str | os.PathLike) -> PartialCopy | None:
        """The partial copy at ``path``, or None when it is an ordinary file (no sidecar).

        Raises FileNotFoundError when the file is gone, and :class:`FetchError` when the
        sidecar belongs to another file (the copy was replaced meanwhile).
        """
        path = os.fspath(path)
        try:
            with open(sidecar(path), "rb") as blocks:
                head = blocks.readline()
        except FileNotFoundError:
            return None
        copy = cls(path, json.loads(head), len(head))
        if os.stat(path).st_ino != copy._inode:
            raise FetchError(f"{path}: the copy was replaced while it was opened")
        return copy

    @classmethod
    def create(cls, path: str | os.PathLike, uri: Any, max_hdus: int, max_pixels: int) -> None:
        """Make a partial copy of ``uri`` (an ``lsst.resources.ResourcePath``) at ``path``:
        a sparse file with every header and non-image data unit fetched (see the module
        docstring), written under temporary names and renamed into place (the sidecar
        first, so a copy is never seen without it). Headers are walked as
        :func:`~forcedphot.photometry.fits_preflight.walk` does, so a file that declares
        too much raises :class:`~forcedphot.photometry.fits_preflight.DeclaredTooMuch`
        before anything beyond its headers is fetched."""
        path = Path(path)
        size = int(uri.size())
        temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
        blocks_path = sidecar(temporary)
        try:
            with open(temporary, "xb") as data:
                data.truncate(size)
                inode = os.fstat(data.fileno()).st_ino
            source = {"uri": str(uri), "size": size, "inode": inode, "mtime_ns": time.time_ns()}
            head = json.dumps(source).encode() + b"\n"
            with open(blocks_path, "xb") as blocks:
                blocks.write(head + bytes(math.ceil(size / BLOCK_BYTES)))
            cls(os.fspath(temporary), source, len(head))._fetch_structure(max_hdus, max_pixels)
            os.replace(blocks_path, sidecar(path))
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
            blocks_path.unlink(missing_ok=True)

    def _fetch_structure(self, max_hdus: int, max_pixels: int) -> None:
        """Fetch the headers and the data units a reader opens the file with."""
        self.ensure([(0, min(self.size, BLOCK_BYTES))])
        with open(self.path, "rb") as data:
            if is_whole_file_compressed(data.read(4)):
                self.ensure([(0, self.size)])
                return
        for extent in walk(_Stream(self), max_hdus, max_pixels):
            self.ensure([_needed_data(extent)])

    @property
    def complete(self) -> bool:
        """Every block is here."""
        self._complete = self._complete or all(self._marks())
        return self._complete

    def _marks(self) -> bytes:
        """One byte per block, 1 where it is here."""
        with open(sidecar(self.path), "rb") as blocks:
            blocks.seek(self._offset)
            return blocks.read(math.ceil(self.size / BLOCK_BYTES))

    def ensure(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Fetch what is missing of the byte ranges ``[start, stop)``: whole 64 KiB blocks,
        nearby runs in one read. Raises :class:`FetchError` when the source cannot be read
        or holds fewer bytes than the copy's size (it changed), or the copy was replaced."""
        with self._lock:
            marks = np.frombuffer(self._marks(), np.uint8)
            wanted = np.zeros(len(marks), bool)
            for start, stop in ranges:
                start, stop = max(0, start), min(self.size, stop)
                if stop > start:
                    wanted[start // BLOCK_BYTES:(stop - 1) // BLOCK_BYTES + 1] = True
            missing = wanted & (marks == 0)
            if missing.any():
                self._fetch(_runs(np.flatnonzero(missing)))

    def _fetch(self, runs: list[tuple[int, int]]) -> None:
        """Fetch the blocks of ``runs`` (inclusive block ranges) and mark them here."""
        from lsst.resources import ResourcePath  # a client library per scheme: only where copies are made

        try:
            data_fd = os.open(self.path, os.O_WRONLY)
        except FileNotFoundError:
            raise FetchError("cannot be fetched: the local copy was removed meanwhile") from None
        try:
            if os.fstat(data_fd).st_ino != self._inode:
                raise FetchError("cannot be fetched: the local copy was replaced meanwhile")
            with open(sidecar(self.path), "r+b") as blocks, ResourcePath(self.uri).open("rb") as remote:
                for first, last in runs:
                    start, stop = first * BLOCK_BYTES, min(self.size, (last + 1) * BLOCK_BYTES)
                    remote.seek(start)
                    chunk = remote.read(stop - start)
                    if len(chunk) != stop - start:
                        raise FetchError(f"cannot be fetched: the source holds fewer bytes than its copy's {self.size} (it changed)")
                    os.pwrite(data_fd, chunk, start)
                    os.pwrite(blocks.fileno(), b"\x01" * (last - first + 1), self._offset + first)
        except FetchError:
            raise
        except Exception as exc:  # lsst-resources raises per scheme: botocore errors, OSError, ...
            raise FetchError(f"cannot be fetched from the source ({type(exc).__name__})") from None
        finally:
            os.utime(data_fd, ns=(time.time_ns(), self._mtime_ns))  # filling a copy is not changing it
            os.close(data_fd)


def _runs(blocks: np.ndarray) -> list[tuple[int, int]]:
    """Sorted block numbers as inclusive runs ``(first, last)``, runs less than
    MERGE_GAP_BLOCKS apart merged."""
    breaks = np.flatnonzero(np.diff(blocks) > MERGE_GAP_BLOCKS)
    firsts = np.concatenate([blocks[:1], blocks[breaks + 1]])
    lasts = np.concatenate([blocks[breaks], blocks[-1:]])
    return [(int(a), int(b)) for a, b in zip(firsts, lasts)]


def _needed_data(extent: HduExtent) -> tuple[int, int]:
    """The bytes of an HDU's data a reader needs at open: all of it, except a large
    image's pixels and a tile-compressed image's heap (its table of tiles is needed)."""
    xtension = extent.cards.get("XTENSION", "").strip("' ").upper()
    if (extent.index == 0 or xtension == "IMAGE") and extent.data_bytes > SMALL_IMAGE_BYTES:
        return extent.data_start, extent.data_start
    if extent.cards.get("ZIMAGE") == "T":
        table = int(extent.cards.get("NAXIS1", 0)) * int(extent.cards.get("NAXIS2", 0))
        return extent.data_start, extent.data_start + table
    return extent.data_start, extent.end


class _Stream:
    """A read-only file over a partial copy that fetches what is read (headers)."""

    def __init__(self, copy: PartialCopy):
        self._copy, self._position = copy, 0

    def read(self, size: int) -> bytes:
        stop = min(self._copy.size, self._position + size)
        self._copy.ensure([(self._position, stop)])
        with open(self._copy.path, "rb") as data:
            data.seek(self._position)
            chunk = data.read(stop - self._position)
        self._position += len(chunk)
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        self._position = offset if whence == 0 else self._position + offset
        return self._position


def row_ranges(hdu: Any, y_start: int, y_stop: int) -> list[tuple[int, int]]:
    """The byte ranges of the file that rows ``[y_start, y_stop)`` of the image ``hdu``
    (an astropy HDU of an open file) lie in: the rows of a plain image, the tiles of a
    tile-compressed one (its table rows and their compressed bytes in the heap)."""
    if y_stop <= y_start:
        return []
    info = hdu.fileinfo()
    if not isinstance(hdu, fits.CompImageHDU):
        row_bytes = hdu.shape[1] * abs(hdu.header["BITPIX"]) // 8
        return [(info["datLoc"] + y_start * row_bytes, info["datLoc"] + y_stop * row_bytes)]
    return _tile_ranges(info, y_start, y_stop)


def _tile_ranges(info: dict, y_start: int, y_stop: int) -> list[tuple[int, int]]:
    """Byte ranges of the tiles of a compressed image (tiles in row-major order, one
    table row each) that hold rows ``[y_start, y_stop)``."""
    data = info["datLoc"]
    with open(info["file"].name, "rb") as f:
        f.seek(info["hdrLoc"])
        table = fits.Header.fromfile(f)  # the binary table's own header: TFORMn, THEAP
        width, tile_width = table["ZNAXIS1"], table.get("ZTILE1", table["ZNAXIS1"])
        tiles_per_row = -(-width // tile_width)
        first = (y_start // table.get("ZTILE2", 1)) * tiles_per_row
        last = ((y_stop - 1) // table.get("ZTILE2", 1) + 1) * tiles_per_row  # exclusive
        row_bytes, columns = table["NAXIS1"], _descriptor_columns(table)
        f.seek(data + first * row_bytes)
        rows = f.read((last - first) * row_bytes)
    heap = data + table.get("THEAP", row_bytes * table["NAXIS2"])
    ranges = [(data + first * row_bytes, data + last * row_bytes)]
    for offset, descriptor, element in columns:
        pairs = np.ndarray((last - first, 2), dtype=descriptor, buffer=rows, offset=offset, strides=(row_bytes, descriptor.itemsize))
        counts, starts = pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)
        used = counts > 0
        if used.any():
            ranges.append((heap + int(starts[used].min()), heap + int((starts + counts * element)[used].max())))
    return ranges


_ELEMENT_BYTES = {"L": 1, "X": 1, "B": 1, "I": 2, "J": 4, "K": 8, "A": 1, "E": 4, "D": 8, "C": 8, "M": 16}


def _descriptor_columns(table: fits.Header) -> list[tuple[int, np.dtype, int]]:
    """Per variable-length column of a binary table: its byte offset in a row, the
    descriptor's dtype (P: two int32, Q: two int64) and the bytes of one element."""
    columns, offset = [], 0
    for index in range(1, table["TFIELDS"] + 1):
        form = str(table[f"TFORM{index}"]).strip()
        repeat_text = form[:len(form) - len(form.lstrip("0123456789"))]
        repeat = int(repeat_text) if repeat_text else 1
        code = form[len(repeat_text)]
        if code in "PQ":
            descriptor = np.dtype(">i4" if code == "P" else ">i8")
            columns.append((offset, descriptor, _ELEMENT_BYTES[form[len(repeat_text) + 1]]))
            offset += 2 * descriptor.itemsize * repeat
        elif code == "X":
            offset += -(-repeat // 8)
        else:
            offset += _ELEMENT_BYTES[code] * repeat
    return columns

