"""What a request may cost before it is parsed: object tables checked from their bytes
(parquet footer, CSV lines, JSON values), JSON bodies bounded in bytes and values, and
metric labels a client cannot grow (hostile-client probe, round 3, items 1-3)."""

import io
import json

from fastapi.testclient import TestClient
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from service_helpers import AUTH, FWHM, data_id, settings_for

from forcedphot.api.app import create_app
from forcedphot.photometry.objects import read_objects
from forcedphot.photometry.table_limits import TableLimits, TableTooLarge, json_values

MAX_OBJECTS = 1000


@pytest.fixture(scope="module")
def client(repo, tmp_path_factory):
    app = create_app(settings_for(repo["root"], tmp_path_factory.mktemp("data"), max_objects=MAX_OBJECTS))
    with TestClient(app, headers=AUTH) as c:
        yield c


def constant_parquet(rows: int, chunk: int = 1_000_000) -> bytes:
    """``rows`` identical objects, zstd and dictionary encoded: a few hundred KB for millions of rows."""
    piece = pa.table({"diaObjectId": np.ones(min(rows, chunk), np.int64), "ra": np.full(min(rows, chunk), 1.0),
                      "dec": np.full(min(rows, chunk), 1.0)})
    sink = io.BytesIO()
    with pq.ParquetWriter(sink, piece.schema, compression="zstd") as writer:
        for start in range(0, rows, chunk):
            writer.write_table(piece.slice(0, min(chunk, rows - start)))
    return sink.getvalue()


def post_table(client, content: bytes, filename: str, media_type: str):
    return client.post("/v1/forced-photometry", data={"exposure_ref": json.dumps(data_id("calexp")), "psf_fwhm": str(FWHM)},
                       files={"objects": (filename, content, media_type)})


def test_json_values_bound_every_value():
    assert json_values(b'[{"a": 1, "b": [2, 3]}, {}]') >= 6  # two records, two keys, three numbers, one list
    assert json_values(b"7") == 1


def test_a_parquet_table_of_millions_of_rows_is_refused_from_its_footer(client):
    content = constant_parquet(5_000_000)
    assert len(content) < 300_000
    response = post_table(client, content, "objects.parquet", "application/vnd.apache.parquet")
    assert response.status_code == 413, response.text
    assert "5000000 rows" in response.json()["detail"] and "objects part objects.parquet" in response.json()["detail"]


def test_a_parquet_table_too_large_decompressed_is_refused(tmp_path):
    big = pa.table({"diaObjectId": [1, 2], "ra": [1.0, 2.0], "dec": [1.0, 2.0], "note": ["x" * 3_000_000, "y" * 3_000_000]})
    sink = io.BytesIO()
    pq.write_table(big, sink, compression="zstd")
    with pytest.raises(TableTooLarge, match="once decompressed"):
        read_objects(sink.getvalue(), media_type="parquet", name="t", limits=TableLimits(max_rows=10, max_bytes=1_000_000))


def test_a_bounded_read_decodes_only_the_columns_the_engine_uses():
    table = pa.table({"diaObjectId": [1], "ra": [1.0], "dec": [1.0], "note": ["kept out"]})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    assert list(read_objects(sink.getvalue(), limits=TableLimits(max_rows=10))) == ["diaObjectId", "ra", "dec", "coord_valid"]
    assert "note" in read_objects(sink.getvalue())  # the library reads every column


@pytest.mark.parametrize("filename, media_type, content, fragment", [
    ("o.csv", "text/csv", b"diaObjectId,ra,dec\n" + b"1,1,1\n" * 5000, "5000 rows"),
    ("o.csv", "text/csv", b",".join([b"c"] * 1000) + b"\n", "1000 columns"),
    ("o.json", "application/json", b"[" + b",".join([b"{}"] * 5000) + b"]", "5000 records"),
    ("o.json", "application/json", b"[" + b",".join([b"[1,2,3]"] * 10000) + b"]", "values allowed"),
])
def test_text_tables_are_refused_before_parsing(client, filename, media_type, content, fragment):
    response = post_table(client, content, filename, media_type)
    assert response.status_code == 413 and fragment in response.json()["detail"], response.text


def test_a_json_body_of_empty_records_is_refused_while_streaming(client):
    objects = b"[" + b",".join([b"{}"] * 20_000) + b"]"
    body = b'{"exposure": ' + json.dumps(data_id("calexp")).encode() + b', "objects": ' + objects + b"}"
    for path in ("/v1/forced-photometry", "/v1/lightcurves", "/v1/jobs"):
        response = client.post(path, content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 413, (path, response.text)
        assert "values allowed" in response.json()["detail"]


def test_a_json_body_over_its_byte_limit_is_refused_from_content_length(repo, tmp_path):
    app = create_app(settings_for(repo["root"], tmp_path, max_json_body_bytes=1000))
    with TestClient(app, headers=AUTH) as small:
        response = small.post("/v1/jobs", content=b" " * 2000, headers={"Content-Type": "application/json"})
        assert response.status_code == 413 and "JSON request body (2000 bytes)" in response.json()["detail"]
        # the multipart limit is the larger one: uploads are spooled to disk
        assert post_table(small, b"diaObjectId,ra,dec\n1,1,1\n" + b" " * 2000, "o.csv", "text/csv").status_code != 413


def test_a_json_body_within_its_limits_still_measures(client, repo):
    objects = [{"diaObjectId": int(i), "ra": float(r), "dec": float(d)} for i, r, d in repo["objects"][["diaObjectId", "ra", "dec"]].to_numpy()]
    response = client.post("/v1/forced-photometry", json={"exposure": data_id("calexp"), "objects": objects, "psf_fwhm": FWHM},
                           headers={"Accept": "application/json"})
    assert response.status_code == 200, response.text


def test_unknown_methods_share_one_metric_label(client):
    for i in range(5):
        client.request(f"X{'M' * 1000}{i}", "/healthz")
    metrics = client.get("/metrics").text
    assert "MMMM" not in metrics
    assert 'method="other"' in metrics
