"""What a DiaObject table may cost, checked from its bytes before anything is decoded.

A few hundred kilobytes can declare gigabytes: a zstd parquet file of 60 million constant
rows, a JSON array of a million empty records (each parsed into a Python object about 40
times its size), a CSV file of short lines. The checks here read only what is cheap: a
parquet file's footer (row count, columns, uncompressed size), and byte counts of the
text formats (a newline per CSV row; a JSON value per ``,``, ``:``, ``[`` or ``{``, an
upper bound that needs no parse).
"""

from __future__ import annotations

from dataclasses import dataclass
import io

import pyarrow as pa
import pyarrow.parquet as pq

#: bytes that precede every JSON value but the first: a value counts at most one of them
_JSON_VALUE_MARKS = (b",", b":", b"[", b"{")


class TableTooLarge(ValueError):
    """A table declares more than its limits allow; the message names the table and the limit."""


@dataclass(frozen=True)
class TableLimits:
    """Bounds on one object table.

    Attributes
    ----------
    max_rows : int
        Rows (DiaObjects).
    max_bytes : int
        Bytes as sent, and bytes decoded (parquet's uncompressed column chunks).
    max_columns : int
        Columns.
    max_json_values : int
        JSON values (keys included): each becomes a Python object when parsed.
    """

    max_rows: int
    max_bytes: int = 64 * 2**20
    max_columns: int = 256
    max_json_values: int = 4_000_000


def json_values(data: bytes) -> int:
    """An upper bound on the number of values (keys included) in a JSON text: every value
    but the first follows a ``,``, ``:``, ``[`` or ``{`` (marks inside strings only
    raise the bound). Runs at memory speed, parses nothing."""
    return 1 + sum(data.count(mark) for mark in _JSON_VALUE_MARKS)


def check_json(data: bytes, limits: TableLimits, name: str) -> None:
    """Refuse a JSON table whose bytes or values exceed ``limits`` (before parsing it)."""
    check_size(len(data), limits, name)
    values = json_values(data)
    if values > limits.max_json_values:
        raise TableTooLarge(f"{name}: the JSON holds up to {values} values, more than the {limits.max_json_values} values allowed; "
                            "send large tables as parquet")
    records = data.count(b"{")  # a record is an object: at most this many
    if records > limits.max_rows:
        raise TableTooLarge(f"{name}: up to {records} records, more than the {limits.max_rows} DiaObjects allowed")


def check_csv(data: bytes, limits: TableLimits, name: str) -> None:
    """Refuse a CSV table whose bytes, rows (lines after the header) or header columns
    exceed ``limits`` (before parsing it)."""
    check_size(len(data), limits, name)
    lines = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
    if lines - 1 > limits.max_rows:
        raise TableTooLarge(f"{name}: up to {lines - 1} rows, more than the {limits.max_rows} DiaObjects allowed")
    columns = data[:data.find(b"\n")].count(b",") + 1 if b"\n" in data else data.count(b",") + 1
    if columns > limits.max_columns:
        raise TableTooLarge(f"{name}: {columns} columns, more than the {limits.max_columns} allowed")


def check_parquet(data: bytes, limits: TableLimits, name: str) -> None:
    """Refuse a parquet table whose footer declares more rows, columns or decoded bytes
    than ``limits`` allow; only the footer is read. A footer that cannot be read is left
    to the reader, which names the problem."""
    check_size(len(data), limits, name)
    try:
        metadata = pq.ParquetFile(io.BytesIO(data)).metadata
    except (pa.ArrowException, OSError, ValueError):
        return
    if metadata.num_rows > limits.max_rows:
        raise TableTooLarge(f"{name}: {metadata.num_rows} rows, more than the {limits.max_rows} DiaObjects allowed")
    if metadata.num_columns > limits.max_columns:
        raise TableTooLarge(f"{name}: {metadata.num_columns} columns, more than the {limits.max_columns} allowed")
    decoded = sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
    if decoded > limits.max_bytes:
        raise TableTooLarge(f"{name}: {decoded} bytes once decompressed, more than the {limits.max_bytes} allowed")


def check_size(size: int, limits: TableLimits, name: str) -> None:
    """Refuse a table of ``size`` bytes beyond ``limits`` (before it is read into memory)."""
    if size > limits.max_bytes:
        raise TableTooLarge(f"{name}: {size} bytes, more than the {limits.max_bytes} allowed for an object table")


CHECKS = {"json": check_json, "csv": check_csv, "parquet": check_parquet}
