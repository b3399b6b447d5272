"""Butler repositories (real ``lsst-daf-butler`` registries made in the tests) as the source
of exposures and of light-curve coverage: data ids resolved by the registry, files under
names no template could guess, datastore records naming obs_base's formatter (never
imported), regions and timespans from the registry; named errors for what is not there."""

import io
from pathlib import Path

from butler_helpers import INSTRUMENT, RUN, make_butler_repository
from fastapi.testclient import TestClient
import numpy as np
import pandas as pd
import pytest
from service_helpers import AUTH, DETECTOR, FWHM, VISIT, assert_same_catalog, engine_catalog, settings_for

from forcedphot.api.app import create_app
from forcedphot.cli import main as cli_main
from forcedphot.serving.butler import ButlerSource, ButlerUnavailable
from forcedphot.serving.index import ExposureIndex
from forcedphot.serving.repository import BadReference, DataIdRef, UnknownDatasetType, UnknownReference, UriRef

COLLECTIONS = [RUN]


@pytest.fixture(scope="module")
def butler_root(repo, tmp_path_factory):
    return make_butler_repository(tmp_path_factory.mktemp("butler"), [
        (VISIT, DETECTOR, repo["calexp"], repo["difference"]),
        (VISIT + 1, DETECTOR, repo["calexp2"], None),
    ])


@pytest.fixture(scope="module")
def source(butler_root):
    return ButlerSource(str(butler_root), COLLECTIONS)


def ref(dataset_type="visit_image", visit=VISIT, **extra):
    return DataIdRef(visit=visit, detector=DETECTOR, datasetType=dataset_type, **extra)


def test_data_ids_resolve_to_the_registered_files(source, repo):
    science = source.resolve(ref(instrument=INSTRUMENT))
    assert science.read_bytes() == repo["calexp"].read_bytes() and "calexp" not in str(science)  # a name no template guesses
    assert source.resolve(ref("calexp")) == science  # the plain repository's name stands for the science type
    assert source.resolve(ref("difference")).read_bytes() == repo["difference"].read_bytes()
    assert source.resolve(ref("difference_image")) == source.resolve(ref("difference"))


@pytest.mark.parametrize("reference, error, fragment", [
    (ref("goodSeeingDiff_differenceExp"), UnknownDatasetType, "no dataset type 'goodSeeingDiff_differenceExp'"),
    (ref(visit=999), UnknownReference, "no visit_image for"),
    (ref("difference_image", visit=VISIT + 1), UnknownReference, "no difference_image"),
    (ref(instrument="HSC"), UnknownReference, "HSC"),
    (UriRef(uri="datastore-files/x.fits"), BadReference, "data ids"),
])
def test_what_is_not_there_is_named(source, reference, error, fragment):
    with pytest.raises(error, match=fragment):
        source.resolve(reference)


def test_a_repository_or_collection_that_is_not_there_is_named(butler_root, tmp_path):
    with pytest.raises(ButlerUnavailable, match="cannot be opened") as opened:
        ButlerSource(str(tmp_path / "nothing-here"), COLLECTIONS)
    assert str(tmp_path) not in str(opened.value)
    with pytest.raises(ButlerUnavailable, match="no collection 'nope'"):
        ButlerSource(str(butler_root), ["nope"])


def test_coverage_from_the_registry_agrees_with_the_file_index(source, repo, tmp_path):
    objects = repo["objects"]
    ra, dec = objects["ra"].to_numpy(), objects["dec"].to_numpy()
    index = ExposureIndex(tmp_path / "index.sqlite")
    index.refresh([repo["root"]], "{visit}/{detector}/{datasetType}.fits")
    ours = {(e.visit, e.detector): (rows.tolist(), e.band, e.midpoint_mjd_tai, e.difference_path is not None)
            for e, rows in source.covering_many(ra, dec)}
    files = {(e.visit, e.detector): (rows.tolist(), e.band, e.midpoint_mjd_tai, e.difference_path is not None)
             for e, rows in index.covering_many(ra, dec)}
    assert set(ours) == set(files) == {(VISIT, DETECTOR), (VISIT + 1, DETECTOR)}
    for key in ours:
        assert ours[key][0] == files[key][0] and ours[key][1] == files[key][1] == "r" and ours[key][3] == files[key][3]
        assert ours[key][2] == pytest.approx(files[key][2], abs=1e-6)  # the visit timespan's midpoint, TAI
    assert len(objects) - 1 not in ours[(VISIT, DETECTOR)][0]  # the object placed off the detector
    assert source.covering_many(ra, dec, bands=["g"]) == [] and source.covering_many(ra, dec, mjd_max=60000.0) == []
    assert [e.visit for e in source.covering(float(ra[0]), float(dec[0]))] == [VISIT, VISIT + 1]


