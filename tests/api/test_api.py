"""In-process tests of the HTTP API (FastAPI TestClient): every endpoint and its errors,
checked against the engine run directly on the same files."""

import io
import json
import threading
import time

from fastapi.testclient import TestClient
import numpy as np
import pandas as pd
import pytest
from service_helpers import API_KEY, AUTH, DETECTOR, FWHM, N_ON, VISIT, assert_same_catalog, data_id, engine_catalog, read_parquet, settings_for

from forcedphot.api.app import create_app
from forcedphot.api.negotiation import choose_format
from forcedphot.api.problems import PROBLEM_MEDIA_TYPE


@pytest.fixture(scope="module")
def client(repo, tmp_path_factory):
    app = create_app(settings_for(repo["root"], tmp_path_factory.mktemp("data"), max_objects=1000, max_body_bytes=4 * 2**20))
    with TestClient(app, headers=AUTH) as c:
        yield c


def body(**extra):
    return {"exposure": data_id("calexp"), "objects": {"uri": "tables/objects.parquet"}, "psf_fwhm": FWHM, **extra}


def records(objects: pd.DataFrame) -> list[dict]:
    """Rows as JSON-ready dicts of Python numbers (floats round-trip exactly through JSON)."""
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()} for row in objects.to_dict(orient="records")]


def assert_problem(response, status: int, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_MEDIA_TYPE)
    problem = response.json()
    assert problem["status"] == status and problem["type"].startswith("urn:forcedphot:problem:")
    for fragment in fragments:
        assert fragment in problem["detail"], problem["detail"]
    return problem


# --- operations endpoints ------------------------------------------------------------------


def test_health_ready_info_docs_without_secrets(client):
    assert client.get("/healthz", headers={}).json()["status"] == "ok"
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["backend"] == "numpy:cpu"
    info = client.get("/v1/info").json()
    assert info["backend"] == {"name": "numpy", "device": "cpu"}
    assert info["settings"]["auth"] == "api-key" and info["settings"]["demo_mode"] is False
    assert API_KEY not in json.dumps(info) and "repository_roots" not in info["settings"]
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/forced-photometry", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/result", "/healthz", "/readyz"} <= set(paths)
    content = paths["/v1/forced-photometry"]["post"]["requestBody"]["content"]
    assert set(content) == {"application/json", "multipart/form-data"}


def test_readyz_fails_when_a_root_is_unreadable(repo, tmp_path):
    missing = tmp_path / "gone"
    missing.mkdir()
    app = create_app(settings_for(missing, tmp_path / "data"))
    with TestClient(app) as c:
        missing.rmdir()
        assert_problem(c.get("/readyz"), 503, "not a readable directory")
        assert c.get("/healthz").status_code == 200


def test_measurements_psf_answers_the_psf_columns_and_a_bad_value_names_the_field(client, repo):
    every = read_parquet(client.post("/v1/forced-photometry", json=body()).content)
    answer = client.post("/v1/forced-photometry", json=body(measurements="psf"))
    assert answer.status_code == 200, answer.text
    psf = read_parquet(answer.content)
    assert "apFlux_3" in every.columns and not any(c.startswith(("apFlux", "localBackground_")) for c in psf.columns)
    assert list(psf.columns) == [c for c in every.columns if c in set(psf.columns)] and "psfFlux_flag_edge" in psf.columns
    np.testing.assert_array_equal(psf["psfFlux"], every["psfFlux"])
    problem = assert_problem(client.post("/v1/forced-photometry", json=body(measurements="apertures")), 422, "measurements")
    assert "'all' or 'psf'" in json.dumps(problem)
    by_form = upload(client, repo, measurements="psf")
    assert by_form.status_code == 200, by_form.text
    assert list(read_parquet(by_form.content).columns) == list(psf.columns)


