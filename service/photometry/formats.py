"""Table formats: the one media-type table, and catalog encoding.

Every format but JSON carries the units and reads back with ``astropy.table.Table.read``
(same columns, same units):

- parquet: each column's unit in its Arrow field metadata, the provenance (software
  version, configuration, exposure sources) under the schema key ``forcedphot``, and
  astropy's own ``table_meta_yaml`` (units, types) so that astropy keeps the units;
- CSV and ECSV: an ECSV 1.0 header (``#`` comment lines: columns, types, units, and the
  provenance as table metadata) then comma-separated rows; pandas reads it with
  ``read_csv(..., comment="#")``;
- FITS: a binary table (``TUNITn``), the provenance as JSON in the ``PROVJSON`` keyword;
- VOTable: units in each FIELD, the provenance as JSON in the table description;
- JSON: records, no units (JSON has no place for them; see the parquet schema).
"""

from functools import lru_cache
import io
import json
import os
from pathlib import Path

from astropy.io import fits
from astropy.table import Column, MaskedColumn, Table
from astropy.table import meta as table_meta
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from forcedphot.defaults import ALIASES, DEFAULT_FORMAT, FORMATS, OUTPUT_ONLY  # the tables of names (light, for the command line)
from forcedphot.version import __version__


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
    return table.replace_schema_metadata(_with_provenance_metadata(table.schema.metadata, provenance))


def _with_provenance_metadata(metadata: dict | None, provenance: dict) -> dict:
    """Schema ``metadata`` with the provenance added (key ``forcedphot``)."""
    metadata = dict(metadata or {})
    metadata[b"forcedphot"] = json.dumps({"software": "forcedphot", "version": __version__, **provenance}, default=str).encode()
    return metadata


_NULLABLE = {"visit": "Int64", "detector": "Int16"}


def to_pandas(table: pa.Table) -> pd.DataFrame:
    """The catalog as a DataFrame; ``visit`` and ``detector`` keep their nulls (Int64, Int16)."""
    frame = table.to_pandas()
    for name, dtype in _NULLABLE.items():
        if name in frame:
            frame[name] = frame[name].astype(dtype)
    return frame


def output_format(path: str | Path) -> str:
    """The catalog format a file name asks for (its suffix; none: parquet), else ValueError
    listing the known ones. Checked before any measurement."""
    suffix = Path(path).suffix
    fmt = table_format(suffix) if suffix else DEFAULT_FORMAT
    if fmt is None:
        raise ValueError(f"{path}: unknown output format {suffix!r}; use one of "
                         f"{', '.join('.' + f for f in FORMATS)} (.pq, .fit and .vot also work)")
    return fmt


def to_astropy(table: pa.Table, provenance: dict | None = None) -> Table:
    """The catalog as an astropy Table: units on the columns, nulls masked, the provenance
    under ``meta["forcedphot"]``."""
    columns = []
    for field, column in zip(table.schema, table.columns):
        unit = (field.metadata or {}).get(b"unit")
        unit = unit.decode() if unit else None
        if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
            values = np.array(["" if v is None else v for v in column.to_pylist()], dtype=str)
        elif column.null_count and (pa.types.is_boolean(field.type) or pa.types.is_integer(field.type) or pa.types.is_floating(field.type)):
            filler = pa.scalar(False if pa.types.is_boolean(field.type) else 0, type=field.type)  # under the mask
            values = pc.fill_null(column, filler).to_numpy(zero_copy_only=False)
        else:
            values = column.to_numpy(zero_copy_only=False)
        if column.null_count:
            mask = column.is_null().to_numpy(zero_copy_only=False)
            columns.append(MaskedColumn(values, mask=mask, name=field.name, unit=unit))
        else:
            columns.append(Column(values, name=field.name, unit=unit))
    return Table(columns, meta={"forcedphot": _provenance(provenance or {})})


def _provenance(provenance: dict) -> dict:
    return json.loads(json.dumps({"software": "forcedphot", "version": __version__, **provenance}, default=str))


@lru_cache(maxsize=64)
def _astropy_parquet_meta(signature: tuple) -> dict[bytes, bytes]:
    """astropy's parquet metadata (``table_meta_yaml``: types and units) for a schema."""
    columns = [Column(np.zeros(0, dtype=dtype), name=name, unit=unit) for name, dtype, unit in signature]
    return {b"table_meta_yaml": "\n".join(table_meta.get_yaml_from_table(Table(columns))).encode()}


_YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml's emitter where present: ~20x faster


def _astropy_meta_lines(provenance: dict) -> tuple[str, ...]:
    """The ``meta:`` lines of astropy's YAML table header holding the provenance, as
    :func:`to_astropy` puts it (``meta["forcedphot"]``)."""
    return _yaml_meta_lines(json.dumps(provenance, default=str))


@lru_cache(maxsize=64)
def _yaml_meta_lines(provenance_json: str) -> tuple[str, ...]:
    """:func:`_astropy_meta_lines` of a provenance as JSON: once per exposure and configuration.
    The provenance holds only JSON's types (see :func:`_provenance`), which YAML's safe
    dumper writes as astropy's loader reads them; astropy's own dumper is pure Python and
    took ~25 ms for a light curve's."""
    meta = {"meta": {"forcedphot": _provenance(json.loads(provenance_json))}}
    return tuple(yaml.dump(meta, Dumper=_YAML_DUMPER, default_flow_style=None, width=130, sort_keys=False).splitlines())


