"""DiaObject tables: read (parquet, CSV, JSON) and validate before anything is measured.

A table needs ``diaObjectId`` (integer, unique), ``ra`` and ``dec`` (ICRS degrees; older
tables name it ``decl``). Table-level problems raise :class:`InputError` naming the
column or the offending ids; per-row coordinate problems (NaN, |dec| > 90, ra outside
[0, 360)) are not fatal: those rows are marked in the ``coord_valid`` column; the engine
returns them with ``coord_flag`` and ``pixelFlags_offimage`` set, never measured.
"""

from dataclasses import dataclass, fields
import io
import json
from pathlib import Path
import re
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from forcedphot.photometry.formats import OUTPUT_ONLY, table_format
from forcedphot.photometry.table_limits import CHECKS, TableLimits


@dataclass(frozen=True)
class ObjectArrays:
    """A validated DiaObject table's columns as NumPy arrays (what measuring needs of it)."""

    ids: np.ndarray  # (N,) int64 diaObjectId
    ra: np.ndarray  # (N,) float64, deg
    dec: np.ndarray  # (N,) float64, deg
    coord_valid: np.ndarray  # (N,) bool

    @classmethod
    def of(cls, frame: pd.DataFrame) -> "ObjectArrays":
        """The arrays of a table from :func:`validate_objects` (a table made otherwise is validated first)."""
        if "coord_valid" not in frame.columns:
            frame = validate_objects(frame)
        return cls(frame["diaObjectId"].to_numpy(np.int64), frame["ra"].to_numpy(np.float64), frame["dec"].to_numpy(np.float64),
                   frame["coord_valid"].to_numpy(bool))

    @classmethod
    def concat(cls, parts: list["ObjectArrays"]) -> "ObjectArrays":
        """The objects of ``parts``, one after the other."""
        return cls(*(np.concatenate([getattr(part, f.name) for part in parts]) for f in fields(cls)))

    def take(self, rows: np.ndarray) -> "ObjectArrays":
        """The objects at ``rows``."""
        return ObjectArrays(*(getattr(self, f.name)[rows] for f in fields(self)))

    def __len__(self) -> int:
        return len(self.ids)


class InputError(ValueError):
    """A problem with the caller's input, worded so the caller can fix it."""


REQUIRED = ("diaObjectId", "ra", "dec")
_READ_COLUMNS = (*REQUIRED, "decl")  # what a bounded read decodes of a parquet table
_SHOWN = 5  # how many offending values an error message lists


def format_examples(values) -> str:
    values = list(values)
    shown = ", ".join(str(v) for v in values[:_SHOWN])
    return shown + (f" ... ({len(values)} in all)" if len(values) > _SHOWN else "")


def read_objects(source: str | Path | bytes | pd.DataFrame | Any, *, media_type: str | None = None, name: str = "objects",
                 limits: TableLimits | None = None) -> pd.DataFrame:
    """Read a DiaObject table from a file path, from bytes, or from a table in memory (a
    pandas DataFrame, an astropy Table or a pyarrow Table), then validate it.

    ``media_type`` (or the file suffix) picks the format of a file or bytes: parquet, CSV, JSON
    (records), or Rubin alert packets (``avro``: their diaObjects, see :mod:`~forcedphot.photometry.alerts`).
    A table in memory is validated exactly as a file's would be.
    ``name`` is how errors refer to the table (a file name, or "request body").
    ``limits`` (a service's, for tables from clients) are checked from the bytes before
    anything is decoded (:class:`~forcedphot.photometry.table_limits.TableTooLarge`), and
    then only the columns the engine uses are decoded from parquet.
    """
    in_memory = _in_memory_frame(source)
    if in_memory is not None:
        return validate_objects(in_memory, name=name)
    if isinstance(source, (str, Path)):
        path = Path(source)
        name = str(path)
        kind = media_type or path.suffix.lower().lstrip(".")
        if not path.is_file():
            raise InputError(f"{name}: no such file")
        raw: bytes | Path = path
    else:
        kind = media_type or "parquet"
        raw = source
    kind = object_table_format(kind, name)
    if kind == "avro":
        from forcedphot.photometry.alerts import read_alerts

        data = raw if isinstance(raw, bytes) else raw.read_bytes()
        return validate_objects(read_alerts(data, name, limits.max_rows if limits else 2**31), name=name)
    if limits is not None:
        if not isinstance(raw, bytes):
            raw = raw.read_bytes()
        CHECKS[kind](raw, limits, name)
    buffer = io.BytesIO(raw) if isinstance(raw, bytes) else raw
    try:
        if kind == "parquet":
            frame = pd.read_parquet(buffer, columns=_present(buffer) if limits is not None else None)
        elif kind == "csv":  # ids as text, parsed exactly (pandas would take 1e18 as a float)
            frame = pd.read_csv(buffer, dtype={"diaObjectId": str})
        else:  # Python's json keeps integers exact; pandas' reader rounds those beyond 2**53
            frame = records_frame(json.loads(raw if isinstance(raw, bytes) else raw.read_bytes()), name)
    except Exception as exc:  # every reader has its own exception zoo
        raise InputError(f"{name}: cannot read as {kind}: {exc}") from None
    return validate_objects(frame, name=name)


