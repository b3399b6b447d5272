"""Batch jobs in-process, each test on SQLite and on PostgreSQL: results against the engine,
idempotency, deletion, limits, errors, and restart recovery (a new application on the same
store finishes what an earlier one left queued or running)."""

from dataclasses import dataclass
from pathlib import Path
import threading
import time

from fastapi.testclient import TestClient
import pytest
from service_helpers import AUTH, FWHM, N_ON, VISIT, assert_same_catalog, data_id, engine_catalog, read_parquet, settings_for, wait_until

from forcedphot.api.app import create_app
from forcedphot.serving.job_store import JobStore


def job_body(*exposures, objects=None):
    items = exposures or ({"exposure": data_id()}, {"exposure": data_id(visit=VISIT + 1)})
    return {"exposures": list(items), "objects": objects or {"uri": "tables/objects.parquet"}, "psf_fwhm": FWHM}


@dataclass(frozen=True)
class Home:
    """Where a test's service keeps its jobs: a data directory, and a PostgreSQL URL or None (SQLite)."""

    data_dir: Path
    database: str | None


@pytest.fixture
def home(tmp_path, job_database) -> Home:
    """Every job test runs on SQLite and on PostgreSQL."""
    return Home(tmp_path, job_database)


def client_for(repo, home: Home, **settings):
    defaults = {"job_heartbeat_seconds": 0.05, "job_stale_seconds": 0.5, "database_url": home.database}
    return TestClient(create_app(settings_for(repo["root"], home.data_dir, **{**defaults, **settings})), headers=AUTH)


def finished(client, job_id):
    status = client.get(f"/v1/jobs/{job_id}").json()
    return status if status["state"] in ("succeeded", "failed") else None


def test_job_result_equals_engine_per_exposure(repo, home):
    with client_for(repo, home) as c:
        accepted = c.post("/v1/jobs", json=job_body())
        assert accepted.status_code == 202 and accepted.headers["location"] == f"/v1/jobs/{accepted.json()['id']}"
        status = wait_until(lambda: finished(c, accepted.json()["id"]))
        assert status["state"] == "succeeded" and status["errors"] == [] and status["rows"] == 2 * N_ON
        assert status["progress"] == {"exposures_done": 2, "exposures_total": 2, "fraction": 1.0}
        result = c.get(status["result"])
        as_json = c.get(status["result"], headers={"Accept": "application/json"})
    assert result.headers["content-type"] == "application/vnd.apache.parquet"
    catalog = read_parquet(result.content)
    for visit, path in ((VISIT, repo["calexp"]), (VISIT + 1, repo["calexp2"])):
        assert_same_catalog(catalog[catalog["visit"] == visit], engine_catalog(path, repo["objects"]))
    assert as_json.status_code == 200 and len(as_json.json()) == 2 * N_ON


def test_idempotency_key_returns_the_same_job(repo, home):
    with client_for(repo, home) as c:
        first = c.post("/v1/jobs", json=job_body(), headers={"Idempotency-Key": "alert-batch-7"})
        again = c.post("/v1/jobs", json=job_body(), headers={"Idempotency-Key": "alert-batch-7"})
        other = c.post("/v1/jobs", json=job_body({"exposure": data_id()}), headers={"Idempotency-Key": "alert-batch-7"})
        unkeyed = [c.post("/v1/jobs", json=job_body()).json()["id"] for _ in range(2)]
        bad_key = c.post("/v1/jobs", json=job_body(), headers={"Idempotency-Key": "has space"})
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert other.status_code == 422 and "different request" in other.json()["detail"]
    assert unkeyed[0] != unkeyed[1]
    assert bad_key.status_code == 422


def test_submission_errors(repo, home):
    with client_for(repo, home, max_job_exposures=2, max_objects=5) as c:
        unknown = c.post("/v1/jobs", json=job_body({"exposure": data_id(visit=1)}))
        escape = c.post("/v1/jobs", json=job_body({"exposure": {"uri": "../etc/passwd"}}))
        repeated = c.post("/v1/jobs", json=job_body({"exposure": data_id()}, {"exposure": data_id()}))
        too_many = c.post("/v1/jobs", json=job_body(*[{"exposure": data_id()}] * 3))
        objects = c.post("/v1/jobs", json=job_body(objects=[{"diaObjectId": i, "ra": 1.0, "dec": 1.0} for i in range(6)]))
        empty = c.post("/v1/jobs", json={"exposures": [], "objects": {"uri": "tables/objects.parquet"}})
        missing = c.get("/v1/jobs/nope")
    assert unknown.status_code == 404 and "1/42/calexp.fits" in unknown.json()["detail"]
    assert escape.status_code == 403
    assert repeated.status_code == 422 and "more than once" in repeated.json()["detail"]
    assert too_many.status_code == 413 and objects.status_code == 413
    assert empty.status_code == 422 and missing.status_code == 404


