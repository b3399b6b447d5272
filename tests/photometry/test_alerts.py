"""Rubin alert packets (written here with ``lsst-alert-packet``'s own schema and writer) as the
DiaObject input: Avro container files of many alerts, single Kafka messages in the Confluent
wire format, as files and as uploads; what does not parse is a named 422."""

import copy
import io
import struct

from fastapi.testclient import TestClient
import fastavro
from lsst.alert.packet import Schema
from lsst.alert.packet.schema import get_latest_schema_version, get_schema_path
from lsst.alert.packet.simulate import simulate_alert
import pandas as pd
import pytest
from service_helpers import AUTH, FWHM, assert_same_catalog, data_id, engine_catalog, settings_for

from forcedphot.api.app import create_app
from forcedphot.cli import main as cli_main
from forcedphot.photometry.objects import InputError, read_objects

SCHEMA = Schema.from_file()
MAJOR, MINOR = get_latest_schema_version()
OBJECT_SCHEMA = Schema.from_file(f"{get_schema_path(MAJOR, MINOR)}/lsst.v{MAJOR}_{MINOR}.diaObject.avsc")


def alert(dia_object_id: int | None, ra: float = 0.0, dec: float = 0.0, n_dia_sources: int = 3) -> dict:
    """One alert of the current schema (random contents), its diaObject at (ra, dec), or none."""
    packet = simulate_alert(copy.deepcopy(SCHEMA.definition))
    packet["diaObject"] = None if dia_object_id is None else dict(
        simulate_alert(copy.deepcopy(OBJECT_SCHEMA.definition)), diaObjectId=dia_object_id, ra=ra, dec=dec, nDiaSources=n_dia_sources)
    assert SCHEMA.validate(packet)
    return packet


def container(packets: list[dict], codec: str = "null") -> bytes:
    buffer = io.BytesIO()
    if codec == "null":
        SCHEMA.store_alerts(buffer, packets)
    else:
        fastavro.writer(buffer, SCHEMA.definition, packets, codec=codec)
    return buffer.getvalue()


def kafka_message(packet: dict, schema_id: int | None = None) -> bytes:
    return b"\x00" + struct.pack(">I", schema_id or SCHEMA.get_schema_id()) + SCHEMA.serialize(packet)


def test_a_container_of_alerts_gives_their_dia_objects():
    packets = [alert(7, 10.0, -5.0), alert(None), alert(8, 10.1, -5.1), alert(7, 10.2, -5.0, n_dia_sources=4)]
    frame = read_objects(container(packets), media_type="avro")
    assert frame["diaObjectId"].tolist() == [8, 7]  # the solar-system alert skipped; object 7 keeps its last version
    assert frame.set_index("diaObjectId").loc[7, ["ra", "nDiaSources"]].tolist() == [10.2, 4]


def test_one_kafka_message_gives_its_dia_object():
    frame = read_objects(kafka_message(alert(2**62 + 1, 150.0, 2.0)), media_type="application/avro")
    assert frame["diaObjectId"].tolist() == [2**62 + 1] and frame["ra"].tolist() == [150.0]


@pytest.mark.parametrize("data, fragment", [
    (b"Obj\x01" + b"\x07" * 40, "not a readable Rubin alert packet"),
    (b"\x00" + struct.pack(">I", 9999) + b"\x02\x04", "schema id 9999 (v99.99) is not one lsst-alert-packet knows"),
    (lambda: kafka_message(alert(1))[:-30], "not a readable Rubin alert packet"),
    (lambda: kafka_message(alert(1)) + b"\x00\x00", "2 bytes follow the alert"),
    (lambda: container([alert(1)], codec="deflate"), "compressed with 'deflate'"),
    (lambda: container([alert(None)]), "none of its 1 alert(s) carries a diaObject"),
    (b"PAR1 not avro", "not Rubin alert packets: neither an Avro container file"),
])
def test_what_does_not_parse_is_named(data, fragment):
    with pytest.raises(InputError, match="alerts.avro: .*" + fragment.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        read_objects(data() if callable(data) else data, media_type="avro", name="alerts.avro")


def test_uploaded_alerts_are_measured_like_a_table(repo, tmp_path):
    objects = repo["objects"]
    packets = [alert(int(row.diaObjectId), float(row.ra), float(row.dec)) for row in objects.itertuples()]
    expected = engine_catalog(repo["calexp"], objects)
    with TestClient(create_app(settings_for(repo["root"], tmp_path / "data"))) as client:
        for content, media_type in ((container(packets), "application/avro"), (kafka_message(packets[0]), "application/avro"),
                                    (container(packets), "application/octet-stream")):
            answer = client.post("/v1/forced-photometry", headers=AUTH, data={"exposure_ref": '{"uri": "1234/42/calexp.fits"}',
                                                                              "psf_fwhm": str(FWHM)},
                                 files={"objects": ("alerts.avro", content, media_type)})
            assert answer.status_code == 200, answer.text
            got = pd.read_parquet(io.BytesIO(answer.content))
            single = len(content) < 20_000  # the Kafka message: the first object alone
            assert_same_catalog(got, engine_catalog(repo["calexp"], objects.iloc[:1]) if single else expected)
        bad = client.post("/v1/forced-photometry", headers=AUTH, data={"exposure_ref": '{"uri": "1234/42/calexp.fits"}'},
                          files={"objects": ("alerts.avro", b"Obj\x01garbage", "application/avro")})
        assert bad.status_code == 422 and "alerts.avro" in bad.json()["detail"] and "alert packet" in bad.json()["detail"]
        referenced = client.post("/v1/forced-photometry", headers=AUTH,
                                 json={"exposure": data_id(), "objects": [{"diaObjectId": 1, "ra": 0, "dec": 0}], "psf_fwhm": FWHM})
        assert referenced.status_code == 200


def test_the_command_line_reads_an_alert_file(repo, tmp_path, capsys):
    objects = repo["objects"]
    path = tmp_path / "alerts.avro"
    path.write_bytes(container([alert(int(row.diaObjectId), float(row.ra), float(row.dec)) for row in objects.itertuples()]))
    out = tmp_path / "forced.parquet"
    assert cli_main(["measure", str(repo["calexp"]), str(path), "--psf-fwhm", str(FWHM), "--backend", "numpy", "-o", str(out)]) == 0
    assert sorted(pd.read_parquet(out)["diaObjectId"]) == sorted(objects["diaObjectId"])[:-1]  # the last is off the detector
