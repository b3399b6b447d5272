"""Table formats: the one media-type table, and catalog encoding (parquet, CSV, JSON).

Parquet keeps each column's unit in its field metadata and adds the provenance (software
version, configuration, exposure sources) to the schema metadata.
"""

import io
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from forcedphot.version import __version__

#: format -> the media type answered with it
FORMATS = {"parquet": "application/vnd.apache.parquet", "csv": "text/csv", "json": "application/json"}
#: other names accepted for a format: media type aliases and file suffixes
ALIASES = {"application/x-parquet": "parquet", "application/csv": "csv", "pq": "parquet"}
DEFAULT_FORMAT = "parquet"


def table_format(name: str) -> str | None:
    """The format a format name, media type or file suffix (with or without its dot)
    stands for, else None."""
    key = name.strip().lower().lstrip(".")
    if key in FORMATS:
        return key
    for fmt, media_type in FORMATS.items():
        if key == media_type:
            return fmt
    return ALIASES.get(key)


def with_provenance(table: pa.Table, provenance: dict) -> pa.Table:
    """``table`` with the provenance in its schema metadata (key ``forcedphot``)."""
    metadata = dict(table.schema.metadata or {})
    metadata[b"forcedphot"] = json.dumps({"software": "forcedphot", "version": __version__, **provenance}, default=str).encode()
    return table.replace_schema_metadata(metadata)


_NULLABLE = {"visit": "Int64", "detector": "Int16"}


def to_pandas(table: pa.Table) -> pd.DataFrame:
    """The catalog as a DataFrame; ``visit`` and ``detector`` keep their nulls (Int64, Int16)."""
    frame = table.to_pandas()
    for name, dtype in _NULLABLE.items():
        if name in frame:
            frame[name] = frame[name].astype(dtype)
    return frame


def encode_catalog(table: pa.Table, provenance: dict, fmt: str) -> bytes:
    """Serialise a catalog as parquet (with units and provenance), CSV or JSON records."""
    if fmt == "parquet":
        sink = io.BytesIO()
        pq.write_table(with_provenance(table, provenance), sink)
        return sink.getvalue()
    if fmt == "csv":
        return to_pandas(table).to_csv(index=False).encode()
    if fmt == "json":
        return to_pandas(table).to_json(orient="records", double_precision=15).encode()
    raise ValueError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")


def write_catalog(table: pa.Table, provenance: dict, path: str | Path) -> None:
    """Write a catalog; the format follows the suffix (.parquet, .csv, .json; none: parquet)."""
    path = Path(path)
    fmt = table_format(path.suffix) if path.suffix else DEFAULT_FORMAT
    path.write_bytes(encode_catalog(table, provenance, fmt or path.suffix))


def read_provenance(path: str | Path) -> dict:
    """The provenance a parquet catalog was written with."""
    metadata = pq.read_schema(path).metadata or {}
    return json.loads(metadata[b"forcedphot"])