def test_metrics_count_requests_objects_and_cache(client):
    client.post("/v1/forced-photometry", json=body())
    text = client.get("/metrics").text
    assert 'forcedphot_http_requests_total{method="POST",route="/v1/forced-photometry",status="200"}' in text
    measured = [line for line in text.splitlines() if line.startswith("forcedphot_objects_measured_total")]
    assert measured and float(measured[0].split()[-1]) >= N_ON
    assert 'forcedphot_exposure_cache_requests_total{outcome="hit"}' in text or 'outcome="miss"' in text
    assert "forcedphot_job_queue_depth 0.0" in text


# --- forced photometry: results ------------------------------------------------------------


def test_data_id_request_equals_engine_and_reports_counts(client, repo):
    response = client.post("/v1/forced-photometry", json=body(difference=data_id("difference")))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/vnd.apache.parquet"
    expected = engine_catalog(repo["calexp"], repo["objects"], repo["difference"])
    assert_same_catalog(read_parquet(response.content), expected)
    h = response.headers
    assert (h["x-objects-in"], h["x-objects-measured"], h["x-objects-off-detector"]) == (str(N_ON + 1), str(N_ON), "1")
    timing = dict(part.strip().split(";dur=") for part in h["server-timing"].split(","))
    assert set(timing) == {"parse", "read", "select", "stage", "kernels", "catalog", "encode"}
    assert all(float(v) >= 0 for v in timing.values())


def test_uri_reference_inline_records_and_csv_table_agree(client, repo):
    expected = engine_catalog(repo["calexp"], repo["objects"])
    by_uri = client.post("/v1/forced-photometry", json=body(exposure={"uri": f"{VISIT}/{DETECTOR}/calexp.fits"}))
    inline = client.post("/v1/forced-photometry", json=body(objects=records(repo["objects"])))
    csv_table = client.post("/v1/forced-photometry", json=body(objects={"uri": "tables/objects.csv"}))
    for response in (by_uri, inline, csv_table):
        assert response.status_code == 200, response.text
        assert_same_catalog(read_parquet(response.content), expected)


def test_second_request_hits_the_exposure_cache(client):
    client.post("/v1/forced-photometry", json=body())
    assert client.post("/v1/forced-photometry", json=body()).headers["x-exposure-cache"] == "hit"


@pytest.mark.parametrize("accept, media_type", [
    ("application/json", "application/json"),
    ("text/csv", "text/csv"),
    ("text/csv;q=0.5, application/json;q=0.9", "application/json"),
    ("*/*", "application/vnd.apache.parquet"),
    ("text/*", "text/csv"),
])
def test_accept_negotiation(client, repo, accept, media_type):
    response = client.post("/v1/forced-photometry", json=body(apertures=[3, 6]), headers={"Accept": accept})
    assert response.status_code == 200 and response.headers["content-type"].startswith(media_type)
    expected = engine_catalog(repo["calexp"], repo["objects"], apertures_px=(3.0, 6.0))
    if media_type == "application/json":
        got = pd.DataFrame(response.json())
    elif media_type == "text/csv":
        got = pd.read_csv(io.StringIO(response.text), comment="#")
    else:
        got = read_parquet(response.content)
    assert sorted(got["diaObjectId"]) == sorted(expected["diaObjectId"])
    merged = got.merge(expected, on="diaObjectId", suffixes=("", "_engine"))
    np.testing.assert_allclose(merged["apFlux_6"], merged["apFlux_6_engine"], rtol=1e-6)
    assert "apFlux_4_5" not in got.columns


def test_choose_format_rules():
    assert choose_format(None) == "parquet"
    assert choose_format("application/x-parquet") == "parquet"
    assert choose_format("text/html") is None
    assert choose_format("application/json;q=0, */*;q=0.1") == "parquet"
    assert choose_format("text/csv, application/json") == "csv"
    assert choose_format("application/json;q=abc") is None


def test_not_acceptable_is_406(client):
    assert_problem(client.post("/v1/forced-photometry", json=body(), headers={"Accept": "text/html"}), 406, "text/html")


