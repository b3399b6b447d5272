"""What users expect of the service: PSF files over HTTP, astronomy formats by Accept,
no server paths in errors about uploads, the caller's jobs listed, the demo's state."""

import io
import json
from pathlib import Path
import threading

from astropy.table import Table
from fastapi.testclient import TestClient
import pyarrow.parquet as pq
import pytest
from service_helpers import API_KEY, AUTH, FWHM, data_id, read_parquet, settings_for, wait_until

from forcedphot.api.app import create_app
from forcedphot.photometry.formats import FORMATS

DES_PSF = Path(__file__).resolve().parents[1] / "data" / "des" / "DECam_00154912_12_psfcat.psf"
OTHER_KEY = "another-key-0123456789"


@pytest.fixture(scope="module")
def client(repo, tmp_path_factory):
    settings = settings_for(repo["root"], tmp_path_factory.mktemp("data"), api_keys=[API_KEY, OTHER_KEY])
    with TestClient(create_app(settings), headers=AUTH) as c:
        yield c


def upload(client, repo, **parts):
    files = {"exposure": ("calexp.fits", repo["calexp"].read_bytes()),
             "objects": ("objects.csv", (repo["root"] / "tables" / "objects.csv").read_bytes(), "text/csv"), **parts}
    return client.post("/v1/forced-photometry", files=files)


def test_a_psfex_file_uploaded_with_the_exposure(client, repo):
    response = upload(client, repo, psf=("model.psf", DES_PSF.read_bytes()))
    assert response.status_code == 200, response.text
    provenance = json.loads(pq.read_schema(io.BytesIO(response.content)).metadata[b"forcedphot"])
    assert provenance["psf"].startswith("PSFEx model") and "from the file upload:model.psf" in provenance["psf"]


def test_errors_about_uploads_name_the_part_not_a_server_path(client, repo, tmp_path):
    bad_psf = upload(client, repo, psf=("bad.psf", b"not a PSF file at all"))
    bad_exposure = client.post("/v1/forced-photometry", data={"psf_fwhm": str(FWHM)},
                               files={"exposure": ("broken.fits", b"SIMPLE  =                    T" + b" " * 50),
                                      "objects": ("o.csv", b"diaObjectId,ra,dec\n1,1,1\n", "text/csv")})
    for response, name in ((bad_psf, "upload:bad.psf"), (bad_exposure, "upload:broken.fits")):
        assert response.status_code == 422 and name in response.json()["detail"], response.text
        assert "uploads" not in response.text and "/tmp" not in response.text


@pytest.mark.parametrize("fmt", ["ecsv", "fits", "votable"])
def test_astronomy_formats_by_accept(client, fmt):
    response = client.post("/v1/forced-photometry", json={"exposure": data_id(), "objects": {"uri": "tables/objects.parquet"},
                                                          "psf_fwhm": FWHM}, headers={"Accept": FORMATS[fmt]})
    assert response.status_code == 200 and response.headers["content-type"].startswith(FORMATS[fmt])
    table = Table.read(io.BytesIO(response.content), format={"ecsv": "ascii.ecsv", "fits": "fits", "votable": "votable"}[fmt])
    assert str(table["psfFlux"].unit) == "nJy" and len(table) == 30


def test_a_job_takes_a_psf_file_per_exposure(client, repo):
    (repo["root"] / "psfs").mkdir(exist_ok=True)
    (repo["root"] / "psfs" / "des.psf").write_bytes(DES_PSF.read_bytes())
    job = client.post("/v1/jobs", json={"exposures": [{"exposure": data_id(), "psf": {"uri": "psfs/des.psf"}}],
                                        "objects": {"uri": "tables/objects.parquet"}, "psf_fwhm": FWHM}).json()
    status = wait_until(lambda: (s := client.get(f"/v1/jobs/{job['id']}").json())["state"] in ("succeeded", "failed") and s)
    assert status["state"] == "succeeded", status
    result = client.get(status["result"]).content
    provenance = json.loads(pq.read_schema(io.BytesIO(result)).metadata[b"forcedphot"])
    assert "from the file psfs/des.psf" in provenance["exposures"][0]["psf"]
    assert len(read_parquet(result)) == 30


def test_the_callers_jobs_are_listed_a_page_at_a_time(client):
    other = {"Authorization": f"Bearer {OTHER_KEY}"}
    body = {"exposures": [{"exposure": data_id()}], "objects": {"uri": "tables/objects.parquet"}, "psf_fwhm": FWHM}
    mine = [client.post("/v1/jobs", json=body).json()["id"] for _ in range(3)]
    theirs = client.post("/v1/jobs", json=body, headers=other).json()["id"]
    first = client.get("/v1/jobs", params={"limit": 2}).json()
    second = client.get(first["next"]).json()
    listed = [j["id"] for j in first["jobs"] + second["jobs"]]
    assert len(first["jobs"]) == 2 and first["next"] and set(mine) <= set(listed) and theirs not in listed
    assert [j["id"] for j in client.get("/v1/jobs", headers=other).json()["jobs"]] == [theirs]
    assert client.get("/v1/jobs", params={"limit": 0}).status_code == 422


def test_info_says_while_the_demo_repository_is_written(tmp_path, monkeypatch):
    from forcedphot.api import runtime as runtime_module
    from forcedphot.api.settings import Settings

    release = threading.Event()
    real = runtime_module.ensure_demo_repository

    def slow(*args, **kwargs):
        release.wait(20)
        return real(*args, **kwargs)

    monkeypatch.setattr(runtime_module, "ensure_demo_repository", slow)
    settings = Settings(data_dir=tmp_path, demo_visits=2, demo_size=128, demo_objects=10, backend="numpy", measure_processes=0)
    with TestClient(create_app(settings)) as c:
        assert c.get("/v1/info").json()["demo_repository"] == "being written"
        release.set()
        wait_until(lambda: c.get("/v1/info").json()["demo_repository"] == "ready")
        assert len(c.get("/v1/info").json()["demo"]) == 2



def test_an_upload_whose_archive_holds_a_pickled_piff_psf_is_refused_and_never_unpickled(client, monkeypatch):
    """Unpickling runs code from the file: an uploaded exposure's PiffPsf is refused with a 422
    that says how to pass a PSF, and nothing is unpickled. An explicit psf_fwhm measures it."""
    import pickle

    loaded = []
    monkeypatch.setattr(pickle, "loads", lambda *args, **kwargs: loaded.append(args) or (_ for _ in ()).throw(AssertionError))
    exposure = Path(__file__).resolve().parents[1] / "data" / "lsst" / "piff" / "exp.fits"
    files = {"exposure": ("exp.fits", exposure.read_bytes()), "objects": ("o.csv", b"diaObjectId,ra,dec\n1,0.0,0.0\n", "text/csv")}
    refused = client.post("/v1/forced-photometry", files=files)
    assert refused.status_code == 422, refused.text
    detail = refused.json()["detail"]
    assert "upload:exp.fits" in detail and "PiffPsf" in detail and "never loaded" in detail and "psf_fwhm" in detail
    measured = client.post("/v1/forced-photometry", files=files, data={"psf_fwhm": "3"})
    assert measured.status_code == 200, measured.text
    assert loaded == []