@pytest.fixture(scope="module")
def client(butler_root, tmp_path_factory):
    settings = settings_for(None, tmp_path_factory.mktemp("data"), butler_repository=str(butler_root), butler_collections=COLLECTIONS)
    with TestClient(create_app(settings), headers=AUTH) as c:
        yield c


def test_the_service_measures_butler_references(client, repo):
    body = {"exposure": {"datasetType": "visit_image", "instrument": INSTRUMENT, "visit": VISIT, "detector": DETECTOR},
            "difference": {"datasetType": "difference_image", "visit": VISIT, "detector": DETECTOR},
            "objects": [{"diaObjectId": int(i), "ra": float(r), "dec": float(d)} for i, r, d in repo["objects"][["diaObjectId", "ra", "dec"]].to_numpy()],
            "psf_fwhm": FWHM}
    answer = client.post("/v1/forced-photometry", json=body)
    assert answer.status_code == 200, answer.text
    expected = engine_catalog(repo["calexp"], repo["objects"], repo["difference"])
    assert_same_catalog(pd.read_parquet(io.BytesIO(answer.content)), expected)
    assert client.get("/readyz").status_code == 200 and client.get("/v1/info").json()["settings"]["exposures"] == "butler"


def test_light_curves_and_exposures_come_from_the_registry(client, repo):
    ra, dec = float(repo["objects"]["ra"][0]), float(repo["objects"]["dec"][0])
    found = client.get("/v1/exposures", params={"ra": ra, "dec": dec}).json()
    assert [e["visit"] for e in found["exposures"]] == [VISIT, VISIT + 1] and found["exposures"][0]["band"] == "r"
    answer = client.post("/v1/lightcurves", json={"objects": {"ra": ra, "dec": dec}, "psf_fwhm": FWHM}, headers={"Accept": "application/json"})
    assert answer.status_code == 200, answer.text
    rows = answer.json()
    assert [r["visit"] for r in rows] == [VISIT, VISIT + 1] and np.isfinite(rows[0]["psfFlux"])


@pytest.mark.parametrize("exposure, status, slug", [
    ({"datasetType": "calexp_v2", "visit": VISIT, "detector": DETECTOR}, 422, "unknown-dataset-type"),
    ({"datasetType": "visit_image", "visit": 4, "detector": DETECTOR}, 404, "unknown-exposure"),
    ({"uri": "datastore-files/a.fits"}, 400, "bad-reference"),
])
def test_bad_butler_references_are_named_errors(client, butler_root, exposure, status, slug):
    answer = client.post("/v1/forced-photometry", json={"exposure": exposure, "objects": [{"diaObjectId": 1, "ra": 1.0, "dec": 1.0}],
                                                        "psf_fwhm": FWHM})
    assert answer.status_code == status and answer.json()["type"].endswith(slug), answer.text
    assert str(butler_root) not in answer.text


def test_a_butler_that_cannot_be_opened_is_reported_by_readiness(tmp_path):
    settings = settings_for(None, tmp_path / "data", butler_repository=str(tmp_path / "missing"), butler_collections=COLLECTIONS)
    with TestClient(create_app(settings), headers=AUTH) as c:
        ready = c.get("/readyz")
    assert ready.status_code == 503 and "cannot be opened" in ready.json()["checks"]["repository"] and str(tmp_path) not in ready.text


