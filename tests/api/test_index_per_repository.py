"""Servers of different repositories sharing a data directory keep separate exposure
indexes (issue 23, item 1: starting a server on an empty folder emptied the running demo
server's index, whose light curves then answered 0 epochs with 200)."""

from fastapi.testclient import TestClient
from service_helpers import AUTH, FWHM, settings_for, wait_until

from forcedphot.api.app import create_app


def test_another_repository_on_the_same_data_directory_leaves_the_index_alone(repo, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    position = {"objects": {"ra": float(repo["objects"]["ra"][0]), "dec": float(repo["objects"]["dec"][0])}, "psf_fwhm": FWHM}
    with TestClient(create_app(settings_for(repo["root"], tmp_path / "data")), headers=AUTH) as first:
        wait_until(lambda: first.get("/v1/info").json()["index"]["exposures"] == 2)
        with TestClient(create_app(settings_for(empty, tmp_path / "data")), headers=AUTH) as second:
            wait_until(lambda: second.app.state.runtime.index_report is not None)
            assert second.get("/v1/info").json()["index"]["exposures"] == 0
            assert first.get("/v1/info").json()["index"]["exposures"] == 2
            answer = first.post("/v1/lightcurves", json=position, headers={"Accept": "application/json"})
            assert answer.status_code == 200 and len(answer.json()) == 2
