"""The APDB (real ``lsst-dax-apdb`` databases made in the tests, on SQLite and PostgreSQL) as
the source of DiaObjects and the sink of DiaForcedSources: Rubin's nDiaSources threshold, an
idempotent store (one row per diaObjectId, visit and detector), 503 while it is down."""

from pathlib import Path

from fastapi.testclient import TestClient
import numpy as np
import pandas as pd
import pytest
from service_helpers import AUTH, DETECTOR, FWHM, VISIT, assert_same_catalog, data_id, engine_catalog, settings_for

from forcedphot.api.app import create_app
from forcedphot.cli import main as cli_main
from forcedphot.demo.apdb import create_apdb, store_dia_objects
from forcedphot.photometry.exposure import open_exposure
from forcedphot.serving import apdb as apdb_module
from forcedphot.serving.apdb import ApdbUnavailable, objects_by_id, objects_on, open_apdb, store_forced_sources, stored_forced_sources
from forcedphot.serving.index import footprint_of

FIRST_SEEN_MJD = 60990.0


def n_dia_sources(ids: np.ndarray) -> np.ndarray:
    """1, 2 or 3 DiaSources by id: a third of the objects are below Rubin's threshold of 2."""
    return (ids % 3 + 1).astype(np.int32)


@pytest.fixture(params=["sqlite", "postgresql"])
def apdb_config(request, repo, tmp_path) -> Path:
    """An APDB holding the repository's DiaObjects (one of them off the detector)."""
    url = None if request.param == "sqlite" else request.getfixturevalue("postgres").new_database().replace("postgresql://", "postgresql+psycopg2://")
    config = create_apdb(tmp_path / "apdb.yaml", url)
    objects = repo["objects"].copy()
    objects["nDiaSources"] = n_dia_sources(objects["diaObjectId"].to_numpy())
    store_dia_objects(config, objects, FIRST_SEEN_MJD)
    return config


def on_detector(repo) -> pd.DataFrame:
    objects = repo["objects"]
    return objects[objects["diaObjectId"] != objects["diaObjectId"].max()]  # the last one is placed off the detector


def test_objects_on_an_exposure_follow_the_threshold(apdb_config, repo):
    apdb = open_apdb(str(apdb_config))
    with open_exposure(repo["calexp"]) as exposure:
        footprint = footprint_of(exposure)
    inside = on_detector(repo)
    for threshold in (1, 2, 3):
        found = objects_on(apdb, footprint, threshold)
        expected = inside[n_dia_sources(inside["diaObjectId"].to_numpy()) >= threshold]
        assert found["diaObjectId"].tolist() == sorted(expected["diaObjectId"].tolist())
        merged = found.merge(expected, on="diaObjectId", suffixes=("", "_sent"))
        np.testing.assert_allclose(merged["ra"], merged["ra_sent"], rtol=0, atol=1e-12)
        np.testing.assert_allclose(merged["dec"], merged["dec_sent"], rtol=0, atol=1e-12)
    assert objects_on(apdb, [(10.0, -80.0), (10.1, -80.0), (10.1, -80.1)], 1).empty  # nothing there