def test_unreadable_exposure_is_reported_in_the_job(repo, home):
    (repo["root"] / "damaged.fits").write_bytes(b"SIMPLE  =                    T" + b" " * 50)
    with client_for(repo, home) as c:
        mixed = c.post("/v1/jobs", json=job_body({"exposure": {"uri": "damaged.fits"}}, {"exposure": data_id()})).json()
        broken = c.post("/v1/jobs", json=job_body({"exposure": {"uri": "damaged.fits"}})).json()
        mixed = wait_until(lambda: finished(c, mixed["id"]))
        broken = wait_until(lambda: finished(c, broken["id"]))
        failed_result = c.get(f"/v1/jobs/{broken['id']}/result")
    assert mixed["state"] == "succeeded" and mixed["rows"] == N_ON
    assert [e["exposure"] for e in mixed["errors"]] == ["damaged.fits"] and "damaged.fits" in mixed["errors"][0]["detail"]
    assert broken["state"] == "failed" and broken["result"] is None
    assert failed_result.status_code == 409 and failed_result.json()["type"].endswith("job-failed")


def queue_without_running(repo, home: Home, count=1, **settings):
    """Accept jobs with the runner stopped, as a server killed right after accepting them would leave them."""
    with client_for(repo, home, **settings) as c:
        c.app.state.runtime.runner.stop()
        ids = [c.post("/v1/jobs", json=job_body()).json()["id"] for _ in range(count)]
        pending = c.get(f"/v1/jobs/{ids[0]}/result")
        status = c.get(f"/v1/jobs/{ids[0]}").json()
    return ids, pending, status


def test_queued_jobs_are_finished_by_the_next_server(repo, home):
    ids, pending, status = queue_without_running(repo, home, count=2)
    assert status["state"] == "queued" and pending.status_code == 409 and "retry-after" in pending.headers
    with client_for(repo, home) as c:
        states = [wait_until(lambda job_id=job_id: finished(c, job_id))["state"] for job_id in ids]
    assert states == ["succeeded", "succeeded"]


def mark_running(home: Home, job_id, attempts):
    """Make the job look run by a server that died a minute ago."""
    store = JobStore(home.data_dir / "jobs", home.database)
    assert store._run("UPDATE jobs SET state = 'running', owner = 'killed-process', heartbeat = ?, attempts = ? WHERE id = ?",
                      time.time() - 60, attempts, job_id) == 1


def test_running_job_of_a_dead_server_is_rerun(repo, home):
    (job_id,), _, _ = queue_without_running(repo, home)
    mark_running(home, job_id, attempts=1)
    with client_for(repo, home) as c:
        status = wait_until(lambda: finished(c, job_id))
        result = c.get(status["result"])
    assert status["state"] == "succeeded" and status["attempts"] == 2
    assert len(read_parquet(result.content)) == 2 * N_ON


def test_job_interrupted_too_often_fails(repo, home):
    (job_id,), _, _ = queue_without_running(repo, home, job_max_attempts=3)
    mark_running(home, job_id, attempts=3)
    with client_for(repo, home, job_max_attempts=3) as c:
        status = wait_until(lambda: finished(c, job_id))
    assert status["state"] == "failed" and "3 runs" in status["errors"][0]["detail"]


def test_active_job_limit_is_429(repo, home):
    with client_for(repo, home, max_active_jobs=1, retry_after_seconds=2) as c:
        c.app.state.runtime.runner.stop()
        first = c.post("/v1/jobs", json=job_body())
        second = c.post("/v1/jobs", json=job_body({"exposure": data_id()}))
    assert first.status_code == 202
    assert second.status_code == 429 and 2 <= int(second.headers["retry-after"]) <= 6  # spread over [r, 3r]


def test_delete_queued_and_running_jobs(repo, home):
    with client_for(repo, home) as c:
        runtime = c.app.state.runtime
        entered = threading.Event()
        real_run = runtime.service.run

        def endless(task, progress=None):
            entered.set()
            while True:  # a long measurement that reports progress (and so notices deletion)
                progress(0, 1)
                time.sleep(0.01)

        runtime.service.run = endless
        running = c.post("/v1/jobs", json=job_body()).json()["id"]
        assert entered.wait(10)
        assert c.delete(f"/v1/jobs/{running}").status_code == 204
        assert c.get(f"/v1/jobs/{running}").status_code == 404
        runtime.service.run = real_run
        after = c.post("/v1/jobs", json=job_body({"exposure": data_id()})).json()["id"]
        assert wait_until(lambda: finished(c, after))["state"] == "succeeded"  # the runner goes on
        assert c.delete(f"/v1/jobs/{after}").status_code == 204
        assert c.delete(f"/v1/jobs/{after}").status_code == 404
        assert c.get(f"/v1/jobs/{after}/result").status_code == 404
    assert not (home.data_dir / "jobs" / running).exists() and not (home.data_dir / "jobs" / after).exists()