def test_the_command_line_measures_light_curves_from_a_butler(butler_root, repo, tmp_path, capsys):
    out = tmp_path / "lc.parquet"
    code = cli_main(["lightcurve", "--butler", str(butler_root), "--collections", ",".join(COLLECTIONS), "--ra", str(repo["objects"]["ra"][0]),
                     "--dec", str(repo["objects"]["dec"][0]), "--psf-fwhm", str(FWHM), "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    assert pd.read_parquet(out)["visit"].tolist() == [VISIT, VISIT + 1]


def test_a_registry_on_postgresql_serves_as_sqlite_does(postgres, repo, tmp_path):
    root = make_butler_repository(tmp_path / "butler", [(VISIT, DETECTOR, repo["calexp"], repo["difference"]),
                                                        (VISIT + 1, DETECTOR, repo["calexp2"], None)],
                                  registry_url=postgres.new_database(("btree_gist",)))
    on_postgres = ButlerSource(str(root), COLLECTIONS)
    assert on_postgres.resolve(ref()).read_bytes() == repo["calexp"].read_bytes()
    ra, dec = repo["objects"]["ra"].to_numpy(), repo["objects"]["dec"].to_numpy()
    assert [(e.visit, rows.tolist()) for e, rows in on_postgres.covering_many(ra, dec)] == [
        (VISIT, list(range(len(ra) - 1))), (VISIT + 1, list(range(len(ra) - 1)))]
    settings = settings_for(None, tmp_path / "data", butler_repository=str(root), butler_collections=COLLECTIONS)
    with TestClient(create_app(settings), headers=AUTH) as c:
        answer = c.post("/v1/lightcurves", json={"objects": {"ra": float(ra[0]), "dec": float(dec[0])}, "psf_fwhm": FWHM},
                        headers={"Accept": "application/json"})
    assert answer.status_code == 200 and [r["visit"] for r in answer.json()] == [VISIT, VISIT + 1]


def test_a_resolved_data_id_is_reused_until_it_expires_or_its_file_goes(butler_root, monkeypatch):
    from forcedphot.serving import butler as butler_module

    fresh = ButlerSource(str(butler_root), COLLECTIONS)
    calls = []
    real = fresh.butler.find_dataset
    monkeypatch.setattr(fresh.butler, "find_dataset", lambda *a, **k: calls.append(a) or real(*a, **k))
    first = fresh.resolve(ref())
    assert fresh.resolve(ref("calexp")) == first and len(calls) == 1  # the registry is asked once
    monkeypatch.setattr(butler_module, "RESOLVED_SECONDS", 0.0)
    fresh._resolved.clear()
    fresh.resolve(ref())
    fresh.resolve(ref())
    assert len(calls) == 3  # expired at once: asked again each time


def test_files_in_s3_are_fetched_once_and_measured(s3, repo, tmp_path):
    """A datastore whose files are at s3:// URIs (moved there after ingest, as a cloud
    deployment keeps them): each file is fetched once into the local copies and read from
    there; the answer equals the engine's on the original files."""
    import sqlite3

    from forcedphot.serving.butler import RemoteFiles

    root = make_butler_repository(tmp_path / "butler", [(VISIT, DETECTOR, repo["calexp"], repo["difference"])])
    with sqlite3.connect(root / "gen3.sqlite3") as db:
        for dataset_id, path in db.execute("SELECT dataset_id, path FROM file_datastore_records").fetchall():
            local = Path(path.removeprefix("file://"))
            s3.upload_file(str(local), "survey", f"visits/{local.name}")
            db.execute("UPDATE file_datastore_records SET path = ? WHERE dataset_id = ?", (f"s3://survey/visits/{local.name}", dataset_id))
            local.unlink()  # only the copy in the bucket is left
    source = ButlerSource(str(root), COLLECTIONS, remote=RemoteFiles(tmp_path / "copies", 10**9))
    science = source.resolve(ref())
    assert science.parent == tmp_path / "copies" and science.read_bytes() == repo["calexp"].read_bytes()  # small: its planes come with the headers
    settings = settings_for(None, tmp_path / "data", butler_repository=str(root), butler_collections=COLLECTIONS)
    with TestClient(create_app(settings), headers=AUTH) as c:
        body = {"exposure": {"datasetType": "visit_image", "visit": VISIT, "detector": DETECTOR},
                "difference": {"datasetType": "difference_image", "visit": VISIT, "detector": DETECTOR},
                "objects": [{"diaObjectId": int(i), "ra": float(r), "dec": float(d)} for i, r, d in repo["objects"][["diaObjectId", "ra", "dec"]].to_numpy()],
                "psf_fwhm": FWHM}
        answer = c.post("/v1/forced-photometry", json=body)
    assert answer.status_code == 200, answer.text
    assert_same_catalog(pd.read_parquet(io.BytesIO(answer.content)), engine_catalog(repo["calexp"], repo["objects"], repo["difference"]))
    copies = tmp_path / "data" / "remote-files"  # the service keeps its copies in its data directory
    assert len(list(copies.glob("*.fits"))) == len(list(copies.glob("*.fits.blocks"))) == 2
    for listed in s3.list_objects_v2(Bucket="survey")["Contents"]:  # gone from the bucket: the local copy serves
        s3.delete_object(Bucket="survey", Key=listed["Key"])
    source._resolved.clear()
    assert source.resolve(ref()) == science


def test_remote_copies_are_bounded(tmp_path):
    from lsst.resources import ResourcePath

    from forcedphot.serving.butler import RemoteFiles

    sources = []
    for i in range(3):
        path = tmp_path / f"f{i}.fits"
        path.write_bytes(bytes(100_000))  # no END card: its "header" is fetched whole
        sources.append(ResourcePath(f"file://{path}"))
    copies = RemoteFiles(tmp_path / "copies", 250_000)
    for uri in sources:
        copies.local(uri)
    kept = sorted(p.name for p in (tmp_path / "copies").iterdir())
    assert len(kept) == 4 and copies.local(sources[2]).name in kept  # the oldest went, with its sidecar


def test_the_index_command_counts_a_butlers_exposures(butler_root, capsys):
    assert cli_main(["index", "--butler", str(butler_root), "--collections", ",".join(COLLECTIONS)]) == 0
    assert "2 exposures" in capsys.readouterr().out


def test_jobs_run_on_butler_data_ids(client, repo):
    """A job of data ids, resolved by the registry when accepted, measured as the engine does."""
    from service_helpers import wait_until

    records = [{"diaObjectId": int(i), "ra": float(r), "dec": float(d)} for i, r, d in repo["objects"][["diaObjectId", "ra", "dec"]].to_numpy()]
    body = {"exposures": [{"exposure": {"datasetType": "visit_image", "visit": VISIT, "detector": DETECTOR},
                           "difference": {"datasetType": "difference_image", "visit": VISIT, "detector": DETECTOR}},
                          {"exposure": {"datasetType": "visit_image", "visit": VISIT + 1, "detector": DETECTOR}}],
            "objects": records, "psf_fwhm": FWHM}
    accepted = client.post("/v1/jobs", json=body)
    assert accepted.status_code == 202, accepted.text

    def finished():
        status = client.get(f"/v1/jobs/{accepted.json()['id']}").json()
        return status if status["state"] in ("succeeded", "failed") else None

    status = wait_until(finished, timeout=60)
    assert status["state"] == "succeeded" and status["errors"] == [], status
    catalog = pd.read_parquet(io.BytesIO(client.get(status["result"]).content))
    assert_same_catalog(catalog[catalog["visit"] == VISIT], engine_catalog(repo["calexp"], repo["objects"], repo["difference"]))
    assert_same_catalog(catalog[catalog["visit"] == VISIT + 1], engine_catalog(repo["calexp2"], repo["objects"]))
    unknown = client.post("/v1/jobs", json={**body, "exposures": [{"exposure": {"datasetType": "visit_image", "visit": 5, "detector": 1}}]})
    assert unknown.status_code == 404 and unknown.json()["type"].endswith("unknown-exposure")


def test_a_campaign_runs_on_a_butler(butler_root, repo, tmp_path, capsys):
    objects = tmp_path / "objects.parquet"
    repo["objects"].to_parquet(objects)
    out = tmp_path / "campaign"
    code = cli_main(["campaign", "--butler", str(butler_root), "--collections", ",".join(COLLECTIONS), "--objects", str(objects),
                     "--psf-fwhm", str(FWHM), "--where", "local", "--workers", "1", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    table = pd.read_parquet(out)
    assert sorted(set(table["visit"])) == [VISIT, VISIT + 1] and len(table) == 2 * (len(repo["objects"]) - 1)


def test_the_command_line_measures_a_butler_data_id(butler_root, repo, tmp_path, capsys):
    objects = tmp_path / "objects.parquet"
    repo["objects"].to_parquet(objects)
    out = tmp_path / "forced.parquet"
    butler = ["--butler", str(butler_root), "--collections", ",".join(COLLECTIONS), "--psf-fwhm", str(FWHM), "--backend", "numpy"]
    assert cli_main(["measure", str(objects), "--visit", str(VISIT), "--detector", str(DETECTOR), *butler, "-o", str(out)]) == 0
    assert_same_catalog(pd.read_parquet(out), engine_catalog(repo["calexp"], repo["objects"], repo["difference"]))  # with its difference image
    assert cli_main(["measure", str(objects), "--visit", str(VISIT + 1), "--detector", str(DETECTOR), *butler, "-o", str(out)]) == 0
    assert_same_catalog(pd.read_parquet(out), engine_catalog(repo["calexp2"], repo["objects"]))  # none registered: direct image only
    capsys.readouterr()
    assert cli_main(["measure", str(objects), "--visit", "7", "--detector", str(DETECTOR), *butler, "-o", str(out)]) == 2
    assert "no visit_image" in capsys.readouterr().err
    assert cli_main(["measure", str(objects), *butler, "-o", str(out)]) == 2
    assert "--butler needs --visit and --detector" in capsys.readouterr().err