def test_a_request_measures_the_apdb_objects_and_stores_them_once(apdb_config, repo, tmp_path):
    app = create_app(settings_for(repo["root"], tmp_path / "data", apdb_config=str(apdb_config)))
    inside = on_detector(repo)
    taken = inside[n_dia_sources(inside["diaObjectId"].to_numpy()) >= 2]
    body = {"exposure": data_id("calexp"), "difference": data_id("difference"), "objects": {"apdb": {}}, "store": True,
            "psf_fwhm": FWHM}
    with TestClient(app) as client:
        first = client.post("/v1/forced-photometry", json=body, headers=AUTH)
        assert first.status_code == 200, first.text
        assert first.headers["X-Apdb-Rows-Stored"] == str(len(taken))
        got = pd.read_parquet(pd.io.common.BytesIO(first.content))
        assert_same_catalog(got, engine_catalog(repo["calexp"], taken[["diaObjectId", "ra", "dec"]], repo["difference"]))

        again = client.post("/v1/forced-photometry", json=body, headers=AUTH)
        assert again.status_code == 200 and again.headers["X-Apdb-Rows-Stored"] == "0"

        every = client.post("/v1/forced-photometry", json={**body, "objects": {"apdb": {"min_dia_sources": 1}}}, headers=AUTH)
        assert every.headers["X-Apdb-Rows-Stored"] == str(len(inside) - len(taken))  # only those not stored yet
        assert "X-Apdb-Rows-Stored" not in client.post("/v1/forced-photometry", json={**body, "store": False}, headers=AUTH).headers

    stored = stored_forced_sources(open_apdb(str(apdb_config)), inside["diaObjectId"].tolist())
    assert len(stored) == len(inside)
    assert not stored.duplicated(["diaObjectId", "visit", "detector"]).any()
    assert set(stored["visit"]) == {VISIT} and set(stored["detector"]) == {DETECTOR}
    fresh = got.set_index("diaObjectId").loc[stored.set_index("diaObjectId").loc[taken["diaObjectId"], :].index]
    np.testing.assert_allclose(stored.set_index("diaObjectId").loc[fresh.index, "psfFlux"], fresh["psfFlux"], rtol=1e-6)  # float32 in the APDB


def test_named_apdb_objects_make_light_curves(apdb_config, repo, tmp_path):
    app = create_app(settings_for(repo["root"], tmp_path / "data", apdb_config=str(apdb_config)))
    ids = on_detector(repo)["diaObjectId"].tolist()[:3]
    with TestClient(app) as client:
        client.post("/v1/index/refresh", headers=AUTH)
        answer = client.post("/v1/lightcurves", json={"objects": {"apdb": {"diaObjectIds": ids}}, "psf_fwhm": FWHM}, headers=AUTH)
        assert answer.status_code == 200, answer.text
        table = pd.read_parquet(pd.io.common.BytesIO(answer.content))
        assert sorted(set(table["diaObjectId"])) == sorted(ids) and set(table["visit"]) == {VISIT, VISIT + 1}

        unknown = client.post("/v1/lightcurves", json={"objects": {"apdb": {"diaObjectIds": [ids[0], 987654321]}}}, headers=AUTH)
        assert unknown.status_code == 404 and "987654321" in unknown.json()["detail"]
        region = client.post("/v1/lightcurves", json={"objects": {"apdb": {}}}, headers=AUTH)
        assert region.status_code == 422 and "diaObjectIds" in region.json()["detail"]
        both = client.post("/v1/lightcurves", json={"objects": {"apdb": {"diaObjectIds": ids, "min_dia_sources": 1}}}, headers=AUTH)
        assert both.status_code == 422 and "either" in both.text


def test_objects_by_id_take_the_latest_version(apdb_config, repo):
    apdb = open_apdb(str(apdb_config))
    first = int(repo["objects"]["diaObjectId"].iloc[0])
    moved = pd.DataFrame({"diaObjectId": [first], "ra": [repo["objects"]["ra"].iloc[0] + 1e-4], "dec": [repo["objects"]["dec"].iloc[0]],
                          "nDiaSources": [7]})
    store_dia_objects(apdb_config, moved, FIRST_SEEN_MJD + 5)  # a later version: the APDB closes the first
    found = objects_by_id(apdb, [first])
    assert found["nDiaSources"].tolist() == [7] and found["ra"].iloc[0] == pytest.approx(moved["ra"].iloc[0], abs=1e-12)


def test_without_an_apdb_the_request_says_so(repo, tmp_path):
    with TestClient(create_app(settings_for(repo["root"], tmp_path / "data"))) as client:
        answer = client.post("/v1/forced-photometry", json={"exposure": data_id(), "objects": {"apdb": {}}}, headers=AUTH)
        assert answer.status_code == 422 and "no APDB" in answer.json()["detail"]
        answer = client.post("/v1/forced-photometry", json={"exposure": data_id(), "objects": [{"diaObjectId": 1, "ra": 0, "dec": 0}],
                                                            "store": True}, headers=AUTH)
        assert answer.status_code == 422 and "FORCEDPHOT_APDB_CONFIG" in answer.json()["detail"]


