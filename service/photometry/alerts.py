"""Rubin alert packets (Avro, ``lsst-alert-packet``) as a DiaObject table: what a broker
receives, sent on as it came.

Two framings are read, nothing else:

* an Avro object container file (``Obj\\x01``; the package's ``Schema.store_alerts`` writes
  one): any number of alerts, under the writer schema it carries; only the ``null`` codec
  (a compressed block could expand without bound before any limit sees it);
* one Kafka message in the Confluent wire format, as Rubin's alert stream sends them: a zero
  byte, the schema id (big-endian; ``major * 100 + minor``, e.g. 1101 for v11.1) and the
  schemaless alert, read with that version of the package's schemas.

Each alert's ``diaObject`` becomes a row (``diaObjectId``, ``ra``, ``dec``, ``nDiaSources``);
alerts without one (solar-system alerts) are skipped, and an object seen in several alerts
keeps its last version. Parsing Avro is data only: nothing the client sent is executed.
"""

from __future__ import annotations

import io
from pathlib import Path
import struct

import pandas as pd

from forcedphot.photometry.objects import InputError

CONTAINER_MAGIC = b"Obj\x01"
CONFLUENT_MAGIC = b"\x00"
_OBJECT_FIELDS = ("diaObjectId", "ra", "dec", "nDiaSources")


def is_alert_stream(data: bytes) -> bool:
    """True when ``data`` starts as one of the two framings (see the module docstring)."""
    return data.startswith(CONTAINER_MAGIC) or (data.startswith(CONFLUENT_MAGIC) and len(data) > 5)


def read_alerts(data: bytes, name: str, max_alerts: int) -> pd.DataFrame:
    """The DiaObjects of the alert packets in ``data`` (columns ``diaObjectId``, ``ra``, ``dec``,
    ``nDiaSources``). ``name`` is how errors refer to the input; more than ``max_alerts``
    alerts is an :class:`InputError`, as is anything that does not parse."""
    if not is_alert_stream(data):
        raise InputError(f"{name}: not Rubin alert packets: neither an Avro container file (starting Obj\\x01) nor one Kafka "
                         "message in the Confluent wire format (a zero byte, then the schema id)")
    try:
        records = _container(data, name, max_alerts) if data.startswith(CONTAINER_MAGIC) else [_confluent(data, name)]
    except InputError:
        raise
    except Exception as exc:  # fastavro's errors: EOFError, ValueError, struct.error, KeyError, ...
        raise InputError(f"{name}: not a readable Rubin alert packet ({type(exc).__name__}: {str(exc)[:200]})") from None
    rows = []
    for number, record in enumerate(records):
        obj = record.get("diaObject") if isinstance(record, dict) else None
        if obj is None:
            continue
        missing = [field for field in _OBJECT_FIELDS[:3] if not isinstance(obj, dict) or obj.get(field) is None]
        if missing:
            raise InputError(f"{name}: alert {number} has a diaObject without {', '.join(missing)}")
        rows.append({field: obj.get(field) for field in _OBJECT_FIELDS})
    if not rows:
        raise InputError(f"{name}: none of its {len(records)} alert(s) carries a diaObject (solar-system alerts have none)")
    return pd.DataFrame.from_records(rows).drop_duplicates("diaObjectId", keep="last").reset_index(drop=True)


def _container(data: bytes, name: str, max_alerts: int) -> list[dict]:
    import fastavro

    reader = fastavro.reader(io.BytesIO(data))
    codec = reader.metadata.get("avro.codec", "null")
    if codec != "null":
        raise InputError(f"{name}: an Avro container compressed with {codec!r}; send it uncompressed (codec null)")
    records = []
    for record in reader:
        records.append(record)
        if len(records) > max_alerts:
            raise InputError(f"{name}: more than the {max_alerts} alerts allowed per request")
    return records


def _confluent(data: bytes, name: str) -> dict:
    (schema_id,) = struct.unpack(">I", data[1:5])
    major, minor = divmod(schema_id, 100)
    schema = _schema(major, minor)
    if schema is None:
        raise InputError(f"{name}: alert schema id {schema_id} (v{major}.{minor}) is not one lsst-alert-packet knows")
    stream = io.BytesIO(data[5:])
    record = _schemaless(stream, schema)
    if stream.tell() != len(data) - 5:
        raise InputError(f"{name}: {len(data) - 5 - stream.tell()} bytes follow the alert; send one Kafka message per part, "
                         "or an Avro container file for many")
    return record


def _schemaless(stream: io.BytesIO, schema) -> dict:
    import fastavro

    return fastavro.schemaless_reader(stream, schema.definition)


_SCHEMAS: dict[tuple[int, int], object] = {}


def _schema(major: int, minor: int):
    """The package's alert schema of version ``major.minor`` (loaded once), else None."""
    from lsst.alert.packet import Schema
    from lsst.alert.packet.schema import get_schema_path

    if (major, minor) not in _SCHEMAS:
        path = Path(get_schema_path(major, minor)) / f"lsst.v{major}_{minor}.alert.avsc"
        if not path.is_file():
            return None
        _SCHEMAS[(major, minor)] = Schema.from_file(str(path))
    return _SCHEMAS[(major, minor)]
