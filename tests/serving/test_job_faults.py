"""Faults of the job store and runner: store errors (a full disk, a read-only or corrupt
database) never kill the runner, stuck work is re-queued, partial results are removed,
readiness tells the truth, and the API answers 503 instead of 500."""

import errno
from pathlib import Path
import sqlite3
import threading

from fastapi.testclient import TestClient
import pytest
from service_helpers import AUTH, FWHM, VISIT, data_id, settings_for, wait_until

from forcedphot.api.app import create_app
from forcedphot.serving.job_store import PARTIAL_RESULT, JobStore


def job_body(*exposures):
    items = exposures or ({"exposure": data_id()}, {"exposure": data_id(visit=VISIT + 1)})
    return {"exposures": list(items), "objects": {"uri": "tables/objects.parquet"}, "psf_fwhm": FWHM}


def client_for(repo, data_dir, **settings):
    defaults = {"job_heartbeat_seconds": 0.05, "job_stale_seconds": 0.5}
    return TestClient(create_app(settings_for(repo["root"], data_dir, **{**defaults, **settings})), headers=AUTH)


def state_of(client, job_id):
    return client.get(f"/v1/jobs/{job_id}").json()


def failing(times: int, error: Exception, real):
    """``real``, raising ``error`` on its first ``times`` calls."""
    calls = {"n": 0}

    def call(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= times:
            raise error
        return real(*args, **kwargs)

    return call


def test_disk_full_while_writing_the_result_fails_the_job_and_the_runner_goes_on(repo, tmp_path, monkeypatch):
    """The probe's sequence: the partial result cannot be written (ENOSPC), then recording
    the outcome fails (disk I/O error) until space is back. The job ends failed with the
    reason, no partial file is left, and the next job runs."""
    from forcedphot.serving import jobs as jobs_module

    real_merge = jobs_module.merge_parts

    def full_disk(parts, path, provenance, **kwargs):
        Path(path).write_bytes(b"half a parquet file")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    with client_for(repo, tmp_path) as c:
        store = c.app.state.runtime.jobs
        monkeypatch.setattr(jobs_module, "merge_parts", full_disk)
        monkeypatch.setattr(store, "finish", failing(3, sqlite3.OperationalError("disk I/O error"), store.finish))
        job = c.post("/v1/jobs", json=job_body()).json()
        status = wait_until(lambda: (s := state_of(c, job["id"]))["state"] == "failed" and s, timeout=20)
        assert "No space left on device" in status["errors"][0]["detail"] and str(tmp_path) not in str(status)
        assert not list((tmp_path / "jobs").glob(f"*/{PARTIAL_RESULT}*")) and not list((tmp_path / "jobs").glob("*/parts-*"))
        monkeypatch.setattr(jobs_module, "merge_parts", real_merge)
        assert c.app.state.runtime.runner.alive()
        second = c.post("/v1/jobs", json=job_body()).json()
        assert wait_until(lambda: state_of(c, second["id"])["state"] == "succeeded", timeout=20)


def test_claim_errors_are_retried_not_fatal(repo, tmp_path, monkeypatch):
    with client_for(repo, tmp_path) as c:
        store = c.app.state.runtime.jobs
        monkeypatch.setattr(store, "claim", failing(5, sqlite3.OperationalError("database is locked"), store.claim))
        job = c.post("/v1/jobs", json=job_body()).json()
        assert wait_until(lambda: state_of(c, job["id"])["state"] == "succeeded", timeout=20)
        assert c.app.state.runtime.runner.alive()


def test_partial_results_left_by_a_dead_run_are_removed_at_start(repo, tmp_path):
    leftover = tmp_path / "jobs" / "deadbeef" / PARTIAL_RESULT
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half a parquet file")
    with client_for(repo, tmp_path) as c:
        assert c.get("/readyz").status_code == 200
    assert not leftover.exists()


def test_a_stuck_run_is_not_heartbeaten_and_is_requeued(repo, tmp_path, monkeypatch):
    """Heartbeats follow progress: a run that makes none for stale_seconds goes back to the queue."""
    release = threading.Event()
    with client_for(repo, tmp_path) as c:
        runtime = c.app.state.runtime
        real_run = runtime.service.run

        def stuck(task, progress=None):
            release.wait(30)
            return real_run(task, progress)

        monkeypatch.setattr(runtime.service, "run", stuck)
        job = c.post("/v1/jobs", json=job_body({"exposure": data_id()})).json()
        wait_until(lambda: state_of(c, job["id"])["state"] == "running", timeout=10)
        requeued = wait_until(lambda: state_of(c, job["id"])["state"] == "queued", timeout=10)
        release.set()
        assert requeued
        status = wait_until(lambda: (s := state_of(c, job["id"]))["state"] in ("succeeded", "failed") and s, timeout=30)
    assert status["attempts"] >= 2


def test_readiness_reports_an_unwritable_store_as_degraded_and_a_dead_runner_as_not_ready(repo, tmp_path, monkeypatch):
    with client_for(repo, tmp_path) as c:
        runtime = c.app.state.runtime
        assert c.get("/readyz").status_code == 200
        monkeypatch.setattr(runtime.jobs, "probe_write", failing(10**6, sqlite3.OperationalError("attempt to write a readonly database"),
                                                                 runtime.jobs.probe_write))
        ready = c.get("/readyz")  # still in service: reads and requests work, new jobs are refused
        assert ready.status_code == 200 and ready.json()["status"] == "degraded" and "readonly" in ready.json()["checks"]["jobs"]
        monkeypatch.undo()
        assert c.get("/readyz").json()["status"] == "ready"
        runtime.runner.stop()
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "runner has stopped" in ready.json()["checks"]["jobs"]


@pytest.mark.parametrize("error, slug", [
    (sqlite3.OperationalError("database or disk is full"), "store-unavailable"),
    (OSError(errno.ENOSPC, "No space left on device", "/server/path/jobs/x/objects.parquet"), "storage-unavailable"),
])
def test_store_faults_on_submission_are_503_with_retry_after(repo, tmp_path, monkeypatch, error, slug):
    with client_for(repo, tmp_path) as c:
        store = c.app.state.runtime.jobs
        monkeypatch.setattr(store, "create", failing(1, error, store.create))
        refused = c.post("/v1/jobs", json=job_body())
        accepted = c.post("/v1/jobs", json=job_body())
    assert refused.status_code == 503 and refused.json()["type"].endswith(slug), refused.text
    assert int(refused.headers["retry-after"]) > 0 and "/server/path" not in refused.text
    assert accepted.status_code == 202


def test_upload_onto_a_full_disk_is_503(repo, tmp_path, monkeypatch):
    import shutil as shutil_module

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with client_for(repo, tmp_path) as c:
        monkeypatch.setattr(shutil_module, "copyfileobj", full)
        with open(repo["calexp"], "rb") as f:
            response = c.post("/v1/forced-photometry", files={"exposure": ("calexp.fits", f), "objects": ("o.csv", b"diaObjectId,ra,dec\n1,1,1\n", "text/csv")},
                              data={"psf_fwhm": str(FWHM)})
    assert response.status_code == 503 and response.json()["type"].endswith("storage-unavailable"), response.text


def test_a_corrupt_job_store_starts_the_service_without_jobs(repo, tmp_path, caplog):
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "jobs.sqlite").write_bytes(b"this is not a database" * 100)
    with client_for(repo, tmp_path) as c:
        measured = c.post("/v1/forced-photometry", json={"exposure": data_id(), "objects": {"uri": "tables/objects.parquet"}, "psf_fwhm": FWHM})
        jobs = c.post("/v1/jobs", json=job_body())
        ready = c.get("/readyz")
    assert measured.status_code == 200
    assert jobs.status_code == 503 and jobs.json()["type"].endswith("jobs-unavailable") and "retry-after" in jobs.headers
    assert ready.status_code == 503 and "job store cannot be opened" in ready.json()["checks"]["jobs"]
    assert str(tmp_path) not in ready.text
    assert [r for r in caplog.records if "jobs unavailable" in r.getMessage()]


def test_the_same_file_under_several_names_is_one_exposure(repo, tmp_path):
    (repo["root"] / "alias").mkdir(exist_ok=True)
    link = repo["root"] / "alias" / "calexp.fits"
    if not link.exists():
        link.symlink_to(repo["calexp"])
    relative = repo["calexp"].relative_to(repo["root"]).as_posix()
    with client_for(repo, tmp_path) as c:
        response = c.post("/v1/jobs", json=job_body({"exposure": data_id()}, {"exposure": {"uri": relative}},
                                                    {"exposure": {"uri": "./" + relative}}, {"exposure": {"uri": "alias/calexp.fits"}}))
    assert response.status_code == 422 and "more than once" in response.json()["detail"], response.text
    assert str(repo["root"]) not in response.text


def test_readiness_names_no_server_path(tmp_path):
    app = create_app(settings_for(tmp_path / "no-such-root", tmp_path / "data"))
    with TestClient(app) as c:
        ready = c.get("/readyz")
    assert ready.status_code == 503 and "repository root 1 of 1" in ready.text and str(tmp_path) not in ready.text


def test_job_store_write_probe(tmp_path):
    store = JobStore(tmp_path)
    store.probe_write()
    assert not (tmp_path / ".write-probe").exists()