def test_invalid_coordinates_are_returned_flagged(client, repo):
    rows = records(repo["objects"])
    rows[0]["ra"], rows[1]["dec"] = None, 95.0
    response = client.post("/v1/forced-photometry", json=body(objects=rows), headers={"Accept": "application/json"})
    assert response.status_code == 200 and response.headers["x-objects-invalid-coordinates"] == "2"
    got = pd.DataFrame(response.json()).set_index("diaObjectId")
    assert got.loc[[100, 101], "coord_flag"].all() and not got.drop(index=[100, 101])["coord_flag"].any()


def test_decl_column_is_accepted(client, repo):
    rows = records(repo["objects"].rename(columns={"dec": "decl"}))
    response = client.post("/v1/forced-photometry", json=body(objects=rows))
    assert response.status_code == 200 and response.headers["x-objects-measured"] == str(N_ON)


# --- multipart uploads ---------------------------------------------------------------------


def upload(client, repo, *, objects_bytes=None, objects_type="application/vnd.apache.parquet", exposure=None, **fields):
    buffer = io.BytesIO()
    repo["objects"].to_parquet(buffer, index=False)
    files = {"exposure": ("calexp.fits", exposure if exposure is not None else repo["calexp"].read_bytes(), "application/fits"),
             "objects": ("objects.parquet", objects_bytes if objects_bytes is not None else buffer.getvalue(), objects_type)}
    return client.post("/v1/forced-photometry", files=files, data={"psf_fwhm": str(FWHM), **fields})


def test_multipart_upload_equals_engine(client, repo):
    response = upload(client, repo, apertures="3,6")
    assert response.status_code == 200, response.text
    assert response.headers["x-exposure-cache"] == "bypass"
    assert_same_catalog(read_parquet(response.content), engine_catalog(repo["calexp"], repo["objects"], apertures_px=(3.0, 6.0)))
    assert not list((client.app.state.runtime.upload_dir).glob("*")), "uploads must be deleted"


def test_multipart_csv_objects_and_reference_exposure(client, repo):
    csv = repo["objects"].to_csv(index=False).encode()
    files = {"objects": ("objects.csv", csv, "text/csv")}
    response = client.post("/v1/forced-photometry", files=files,
                           data={"exposure_ref": json.dumps(data_id()), "psf_fwhm": str(FWHM)})
    assert response.status_code == 200, response.text
    assert_same_catalog(read_parquet(response.content), engine_catalog(repo["calexp"], repo["objects"]))


def test_multipart_errors(client, repo):
    assert_problem(upload(client, repo, objects_type="image/png"), 415, "image/png")
    assert_problem(upload(client, repo, exposure=b"SIMPLE  = nonsense"), 422, "upload")
    assert_problem(upload(client, repo, objects_bytes=b"not a parquet file"), 422, "objects part objects.parquet")
    assert_problem(upload(client, repo, psf_fwhm="-1"), 422, "psf_fwhm")
    only_objects = client.post("/v1/forced-photometry", files={"objects": ("o.csv", b"diaObjectId,ra,dec\n1,150,2\n", "text/csv")})
    assert_problem(only_objects, 422, "'exposure'")
    assert_problem(client.post("/v1/forced-photometry", files={"x": ("a", b"1")}), 422, "unknown form field")
    as_file = client.post("/v1/forced-photometry", files={"psf_fwhm": ("f", b"3")}, data={"exposure_ref": json.dumps(data_id())})
    assert_problem(as_file, 422, "'psf_fwhm' must be a plain field")
    assert not list((client.app.state.runtime.upload_dir).glob("*"))


# --- bad input: every error is problem+json, never 500 --------------------------------------