def _in_memory_frame(source: Any) -> pd.DataFrame | None:
    """A DataFrame of a table held in memory (pandas, astropy, pyarrow), else None."""
    if isinstance(source, pd.DataFrame):
        return source
    if isinstance(source, pa.Table):
        return source.to_pandas()
    if type(source).__module__.startswith("astropy.table"):
        return source.to_pandas()
    return None


def _present(buffer: io.BytesIO) -> list[str]:
    """The columns of a parquet table that a bounded read decodes (see :data:`_READ_COLUMNS`)."""
    names = set(pq.ParquetFile(buffer).schema_arrow.names)
    buffer.seek(0)
    return [column for column in _READ_COLUMNS if column in names]


def records_frame(records, name: str) -> pd.DataFrame:
    """A table from JSON records (a list of objects); ``diaObjectId`` keeps the values as
    parsed (exact Python integers, never through float)."""
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise InputError(f"{name}: a JSON table must be a list of records like {{\"diaObjectId\": 1, \"ra\": 10.0, \"dec\": -5.0}}")
    keys = records[0].keys() if records else ()
    if all(r.keys() == keys for r in records):  # the usual table: built column by column (twice as fast)
        columns = {key: [r[key] for r in records] for key in keys}
        if "diaObjectId" in columns:
            columns["diaObjectId"] = _ids_as_parsed(columns["diaObjectId"])
        return pd.DataFrame(columns)
    frame = pd.DataFrame.from_records(records)
    if "diaObjectId" in frame:
        frame["diaObjectId"] = _ids_as_parsed([r.get("diaObjectId") for r in records])
    return frame


def _ids_as_parsed(values: list) -> np.ndarray | pd.Series:
    """JSON ``diaObjectId`` values: int64 when every one is an integer that fits, else the
    values themselves (objects; :func:`validate_objects` names those that are not exact)."""
    if all(type(v) is int for v in values):
        try:
            return np.array(values, dtype=np.int64)
        except OverflowError:
            pass
    return pd.Series(values, dtype=object)


#: names of Avro alert packets as an object table: file suffix and media types
AVRO_NAMES = ("avro", "application/avro", "avro/binary", "application/vnd.apache.avro+binary")


def object_table_format(kind: str, name: str) -> str:
    """The format of an object table (parquet, csv, json, or avro: alert packets) named by a
    format name, media type or file suffix; else :class:`InputError`."""
    if kind.strip().lower().lstrip(".") in AVRO_NAMES:
        return "avro"
    fmt = table_format(kind)
    if fmt is None or fmt in OUTPUT_ONLY:
        raise InputError(f"{name}: unknown table format {kind!r}; use parquet, CSV, JSON or Avro alert packets")
    return fmt


INT64_MAX = np.iinfo(np.int64).max
FLOAT_EXACT = 2**53  # floats hold every integer up to this exactly; beyond it they were rounded
_INTEGER_TEXT = re.compile(r"[+-]?[0-9]+")


