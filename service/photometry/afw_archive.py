"""Read the archive of persisted objects that afw writes into an exposure's FITS file.

afw's ``OutputArchive`` stores each object (PSF, PhotoCalib, WCS, ...) as rows of one or more
binary tables. ``ARCHIVE_INDEX`` lists, per object id, the catalogs holding it (``id``,
``cat_archive``, ``row0``, ``nrows``, ``name``; afw writes the column names with '.', our
writer with '_'); each ``ARCHIVE_DATA`` table carries its catalog number in ``AR_CATN`` and
its class in ``AR_NAME``. A column that refers to another object (``kernel``,
``spatialfunctions``, ``field``, ...) holds that object's id. The primary header names the
exposure's components: ``ARCHIVE_ID_<NAME>`` (or, in older files, ``<NAME>_ID``).

Nothing here executes or unpickles anything: values come back as numbers, strings, NumPy
arrays or raw ``bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Any

from astropy.io import fits
import numpy as np

__all__ = ["Archive", "ArchiveError"]


class ArchiveError(ValueError):
    """The archive does not hold what a reader needs; the message says what is missing."""


@dataclass(frozen=True)
class _Entry:
    catalog: int
    row0: int
    nrows: int
    name: str


class Archive:
    """The archive of one open FITS file (see the module docstring); reads rows on demand."""

    def __init__(self, hdul: fits.HDUList, index: fits.BinTableHDU):
        self._primary = hdul[0].header
        self._tables: dict[int, fits.BinTableHDU] = {}
        self._loaded: dict[int, fits.FITS_rec] = {}  # catalogs copied into memory by load()
        for hdu in hdul:
            if isinstance(hdu, fits.BinTableHDU) and hdu is not index:
                catalog = _integer(hdu.header.get("AR_CATN"))
                if catalog is not None:
                    self._tables.setdefault(catalog, hdu)
        columns = {name.lower().replace(".", "_"): name for name in index.columns.names}
        missing = {"id", "cat_archive", "row0", "nrows"} - columns.keys()
        if missing:
            raise ArchiveError(f"ARCHIVE_INDEX lacks the columns {', '.join(sorted(missing))}")
        self._entries: dict[int, list[_Entry]] = {}
        data = index.data
        names = data[columns["name"]] if "name" in columns else [""] * len(data)
        for row, (archive_id, catalog, row0, nrows, name) in enumerate(zip(data[columns["id"]], data[columns["cat_archive"]],
                                                                            data[columns["row0"]], data[columns["nrows"]], names)):
            numbers = {}
            for column, value in (("id", archive_id), ("cat_archive", catalog), ("row0", row0), ("nrows", nrows)):
                numbers[column] = _integer(value)
                if numbers[column] is None:
                    raise ArchiveError(f"ARCHIVE_INDEX row {row} column {columns[column]} = {value!r} is not a whole number")
            self._entries.setdefault(numbers["id"], []).append(
                _Entry(numbers["cat_archive"], numbers["row0"], numbers["nrows"], str(name).strip()))

    @classmethod
    def of(cls, hdul: fits.HDUList) -> Archive | None:
        """The archive of ``hdul`` (HDUs already named, see ``exposure._open_fits``), or None."""
        if "ARCHIVE_INDEX" not in hdul:
            return None
        return cls(hdul, hdul["ARCHIVE_INDEX"])

    def component(self, name: str) -> int | None:
        """Archive id of the exposure component ``name`` ("Psf", "PhotoCalib", ...), else None."""
        for key in (f"ARCHIVE_ID_{name.upper()}", f"{name.upper()}_ID"):
            archive_id = _integer(self._primary.get(key))
            if archive_id is not None and archive_id in self._entries:
                return archive_id
        return None

    def class_name(self, archive_id: int) -> str:
        """The persisted class of object ``archive_id`` (e.g. "PcaPsf")."""
        entry = self._entries_of(archive_id)[0]
        return entry.name or str(self._table(entry).header.get("AR_NAME", "")).strip()

    def catalogs(self, archive_id: int) -> list[list[dict[str, Any]]]:
        """Rows of object ``archive_id``: one list per catalog it was written to, each row a
        ``{column: value}`` dict (arrays as float64/int NumPy arrays, strings stripped,
        variable-length byte columns as ``bytes``)."""
        out = []
        for entry in self._entries_of(archive_id):
            table = self._table(entry)
            data = self._loaded[entry.catalog] if entry.catalog in self._loaded else table.data
            if entry.row0 < 0 or entry.row0 + entry.nrows > len(data):
                raise ArchiveError(f"archive object {archive_id} ({entry.name}) points past the end of catalog {entry.catalog}")
            out.append([{column: _value(data[column][row]) for column in data.columns.names}
                        for row in range(entry.row0, entry.row0 + entry.nrows)])
        return out

    def load(self) -> None:
        """Copy every catalog into memory, so the archive stays readable after its file is
        closed (an exposure cache keeps exposures in memory)."""
        for catalog, table in self._tables.items():
            self._loaded.setdefault(catalog, table.data.copy())

    def record(self, archive_id: int) -> dict[str, Any]:
        """The first row of object ``archive_id`` (objects written as one row)."""
        rows = self.catalogs(archive_id)[0]
        if not rows:
            raise ArchiveError(f"archive object {archive_id} has no rows")
        return rows[0]

    def _entries_of(self, archive_id: int) -> list[_Entry]:
        entries = self._entries.get(int(archive_id))
        if not entries:
            raise ArchiveError(f"archive id {archive_id} is not in ARCHIVE_INDEX")
        return entries

    def _table(self, entry: _Entry) -> fits.BinTableHDU:
        table = self._tables.get(entry.catalog)
        if table is None:
            raise ArchiveError(f"archive catalog {entry.catalog} ({entry.name}) is not in the file")
        return table


def _integer(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    number = float(value)
    return int(number) if math.isfinite(number) and number == int(number) else None


def _value(value: Any) -> Any:
    """A table cell as a plain value: bytes for uint8 arrays (afw's byte columns)."""
    if isinstance(value, np.ndarray):
        if value.dtype == np.uint8:
            return value.tobytes()
        if value.dtype.kind in "US":
            return "".join(value.tolist()).strip()
        return value.astype(value.dtype.newbyteorder("=")) if value.dtype.kind in "fiub" else value
    if isinstance(value, (bytes, str)):
        return value.strip() if isinstance(value, str) else value
    return value.item() if hasattr(value, "item") else value