@pytest.mark.parametrize("objects, status, fragment", [
    ([{"diaObjectId": 1, "ra": 150.0}], 422, "missing column(s) dec"),
    ([{"diaObjectId": 5, "ra": 150.0, "dec": 2.0}, {"diaObjectId": 5, "ra": 150.1, "dec": 2.0}], 422, "duplicate diaObjectId 5"),
    ([], 422, "empty"),
    ([{"diaObjectId": 1.5, "ra": 150.0, "dec": 2.0}], 422, "diaObjectId must hold signed 64-bit integers"),
    ([{"diaObjectId": 18446744073709551615, "ra": 150.0, "dec": 2.0}], 422, "row 0 (18446744073709551615)"),
    ([{"diaObjectId": 2**63, "ra": 150.0, "dec": 2.0}], 422, "row 0 (9223372036854775808)"),
    ([{"diaObjectId": 1e19, "ra": 150.0, "dec": 2.0}], 422, "row 0 (1e+19)"),
    ([{"diaObjectId": 1, "ra": True, "dec": 2.0}], 422, "true/false"),
    ([{"diaObjectId": 1, "ra": "east", "dec": 2.0}], 422, "column ra must be numeric"),
    ([{"diaObjectId": 1, "ra": [1, 2], "dec": 2.0}], 422, "row 0 column 'ra'"),
    ({"uri": "tables/missing.parquet"}, 404, "tables/missing.parquet"),
])
def test_bad_objects(client, objects, status, fragment):
    assert_problem(client.post("/v1/forced-photometry", json=body(objects=objects)), status, fragment)


def test_unknown_and_unreadable_exposures(client, repo):
    assert_problem(client.post("/v1/forced-photometry", json=body(exposure={"visit": 9, "detector": 1, "datasetType": "calexp"})),
                   404, "9/1/calexp.fits")
    (repo["root"] / "broken.fits").write_bytes(b"SIMPLE  =                    T" + b" " * 50)
    assert_problem(client.post("/v1/forced-photometry", json=body(exposure={"uri": "broken.fits"})), 422, "broken.fits")
    (repo["root"] / "a-directory").mkdir(exist_ok=True)
    assert_problem(client.post("/v1/forced-photometry", json=body(exposure={"uri": "a-directory"})), 404, "not a file")


def test_request_schema_errors(client):
    assert_problem(client.post("/v1/forced-photometry", content=b"{not json", headers={"Content-Type": "application/json"}), 422, "body")
    assert_problem(client.post("/v1/forced-photometry", json=body(apertures=[0])), 422, "apertures")
    assert_problem(client.post("/v1/forced-photometry", json=body(psf_fwhm=1000)), 422, "psf_fwhm")
    for tiny in (0.1, 0.05, 1e-9):  # an empty background annulus made these a 500
        assert_problem(client.post("/v1/forced-photometry", json=body(psf_fwhm=tiny)), 422, "psf_fwhm")
    assert_problem(client.post("/v1/forced-photometry", json={**body(), "surprise": 1}), 422, "surprise")
    assert_problem(client.post("/v1/forced-photometry", json=body(exposure={"visit": 1, "detector": 2, "datasetType": "raw"})), 422)
    assert_problem(client.post("/v1/forced-photometry", content=b"hello", headers={"Content-Type": "text/plain"}), 415, "text/plain")


@pytest.mark.parametrize("route, fields, expected", [
    ("/v1/lightcurves", {"objects": {"ra": 400, "dec": 2}}, "objects.ra: Input should be less than 360"),
    ("/v1/lightcurves", {"objects": {"apdb": {"min_dia_sources": 0}}}, "objects.apdb.min_dia_sources: Input should be greater than or equal to 1"),
    ("/v1/forced-photometry", {"objects": {"uri": 5}}, "objects.uri: Input should be a valid string"),
    ("/v1/forced-photometry", {"objects": {"ra": 1, "dec": 2}}, 'objects: objects are a list of records (diaObjectId, ra, dec), {"uri"'),
    ("/v1/forced-photometry", {"exposure": {"visit": "one", "detector": 2, "datasetType": "calexp"}}, "exposure.visit: Input should be a valid integer"),
    ("/v1/forced-photometry", {"difference": {"path": "x.fits"}}, 'difference: an exposure is {"uri": path in the repository} or a data id'),
])
def test_a_union_field_reports_the_errors_of_the_form_meant(client, route, fields, expected):
    """Issue 23, item 10: one error for the form the value takes, not one per member of the union."""
    request = {**body(), **fields} if route == "/v1/forced-photometry" else fields
    problem = client.post(route, json=request).json()
    assert problem["status"] == 422 and f"body.{expected}" in problem["detail"] and len(problem["errors"]) == 1, problem


