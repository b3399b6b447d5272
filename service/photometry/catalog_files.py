"""Catalogs larger than memory: parts on disk merged into one parquet file, and a parquet
catalog converted to another format, a bounded number of rows at a time.

A batch job writes one part per exposure as it goes (:func:`write_part`), then
:func:`merge_parts` streams them into one file: in the order measured, or as light curves
(by ``diaObjectId``, then time), taking one range of object ids at a time. What is held
in memory is one part, or one id range of about ``chunk_rows`` rows, never the catalog.
"""

from __future__ import annotations

from collections.abc import Iterator
import os
from pathlib import Path
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from forcedphot.photometry.formats import csv_rows, ecsv_header, encode_catalog, json_records, parquet_schema, read_provenance, string_lengths
from forcedphot.photometry.lightcurve import sort_lightcurves
from forcedphot.photometry.lightcurve_products import Products, correct_baseline, make_products, with_epoch_columns

CHUNK_ROWS = 100_000  # rows held at once by a merge or a conversion (a catalog row is ~600 bytes)
STREAMED_FORMATS = ("parquet", "csv", "ecsv", "json")  # converted a batch at a time; FITS and VOTable need the whole table


def write_part(table: pa.Table, path: Path) -> Path:
    """Write one part (a plain parquet file; the merge adds the catalog's metadata)."""
    pq.write_table(table, path)
    return path


def merge_parts(parts: list[Path], path: Path, provenance: dict, *, lightcurve: bool, chunk_rows: int = CHUNK_ROWS,
                products: Products | None = None) -> int:
    """Write the rows of ``parts`` (parquet files of one schema) to ``path`` as one parquet
    catalog with ``provenance``; rows as the parts hold them, or sorted as light curves
    (``lightcurve``), made into ``products`` (default: the epochs with their magnitudes,
    limits and epochStatus; see :mod:`~forcedphot.photometry.lightcurve_products`) one
    range of objects at a time, what was done in the provenance (``products``). Returns the
    number of rows written."""
    dataset = ds.dataset([str(p) for p in parts], format="parquet")
    strings = [f.name for f in dataset.schema if pa.types.is_string(f.type)]  # small columns: read whole for their lengths
    lengths = string_lengths(dataset.to_table(columns=strings))
    if not lightcurve:
        return _write(path, parquet_schema(dataset.schema, provenance, lengths), _in_order(parts))
    products = products or Products()
    shape, done = make_products(dataset.schema.empty_table(), products)
    if products.baseline is not None:  # a first pass for the baselines, which the provenance holds before any row
        done["baseline"] = [summary for chunk in _by_object_ranges(dataset, chunk_rows)
                            for summary in correct_baseline(with_epoch_columns(chunk, products.snr_limit), products.baseline)[1]]
    chunks = (make_products(chunk, products)[0] for chunk in _by_object_ranges(dataset, chunk_rows))
    return _write(path, parquet_schema(shape.schema, {**provenance, "products": done}, lengths), chunks)


def _write(path: Path, schema: pa.Schema, tables: Iterator[pa.Table]) -> int:
    """Write ``tables`` to ``path`` as one parquet file of ``schema``; returns the rows."""
    rows = 0
    with pq.ParquetWriter(path, schema) as writer:
        for table in tables:
            writer.write_table(table.replace_schema_metadata(schema.metadata))
            rows += table.num_rows
    return rows


def _in_order(parts: list[Path]) -> Iterator[pa.Table]:
    for part in parts:
        yield pq.read_table(part)


def _by_object_ranges(dataset: ds.Dataset, chunk_rows: int) -> Iterator[pa.Table]:
    """The rows sorted as light curves, one range of object ids (about ``chunk_rows`` rows) at a time."""
    ids = np.sort(dataset.to_table(columns=["diaObjectId"]).column(0).to_numpy())  # 8 bytes a row
    if ids.size == 0:
        return
    cuts = np.unique(ids[::chunk_rows][1:])  # each range starts at a new id: an object's rows stay together
    edges = [ids[0], *cuts.tolist()]
    field = ds.field("diaObjectId")
    for i, low in enumerate(edges):
        selected = field >= low if i == len(edges) - 1 else (field >= low) & (field < edges[i + 1])
        yield sort_lightcurves(dataset.to_table(filter=selected))


def convert(source: Path, fmt: str, path: Path, chunk_rows: int = CHUNK_ROWS) -> None:
    """Write the parquet catalog ``source`` as ``fmt`` to ``path`` through a temporary file
    renamed into place. CSV, ECSV and JSON are written ``chunk_rows`` rows at a time; FITS
    and VOTable are made from the whole table (callers bound its size)."""
    provenance = {k: v for k, v in read_provenance(source).items() if k not in ("software", "version")}
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")  # concurrent writers never share one
    try:
        with open(temporary, "wb") as out:
            if fmt in STREAMED_FORMATS and fmt != "parquet":
                _write_streamed(pq.ParquetFile(source), fmt, provenance, out, chunk_rows)
            else:
                out.write(encode_catalog(pq.read_table(source), provenance, fmt))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _write_streamed(catalog: pq.ParquetFile, fmt: str, provenance: dict, out, chunk_rows: int) -> None:
    if fmt in ("csv", "ecsv"):
        out.write(ecsv_header(catalog.schema_arrow, provenance))
    else:
        out.write(b"[")
    first = True
    for batch in catalog.iter_batches(batch_size=chunk_rows):
        table = pa.Table.from_batches([batch])
        if fmt in ("csv", "ecsv"):
            out.write(csv_rows(table))
        elif table.num_rows:
            out.write((b"" if first else b",") + json_records(table)[1:-1])
            first = False
    if fmt == "json":
        out.write(b"]")


__all__ = ["CHUNK_ROWS", "STREAMED_FORMATS", "convert", "merge_parts", "write_part"]