@lru_cache(maxsize=64)
def _dtype(arrow_type: pa.DataType) -> str:
    """The NumPy type string astropy's header gives a column of ``arrow_type``."""
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return "U1"
    return np.dtype(arrow_type.to_pandas_dtype()).str


def _signature(schema: pa.Schema) -> tuple:
    return tuple((f.name, _dtype(f.type), ((f.metadata or {}).get(b"unit") or b"").decode() or None) for f in schema)


def string_lengths(table: pa.Table) -> dict[str, int]:
    """The longest value (characters) of each string column: astropy sizes its string
    columns from these (``table::len::<name>`` in the parquet metadata)."""
    return {field.name: pc.max(pc.utf8_length(column)).as_py() or 1
            for field, column in zip(table.schema, table.columns) if pa.types.is_string(field.type)}


def parquet_schema(schema: pa.Schema, provenance: dict, lengths: dict[str, int]) -> pa.Schema:
    """``schema`` with what a parquet catalog carries in its metadata: the provenance,
    astropy's types and units, and the string lengths ``lengths`` (see :func:`string_lengths`)."""
    metadata = dict(schema.metadata or {})
    metadata.update(_astropy_parquet_meta(_signature(schema)))
    metadata[b"table_meta_yaml"] += "\n".join(["", *_astropy_meta_lines(provenance)]).encode()  # Table.read gives it as meta
    metadata.update({f"table::len::{name}".encode(): str(max(1, n)).encode() for name, n in lengths.items()})
    return schema.with_metadata(_with_provenance_metadata(metadata, provenance))


def _parquet(table: pa.Table, provenance: dict) -> bytes:
    """Parquet bytes; dictionary-encoded only where values repeat (ids, integers, text): a
    float or flag column's dictionary costs its time and is dropped (an alert's answer is
    ~12 % smaller and ~0.3 ms faster to write)."""
    sink = io.BytesIO()
    dictionary = [f.name for f in table.schema if not (pa.types.is_floating(f.type) or pa.types.is_boolean(f.type))]
    pq.write_table(table.replace_schema_metadata(parquet_schema(table.schema, provenance, string_lengths(table)).metadata), sink,
                   use_dictionary=dictionary)
    return sink.getvalue()


def ecsv_header(schema: pa.Schema, provenance: dict) -> bytes:
    """The ECSV header of a catalog (from astropy, on no rows): columns, types, units, provenance."""
    head = io.StringIO()
    to_astropy(schema.empty_table(), provenance).write(head, format="ascii.ecsv", delimiter=",")
    return head.getvalue().encode()


def csv_rows(table: pa.Table) -> bytes:
    """The rows of ``table`` as the comma-separated lines that follow an ECSV header (pandas, fast)."""
    return to_pandas(table).to_csv(index=False, header=False, lineterminator="\n").encode()


def json_records(table: pa.Table) -> bytes:
    """The rows of ``table`` as a JSON array of records (no units)."""
    return to_pandas(table).to_json(orient="records", double_precision=15).encode()


def _ecsv(table: pa.Table, provenance: dict) -> bytes:
    return ecsv_header(table.schema, provenance) + csv_rows(table)


def _fits(table: pa.Table, provenance: dict) -> bytes:
    astropy_table = to_astropy(table)
    astropy_table.meta = {"EXTNAME": "DIAFORCEDSOURCE", "PROVJSON": json.dumps(_provenance(provenance))}
    sink = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), fits.table_to_hdu(astropy_table)]).writeto(sink)
    return sink.getvalue()


def _votable(table: pa.Table, provenance: dict) -> bytes:
    astropy_table = to_astropy(table)
    astropy_table.meta = {"description": json.dumps(_provenance(provenance))}
    sink = io.BytesIO()
    astropy_table.write(sink, format="votable")
    return sink.getvalue()


def encode_catalog(table: pa.Table, provenance: dict, fmt: str) -> bytes:
    """Serialise a catalog in one of :data:`FORMATS` (see the module docstring)."""
    if fmt == "parquet":
        return _parquet(table, provenance)
    if fmt in ("csv", "ecsv"):
        return _ecsv(table, provenance)
    if fmt == "json":
        return json_records(table)
    if fmt == "fits":
        return _fits(table, provenance)
    if fmt == "votable":
        return _votable(table, provenance)
    raise ValueError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")


def write_catalog(table: pa.Table, provenance: dict, path: str | Path) -> None:
    """Write a catalog in the format its suffix names (see :func:`output_format`), through a
    temporary file renamed into place: an interrupted write leaves no partial file."""
    path = Path(path)
    data = encode_catalog(table, provenance, output_format(path))
    temporary = path.with_name(f".{path.name}.partial")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def read_provenance(path: str | Path) -> dict:
    """The provenance a parquet catalog was written with."""
    metadata = pq.read_schema(path).metadata or {}
    return json.loads(metadata[b"forcedphot"])