def test_missing_psf_is_422(client):
    response = client.post("/v1/forced-photometry", json={"exposure": data_id(), "objects": {"uri": "tables/objects.parquet"}})
    assert_problem(response, 422, "no PSF given")


def test_unknown_route_and_method_are_problems(client):
    assert_problem(client.get("/v1/nothing"), 404)
    assert_problem(client.get("/v1/forced-photometry"), 405)


# --- references may not leave the repository -----------------------------------------------


@pytest.mark.parametrize("uri, status", [
    ("../outside.fits", 403),
    ("1234/../../outside.fits", 403),
    ("/etc/passwd", 403),
    ("~/x.fits", 403),
    ("http://example.org/calexp.fits", 400),
    ("file:///etc/passwd", 400),
    ("s3://bucket/calexp.fits", 400),
    ("C:\\data\\calexp.fits", 400),
    ("a\x00b", 400),
    ("tables\\..\\..\\x", 400),
])
def test_path_traversal_refused(client, uri, status):
    assert_problem(client.post("/v1/forced-photometry", json=body(exposure={"uri": uri})), status)
    assert_problem(client.post("/v1/forced-photometry", json=body(objects={"uri": uri})), status)


def test_symlinks_out_of_the_root_are_refused_inside_followed(client, repo, tmp_path):
    outside = tmp_path / "secret.fits"
    outside.write_bytes(repo["calexp"].read_bytes())
    (repo["root"] / "escape.fits").symlink_to(outside)
    (repo["root"] / "escape-dir").symlink_to(tmp_path, target_is_directory=True)
    (repo["root"] / "alias.fits").symlink_to(repo["calexp"])
    assert_problem(client.post("/v1/forced-photometry", json=body(exposure={"uri": "escape.fits"})), 403, "leads out")
    assert_problem(client.post("/v1/forced-photometry", json=body(exposure={"uri": "escape-dir/secret.fits"})), 403, "leads out")
    assert client.post("/v1/forced-photometry", json=body(exposure={"uri": "alias.fits"})).status_code == 200


# --- authentication -------------------------------------------------------------------------


def test_api_key_required_and_checked(client):
    anonymous = client.post("/v1/forced-photometry", json=body(), headers={"Authorization": ""})
    assert_problem(anonymous, 401, "API key")
    assert anonymous.headers["www-authenticate"].startswith("Bearer")
    assert_problem(client.post("/v1/forced-photometry", json=body(), headers={"Authorization": "Bearer wrong-key-123456789"}), 401, "not valid")
    assert_problem(client.post("/v1/forced-photometry", json=body(), headers={"Authorization": f"Basic {API_KEY}"}), 401)
    assert_problem(client.get("/v1/info", headers={"Authorization": ""}), 401)
    assert_problem(client.get("/v1/jobs/abc", headers={"Authorization": ""}), 401)
    assert client.get("/healthz", headers={"Authorization": ""}).status_code == 200
    assert client.get("/metrics", headers={"Authorization": ""}).status_code == 200