def test_a_store_racing_another_writes_nothing_twice(apdb_config, repo, monkeypatch):
    from forcedphot.photometry.measure import measure
    from forcedphot.photometry.psf_models import load_psf
    from forcedphot.photometry.objects import validate_objects

    with open_exposure(repo["calexp"]) as exposure:
        table = measure(exposure, validate_objects(on_detector(repo)[["diaObjectId", "ra", "dec"]]), load_psf(fwhm_pixels=3.5)).table
    apdb = open_apdb(str(apdb_config))
    assert store_forced_sources(apdb, table) == len(on_detector(repo))
    monkeypatch.setattr(apdb_module, "_not_stored", lambda apdb, rows, real=apdb_module._not_stored: (
        rows if not hasattr(apdb_module, "_raced") and not setattr(apdb_module, "_raced", True) else real(apdb, rows)))
    try:
        assert store_forced_sources(apdb, table) == 0  # the insert collides, is read again, and nothing is left to write
    finally:
        monkeypatch.delattr(apdb_module, "_raced", raising=False)
    assert len(stored_forced_sources(apdb, on_detector(repo)["diaObjectId"].tolist())) == len(on_detector(repo))


def test_an_apdb_that_is_down_is_503_and_nothing_is_half_stored(postgres, repo, tmp_path):
    url = postgres.new_database().replace("postgresql://", "postgresql+psycopg2://")
    config = create_apdb(tmp_path / "apdb.yaml", url)
    objects = repo["objects"].assign(nDiaSources=3)
    store_dia_objects(config, objects, FIRST_SEEN_MJD)
    app = create_app(settings_for(repo["root"], tmp_path / "data", apdb_config=str(config)))
    body = {"exposure": data_id("calexp"), "objects": {"apdb": {}}, "store": True,
            "psf_fwhm": FWHM}
    with TestClient(app) as client:
        postgres.halt()
        try:
            down = client.post("/v1/forced-photometry", json=body, headers=AUTH)
            named = client.post("/v1/forced-photometry", json={**body, "objects": [{"diaObjectId": 100, "ra": float(objects["ra"][0]),
                                                                                  "dec": float(objects["dec"][0])}]}, headers=AUTH)
        finally:
            postgres.resume()
        for answer in (down, named):
            assert answer.status_code == 503, answer.text
            assert answer.headers["Retry-After"] and "APDB" in answer.json()["detail"]
            assert str(tmp_path) not in answer.text and "127.0.0.1" not in answer.text
        assert stored_forced_sources(open_apdb(str(config)), objects["diaObjectId"].tolist()).empty  # the request stored nothing
        up = client.post("/v1/forced-photometry", json=body, headers=AUTH)
        assert up.status_code == 200 and up.headers["X-Apdb-Rows-Stored"] == str(len(on_detector(repo)))


def test_the_command_line_measures_and_stores_the_apdb_objects(apdb_config, repo, tmp_path, capsys):
    out = tmp_path / "forced.parquet"
    argv = ["measure", str(repo["calexp"]), "--difference", str(repo["difference"]), "--apdb", str(apdb_config), "--store",
            "--psf-fwhm", "3.5", "--backend", "numpy", "-o", str(out)]
    assert cli_main(argv) == 0
    inside = on_detector(repo)
    taken = inside[n_dia_sources(inside["diaObjectId"].to_numpy()) >= 2]
    assert sorted(pd.read_parquet(out)["diaObjectId"]) == sorted(taken["diaObjectId"])
    assert f"{len(taken)} DiaForcedSources stored in the APDB" in capsys.readouterr().out
    assert cli_main(argv) == 0 and "0 DiaForcedSources stored" in capsys.readouterr().out
    assert cli_main(["measure", str(repo["calexp"]), "--store", "-o", str(out)]) == 2
    assert "give the OBJECTS table, or --apdb" in capsys.readouterr().err