def _exact_id(value) -> int | None:
    """``value`` as an exact signed 64-bit integer, else None (never through float)."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        number = int(value)
    elif isinstance(value, str) and _INTEGER_TEXT.fullmatch(value.strip()):
        number = int(value.strip())
    elif isinstance(value, (float, np.floating)) and np.isfinite(value) and float(value).is_integer() and abs(value) <= FLOAT_EXACT:
        number = int(value)
    else:
        return None
    return number if -INT64_MAX - 1 <= number <= INT64_MAX else None


def _shown(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _exact_ids(column: pd.Series, name: str) -> pd.Series:
    """The diaObjectId column as int64, every value exact (the APDB type), else
    :class:`InputError` naming the rows and values that are not."""
    kind = column.dtype.kind
    if kind == "i":
        return column.astype(np.int64)
    if kind == "u":
        values = column.to_numpy()
        bad = np.flatnonzero(values > INT64_MAX)
    elif kind == "f":
        values = column.to_numpy()
        with np.errstate(invalid="ignore"):
            bad = np.flatnonzero(~np.isfinite(values) | (values != np.floor(values)) | (np.abs(values) > FLOAT_EXACT))
    else:
        parsed = [_exact_id(v) for v in column.tolist()]
        bad = np.array([i for i, v in enumerate(parsed) if v is None], dtype=np.int64)
        values = np.array([0 if v is None else v for v in parsed], dtype=np.int64)
    if len(bad):
        shown = ", ".join(f"row {column.index[i]} ({_shown(column.iloc[i])})" for i in bad[:_SHOWN])
        more = f" ... ({len(bad)} in all)" if len(bad) > _SHOWN else ""
        raise InputError(f"{name}: column diaObjectId must hold signed 64-bit integers, written exactly "
                         f"(floats only up to 2**53); {shown}{more} do not")
    return pd.Series(np.asarray(values).astype(np.int64), index=column.index)


def validate_objects(frame: pd.DataFrame, *, name: str = "objects") -> pd.DataFrame:
    """Check columns, types and ids; return a clean frame.

    The result has ``diaObjectId`` (int64), ``ra``, ``dec`` (float64), any other columns
    the caller sent, and ``coord_valid`` (bool): False where ra/dec are unusable.
    """
    if "dec" not in frame.columns and "decl" in frame.columns:
        frame = frame.rename(columns={"decl": "dec"})
    if "diaObjectId" not in frame.columns and frame.index.name == "diaObjectId":
        frame = frame.reset_index()
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        have = ", ".join(map(str, frame.columns[:20])) or "none"
        raise InputError(f"{name}: missing column(s) {', '.join(missing)} (columns present: {have})")
    if len(frame) == 0:
        raise InputError(f"{name}: the object table is empty")

    ids = _exact_ids(frame["diaObjectId"], name)
    duplicated = ids[ids.duplicated()].unique()
    if len(duplicated):
        raise InputError(f"{name}: duplicate diaObjectId {format_examples(duplicated)}")
    ra, dec = (_degrees(frame[column], column, name) for column in ("ra", "dec"))
    columns = {column: frame[column].to_numpy(copy=True) if isinstance(frame[column].dtype, np.dtype) else frame[column].array.copy()
               for column in frame.columns if column not in ("diaObjectId", "ra", "dec", "coord_valid")}
    return pd.DataFrame({"diaObjectId": ids.to_numpy(), "ra": ra, "dec": dec, **columns, "coord_valid": coordinates_valid(ra, dec)},
                        columns=["diaObjectId", "ra", "dec", *columns, "coord_valid"])


def coordinates_valid(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """Where ``ra``, ``dec`` (degrees) name a position: finite, ra in [0, 360), |dec| <= 90."""
    return np.isfinite(ra) & np.isfinite(dec) & (ra >= 0) & (ra < 360) & (np.abs(dec) <= 90)


_PLAIN_KEYS = frozenset(REQUIRED)


def plain_records(records: list[dict]) -> ObjectArrays | None:
    """The objects of JSON records in the plain form, read without building a table: every
    record holds exactly ``diaObjectId``, an integer, and ``ra`` and ``dec``, numbers; the
    ids unique and within int64. Then the result is :func:`validate_objects`' on a table
    of the records (rows with unusable coordinates marked, not refused). None for any
    other form: validating a table of the records says what is wrong, or converts it."""
    if not all(r.keys() == _PLAIN_KEYS for r in records):
        return None
    ids, ra, dec = [r["diaObjectId"] for r in records], [r["ra"] for r in records], [r["dec"] for r in records]
    if not (all(type(v) is int for v in ids) and all(type(v) is float or type(v) is int for v in (*ra, *dec))):
        return None  # (bool is not int here: true/false are refused by the table's checks)
    try:
        arrays = np.array(ids, np.int64), np.array(ra, np.float64), np.array(dec, np.float64)
    except OverflowError:
        return None
    if len(np.unique(arrays[0])) != len(records):
        return None
    return ObjectArrays(*arrays, coordinates_valid(arrays[1], arrays[2]))


def _degrees(values: pd.Series, column: str, name: str) -> np.ndarray:
    """A coordinate column as float64 degrees, else :class:`InputError` naming the rows
    that hold true/false or text that is not a number (missing values stay NaN)."""
    if isinstance(values.dtype, np.dtype) and values.dtype.kind in "fiu":  # numbers already: nothing to check
        return values.to_numpy(dtype=np.float64, copy=True)
    booleans = values.index[values.map(lambda v: isinstance(v, (bool, np.bool_)))]
    if len(booleans):
        raise InputError(f"{name}: column {column} must be numeric (degrees); rows {format_examples(booleans)} hold true/false")
    numbers = pd.to_numeric(values, errors="coerce")
    not_numbers = values.index[numbers.isna() & values.notna()]
    if len(not_numbers):
        raise InputError(f"{name}: column {column} must be numeric (degrees); rows {format_examples(not_numbers)} are not")
    return numbers.to_numpy(dtype=np.float64, na_value=np.nan)