def test_keys_are_never_shown(repo, tmp_path, caplog):
    settings = settings_for(repo["root"], tmp_path)
    assert API_KEY not in repr(settings) and API_KEY not in str(settings.public())
    with caplog.at_level("DEBUG"), TestClient(create_app(settings)) as c:
        c.post("/v1/forced-photometry", json=body(), headers={"Authorization": "Bearer not-the-key-xxxxxxxx"})
        c.post("/v1/forced-photometry", json=body(), headers=AUTH)
    assert API_KEY not in caplog.text and "not-the-key" not in caplog.text


# --- limits ---------------------------------------------------------------------------------


def test_body_too_large_is_413_declared_or_streamed(client):
    big = b"x" * (4 * 2**20 + 1)
    declared = assert_problem(client.post("/v1/forced-photometry", content=big, headers={"Content-Type": "application/json"}), 413, "larger than")

    def chunks():
        for _ in range(5):
            yield b" " * 2**20

    streamed = client.post("/v1/forced-photometry", content=chunks(), headers={"Content-Type": "application/json"})
    assert assert_problem(streamed, 413, "larger than")["type"] == declared["type"]  # one slug for both


def test_too_many_objects_is_413(client):
    rows = [{"diaObjectId": i, "ra": 150.0, "dec": 2.0} for i in range(1001)]
    assert_problem(client.post("/v1/forced-photometry", json=body(objects=rows)), 413, "1001 DiaObjects")


def test_concurrency_limit_is_429_with_retry_after(repo, tmp_path):
    app = create_app(settings_for(repo["root"], tmp_path, max_concurrent_requests=1, retry_after_seconds=3))
    runtime = app.state.runtime
    entered, release = threading.Event(), threading.Event()
    real_run = runtime.service.run

    def slow_run(task, progress=None):
        entered.set()
        release.wait(10)
        return real_run(task, progress)

    runtime.service.run = slow_run
    with TestClient(app, headers=AUTH) as c:
        first: dict = {}
        worker = threading.Thread(target=lambda: first.setdefault("r", c.post("/v1/forced-photometry", json=body())))
        worker.start()
        assert entered.wait(10)
        refused = c.post("/v1/forced-photometry", json=body())
        started = time.perf_counter()
        health = c.get("/healthz")  # the event loop answers while a measurement holds its thread
        health_seconds = time.perf_counter() - started
        release.set()
        worker.join(10)
    assert_problem(refused, 429, "in flight")
    assert 3 <= int(refused.headers["retry-after"]) <= 9  # spread over [r, 3r]
    assert first["r"].status_code == 200
    assert health.status_code == 200 and health_seconds < 0.5


# --- demo mode ------------------------------------------------------------------------------


def test_demo_mode_serves_the_embedded_repository_without_keys(tmp_path):
    from forcedphot.api.settings import Settings

    settings = Settings(data_dir=tmp_path, demo_visits=2, demo_size=256, demo_objects=50, backend="numpy")
    with TestClient(create_app(settings)) as c:
        from service_helpers import wait_until

        wait_until(lambda: c.get("/readyz").status_code == 200)
        demo = c.get("/v1/info").json()["demo"][0]
        ref = {"visit": demo["visit"], "detector": demo["detector"]}
        response = c.post("/v1/forced-photometry", json={
            "exposure": {**ref, "datasetType": "calexp"}, "difference": {**ref, "datasetType": "difference"},
            "objects": {"uri": demo["objects"]}})
    assert response.status_code == 200, response.text
    truth = pd.read_parquet(tmp_path / "demo-repository" / "truth.parquet")
    truth = truth[(truth["visit"] == demo["visit"]) & truth["on_detector"]]
    assert int(response.headers["x-objects-measured"]) == len(truth) > 0
    catalog = read_parquet(response.content)
    assert set(catalog["diaObjectId"]) == set(truth["diaObjectId"])


def test_the_docs_name_every_output_format(client):
    """Issue 23, item 12: /docs listed three of the six formats."""
    description = client.get("/openapi.json").json()["info"]["description"]
    assert all(name in description for name in ("parquet", "CSV", "JSON", "ECSV", "FITS", "VOTable"))
