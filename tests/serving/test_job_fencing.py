"""A run that lost its claim stops and writes nothing (fenced by owner and attempt), each
run writes under its own names, and a job store that goes away answers 503 with
Retry-After while everything else keeps working (hostile-client probe, round 3, item 8)."""

import threading

from fastapi.testclient import TestClient
import pandas as pd
import pytest
from service_helpers import AUTH, FWHM, data_id, settings_for, wait_until

from forcedphot.api.app import create_app
from forcedphot.serving.job_store import JobStore

OBJECTS = pd.DataFrame({"diaObjectId": [1], "ra": [1.0], "dec": [1.0]})
SPEC = {"exposures": [{"science": None}], "config": {}, "psf_fwhm": None}


def job_body():
    return {"exposures": [{"exposure": data_id()}], "objects": {"uri": "tables/objects.parquet"}, "psf_fwhm": FWHM}


def test_only_the_run_holding_the_claim_records_anything(tmp_path, job_database):
    store = JobStore(tmp_path, job_database)
    job, _ = store.create(spec=SPEC, objects=OBJECTS, fingerprint="f", key=None, max_active=10, client="c")
    first = store.claim("replica-a")
    assert first.attempts == 1
    assert store.requeue_stale(-1.0, 10) == 1  # replica-a fell silent (say, the store was out of its reach)
    second = store.claim("replica-b")
    assert second.id == job.id and second.attempts == 2
    assert store.beat("replica-a", {job.id: 1}) == [job.id]
    assert store.progress(job.id, "replica-a", 1, 1, 1.0) is False
    assert store.finish(job.id, "replica-a", 1, state="succeeded", errors=[], rows=1) is False
    assert store.beat("replica-b", {job.id: 2}) == []
    assert store.finish(job.id, "replica-b", 2, state="succeeded", errors=[], rows=1) is True
    assert store.result_path(job.id, 1) != store.result_path(job.id, 2)


def test_a_run_that_lost_its_claim_stops_and_writes_nothing(repo, tmp_path, monkeypatch):
    release, started = threading.Event(), threading.Event()
    app = create_app(settings_for(repo["root"], tmp_path, job_heartbeat_seconds=0.05, job_stale_seconds=30))
    with TestClient(app, headers=AUTH) as c:
        runtime = c.app.state.runtime
        real_run = runtime.service.run

        def held(task, progress=None):
            started.set()
            release.wait(30)
            return real_run(task, progress)

        monkeypatch.setattr(runtime.service, "run", held)
        job = c.post("/v1/jobs", json=job_body()).json()
        assert started.wait(10)
        other = JobStore(tmp_path / "jobs")  # another replica's view of the same store
        assert other.requeue_stale(-1.0, 10) == 1
        taken = other.claim("replica-b")
        assert taken.attempts == 2
        release.set()
        wait_until(lambda: not runtime.runner._attempts, timeout=20)
        row = other.get(job["id"])
        assert row.state == "running" and row.attempts == 2  # untouched: not finished, not released
        folder = tmp_path / "jobs" / job["id"]
        assert sorted(p.name for p in folder.iterdir()) == ["objects.parquet"]  # no result, part or partial of run 1
        assert runtime.runner.alive()


def test_a_postgresql_outage_is_503_and_the_rest_keeps_answering(repo, tmp_path):
    from postgres_helpers import PostgresServer, postgres_bin

    if postgres_bin() is None:
        pytest.skip("PostgreSQL's initdb and postgres are not installed (Debian: apt-get install postgresql)")
    database = PostgresServer(postgres_bin()).start()
    try:
        app = create_app(settings_for(repo["root"], tmp_path, database_url=database.new_database(), job_heartbeat_seconds=0.05))
        with TestClient(app, headers=AUTH) as c:
            job = c.post("/v1/jobs", json=job_body()).json()
            wait_until(lambda: c.get(f"/v1/jobs/{job['id']}").json()["state"] == "succeeded", timeout=30)
            database.halt()
            for method, path in (("GET", "/v1/jobs"), ("GET", f"/v1/jobs/{job['id']}"), ("POST", "/v1/jobs")):
                response = c.request(method, path, json=job_body() if method == "POST" else None)
                assert response.status_code == 503, (path, response.text)
                assert response.json()["type"].endswith("store-unavailable") and int(response.headers["retry-after"]) > 0
                assert "127.0.0.1" not in response.text and "postgresql://" not in response.text
            measured = c.post("/v1/forced-photometry", json={"exposure": data_id(), "objects": {"uri": "tables/objects.parquet"}, "psf_fwhm": FWHM})
            assert measured.status_code == 200
            database.resume()
            assert c.get(f"/v1/jobs/{job['id']}").json()["state"] == "succeeded"
    finally:
        database.stop()
