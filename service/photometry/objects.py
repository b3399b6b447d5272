"""DiaObject tables: read (parquet, CSV, JSON) and validate before anything is measured.

A table needs ``diaObjectId`` (integer, unique), ``ra`` and ``dec`` (ICRS degrees; older
tables name it ``decl``). Table-level problems raise :class:`InputError` naming the
column or the offending ids; per-row coordinate problems (NaN, |dec| > 90, ra outside
[0, 360)) are not fatal: those rows are marked in the ``coord_valid`` column; the engine
returns them with ``coord_flag`` and ``pixelFlags_offimage`` set, never measured.
"""

import io
from pathlib import Path

import numpy as np
import pandas as pd

from forcedphot.photometry.formats import table_format


class InputError(ValueError):
    """A problem with the caller's input, worded so the caller can fix it."""


REQUIRED = ("diaObjectId", "ra", "dec")
_SHOWN = 5  # how many offending values an error message lists


def _format_examples(values) -> str:
    values = list(values)
    shown = ", ".join(str(v) for v in values[:_SHOWN])
    return shown + (f" ... ({len(values)} in all)" if len(values) > _SHOWN else "")


def read_objects(source: str | Path | bytes, *, media_type: str | None = None, name: str = "objects") -> pd.DataFrame:
    """Read a DiaObject table from a file path or from bytes, then validate it.

    ``media_type`` (or the file suffix) picks the format: parquet, CSV or JSON (records).
    ``name`` is how errors refer to the table (a file name, or "request body").
    """
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
    kind = _format_of(kind, name)
    buffer = io.BytesIO(raw) if isinstance(raw, bytes) else raw
    try:
        if kind == "parquet":
            frame = pd.read_parquet(buffer)
        elif kind == "csv":
            frame = pd.read_csv(buffer)
        else:
            frame = pd.read_json(buffer, orient="records")
    except Exception as exc:  # every reader has its own exception zoo
        raise InputError(f"{name}: cannot read as {kind}: {exc}") from None
    return validate_objects(frame, name=name)


def _format_of(kind: str, name: str) -> str:
    fmt = table_format(kind)
    if fmt is None:
        raise InputError(f"{name}: unknown table format {kind!r}; use parquet, CSV or JSON")
    return fmt


def validate_objects(frame: pd.DataFrame, *, name: str = "objects") -> pd.DataFrame:
    """Check columns, types and ids; return a clean frame.

    The result has ``diaObjectId`` (int64), ``ra``, ``dec`` (float64), any other columns
    the caller sent, and ``coord_valid`` (bool): False where ra/dec are unusable.
    """
    frame = frame.copy()
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

    ids = pd.to_numeric(frame["diaObjectId"], errors="coerce")
    bad_ids = frame.index[ids.isna() | (ids != np.floor(ids))]
    if len(bad_ids):
        rows = _format_examples(bad_ids)
        raise InputError(f"{name}: column diaObjectId must hold integers; rows {rows} do not")
    frame["diaObjectId"] = ids.astype(np.int64)
    duplicated = frame["diaObjectId"][frame["diaObjectId"].duplicated()].unique()
    if len(duplicated):
        raise InputError(f"{name}: duplicate diaObjectId {_format_examples(duplicated)}")

    for column in ("ra", "dec"):
        values = pd.to_numeric(frame[column], errors="coerce")
        not_numbers = frame.index[values.isna() & frame[column].notna()]
        if len(not_numbers):
            raise InputError(f"{name}: column {column} must be numeric (degrees); rows {_format_examples(not_numbers)} are not")
        frame[column] = values.astype(np.float64)
    ra, dec = frame["ra"].to_numpy(), frame["dec"].to_numpy()
    frame["coord_valid"] = np.isfinite(ra) & np.isfinite(dec) & (ra >= 0) & (ra < 360) & (np.abs(dec) <= 90)
    return frame.reset_index(drop=True)