def test_psf_measurements_store_what_every_measurement_stores(apdb_config, repo, tmp_path, capsys):
    """An alert pipeline's setting (the PSF fluxes alone) stores the same DiaForcedSources."""
    out = tmp_path / "forced.parquet"
    argv = ["measure", str(repo["calexp"]), "--difference", str(repo["difference"]), "--apdb", str(apdb_config), "--store",
            "--psf-fwhm", "3.5", "--backend", "numpy", "--measurements", "psf", "-o", str(out)]
    assert cli_main(argv) == 0
    inside = on_detector(repo)
    taken = inside[n_dia_sources(inside["diaObjectId"].to_numpy()) >= 2]
    assert f"{len(taken)} DiaForcedSources stored in the APDB" in capsys.readouterr().out
    stored = stored_forced_sources(open_apdb(str(apdb_config)), taken["diaObjectId"].tolist()).set_index("diaObjectId")
    every = engine_catalog(repo["calexp"], taken[["diaObjectId", "ra", "dec"]], repo["difference"]).set_index("diaObjectId")
    assert "apFlux_3" in every and "apFlux_3" not in pd.read_parquet(out)
    for column in ("psfFlux", "psfFluxErr", "scienceFlux", "scienceFluxErr"):
        np.testing.assert_allclose(stored.loc[every.index, column], every[column], rtol=1e-6, err_msg=column)  # float32 in the APDB


def test_unreachable_apdb_is_named_without_its_address(tmp_path):
    config = create_apdb(tmp_path / "apdb.yaml")
    (tmp_path / "apdb.sqlite3").unlink()  # the database is gone
    with pytest.raises(ApdbUnavailable) as raised:
        objects_on(open_apdb(str(config)), [(10.0, 0.0), (10.1, 0.0), (10.1, 0.1)], 1)
    assert str(tmp_path) not in str(raised.value) and "cannot be reached" in str(raised.value)


def test_a_job_of_named_apdb_objects_stores_each_exposure(apdb_config, repo, tmp_path):
    from service_helpers import read_parquet, wait_until
    import pyarrow.parquet as pq

    app = create_app(settings_for(repo["root"], tmp_path / "data", apdb_config=str(apdb_config)))
    ids = on_detector(repo)["diaObjectId"].tolist()[:5]
    body = {"exposures": [{"exposure": data_id()}, {"exposure": data_id(visit=VISIT + 1)}], "objects": {"apdb": {"diaObjectIds": ids}},
            "store": True, "psf_fwhm": FWHM}
    with TestClient(app, headers=AUTH) as client:
        def run(request):
            accepted = client.post("/v1/jobs", json=request)
            assert accepted.status_code == 202, accepted.text
            status = wait_until(lambda: (lambda s: s if s["state"] in ("succeeded", "failed") else None)(
                client.get(f"/v1/jobs/{accepted.json()['id']}").json()), timeout=60)
            assert status["state"] == "succeeded" and status["errors"] == [], status
            result = client.get(status["result"]).content
            return read_parquet(result), pq.read_schema(pd.io.common.BytesIO(result)).metadata[b"forcedphot"].decode()

        catalog, provenance = run(body)
        assert sorted(set(catalog["diaObjectId"])) == sorted(ids) and len(catalog) == 10
        assert provenance.count('"rows_stored": 5') == 2
        _, again = run({**body, "psf_fwhm": FWHM + 0.5})  # another job, the same rows: nothing written twice
        assert again.count('"rows_stored": 0') == 2
        region = client.post("/v1/jobs", json={**body, "objects": {"apdb": {}}})
        assert region.status_code == 422 and "one exposure at a time" in region.json()["detail"]
    stored = stored_forced_sources(open_apdb(str(apdb_config)), ids)
    assert len(stored) == 10 and set(stored["visit"]) == {VISIT, VISIT + 1}
