"""Two ``forcedphot serve`` replicas sharing one PostgreSQL job store (a real server, see
tests/postgres_helpers.py) and one data directory: jobs submitted to either are run
exactly once, kill -9 of a replica mid-job loses nothing, and one idempotency key gives one
job whichever replicas it reaches."""

import io
import threading

import httpx
import pandas as pd
import pytest
from server_helpers import Server, demo_request, many_objects
from service_helpers import assert_same_catalog, wait_until

FAST_RECOVERY = {"FORCEDPHOT_JOB_HEARTBEAT_SECONDS": "0.2", "FORCEDPHOT_JOB_STALE_SECONDS": "1", "FORCEDPHOT_MEASURE_PROCESSES": "0"}


@pytest.fixture
def shared(postgres, tmp_path_factory):
    """Settings two replicas share: a fresh PostgreSQL database, one data directory."""
    return tmp_path_factory.mktemp("replicas"), {**FAST_RECOVERY, "FORCEDPHOT_DATABASE_URL": postgres.new_database()}


def _finished(server: Server, job_id: str):
    status = httpx.get(f"{server.url}/v1/jobs/{job_id}").json()
    return status if status["state"] in ("succeeded", "failed") else None


def _job_body(visits, objects=None) -> dict:
    return {"exposures": [{k: v for k, v in demo_request(visit).items() if k != "objects"} for visit in visits],
            "objects": objects or {"uri": visits[0]["objects"]}}


def test_jobs_submitted_to_either_replica_run_exactly_once_and_keys_are_shared(shared):
    data_dir, env = shared
    first = Server(data_dir, **env).start()
    second = Server(data_dir, **env).start()
    try:
        visits = httpx.get(f"{first.url}/v1/info").json()["demo"][:6]
        assert httpx.get(f"{first.url}/v1/info").json()["settings"]["job_store"] == "postgresql"
        ids = [httpx.post(f"{server.url}/v1/jobs", json=_job_body([visit]), timeout=60).json()["id"]
               for server, visit in zip([first, second] * 3, visits)]
        statuses = [wait_until(lambda job_id=job_id: _finished(second, job_id), timeout=120, interval=0.2) for job_id in ids]
        listed = {j["id"] for j in httpx.get(f"{first.url}/v1/jobs", params={"limit": 50}).json()["jobs"]}
        finished = sum(_jobs_finished(server) for server in (first, second))

        # one key sent to both replicas at once: one job
        body, answers = _job_body(visits[:2]), [None, None]
        barrier = threading.Barrier(2)

        def submit(i, server):
            barrier.wait()
            answers[i] = httpx.post(f"{server.url}/v1/jobs", json=body, headers={"Idempotency-Key": "one-key-two-replicas"}, timeout=60)

        threads = [threading.Thread(target=submit, args=(i, s)) for i, s in enumerate((first, second))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        keyed = wait_until(lambda: _finished(first, answers[0].json()["id"]), timeout=120, interval=0.2)
        sync = httpx.post(f"{first.url}/v1/forced-photometry", json=demo_request(visits[0]), timeout=60)
        result = httpx.get(f"{second.url}{statuses[0]['result']}", timeout=60)
    finally:
        first.stop()
        second.stop()
    assert len(set(ids)) == 6 and set(ids) <= listed  # either replica lists every job
    assert all(s["state"] == "succeeded" and s["attempts"] == 1 and s["errors"] == [] for s in statuses)  # each claimed once
    assert finished == 6  # and finished once, by one replica or the other
    assert sorted(a.status_code for a in answers) == [200, 202] and answers[0].json()["id"] == answers[1].json()["id"]
    assert keyed["state"] == "succeeded" and keyed["attempts"] == 1
    assert_same_catalog(pd.read_parquet(io.BytesIO(result.content)), pd.read_parquet(io.BytesIO(sync.content)))


def _jobs_finished(server: Server) -> float:
    """The replica's count of jobs it finished (its Prometheus metric)."""
    text = httpx.get(f"{server.url}/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("forcedphot_jobs_finished_total"))


def test_kill_9_of_the_replica_running_a_job_loses_nothing(shared):
    data_dir, env = shared
    doomed = Server(data_dir, **env).start()
    survivor = None
    try:
        visits = httpx.get(f"{doomed.url}/v1/info").json()["demo"][:12]  # long enough to outlast the second replica's start
        body = _job_body(visits, many_objects(data_dir, visits[0], 20_000))
        job = httpx.post(f"{doomed.url}/v1/jobs", json=body, headers={"Idempotency-Key": "kill-a-replica"}, timeout=60).json()
        wait_until(lambda: httpx.get(f"{doomed.url}/v1/jobs/{job['id']}").json()["state"] == "running", timeout=30, interval=0.01)
        survivor = Server(data_dir, **env).start()  # started after the claim: the job is the doomed replica's
        assert httpx.get(f"{survivor.url}/v1/jobs/{job['id']}").json()["state"] == "running"
        doomed.kill()
        status = wait_until(lambda: _finished(survivor, job["id"]), timeout=120, interval=0.2)
        again = httpx.post(f"{survivor.url}/v1/jobs", json=body, headers={"Idempotency-Key": "kill-a-replica"}, timeout=60)
        result = httpx.get(f"{survivor.url}{status['result']}", timeout=60)
        singles = [httpx.post(f"{survivor.url}/v1/forced-photometry", json=demo_request(visit, body["objects"]), timeout=120)
                   for visit in visits]
    finally:
        doomed.stop()
        if survivor is not None:
            survivor.stop()
    assert status["state"] == "succeeded" and status["attempts"] == 2 and status["errors"] == []
    assert again.status_code == 200 and again.json()["id"] == job["id"]
    catalog = pd.read_parquet(io.BytesIO(result.content))
    expected = pd.concat([pd.read_parquet(io.BytesIO(r.content)) for r in singles], ignore_index=True)
    assert len(catalog) == len(expected) > 1000
    for visit in expected["visit"].unique():
        assert_same_catalog(catalog[catalog["visit"] == visit], expected[expected["visit"] == visit])
