"""Requests measured in a pool of measurement processes (the default on the NumPy backend):
same answers as the engine, errors still named, a dead process costs one 503 and no more."""

from concurrent.futures import ThreadPoolExecutor
import os
from pathlib import Path
import signal

from fastapi.testclient import TestClient
import numpy as np
import pytest
from service_helpers import AUTH, FWHM, assert_same_catalog, data_id, engine_catalog, read_parquet, settings_for, wait_until

from forcedphot.api.app import create_app

PROCESSES = 2


@pytest.fixture(scope="module")
def client(repo, tmp_path_factory):
    app = create_app(settings_for(repo["root"], tmp_path_factory.mktemp("data"), measure_processes=PROCESSES))
    with TestClient(app, headers=AUTH) as c:
        wait_until(lambda: c.get("/readyz").status_code == 200, timeout=60, interval=0.1)
        yield c


def request(**extra) -> dict:
    return {"exposure": data_id("calexp"), "difference": data_id("difference"), "objects": {"uri": "tables/objects.parquet"},
            "psf_fwhm": FWHM, **extra}


def test_answers_equal_the_engine_and_are_measured_in_other_processes(client, repo):
    expected = engine_catalog(repo["calexp"], repo["objects"], repo["difference"])
    responses = [client.post("/v1/forced-photometry", json=request()) for _ in range(2 * PROCESSES + 1)]
    for response in responses:
        assert response.status_code == 200, response.text
        assert_same_catalog(read_parquet(response.content), expected)
    assert client.get("/v1/info").json()["measure_processes"] == PROCESSES
    runtime = client.app.state.runtime
    assert runtime.cache.nbytes == 0, "the server process itself should not have read the exposure"
    outcomes = [r.headers["x-exposure-cache"] for r in responses]
    assert set(outcomes) <= {"hit", "miss"} and outcomes.count("miss") <= PROCESSES  # each process reads it once
    metrics = client.get("/metrics").text
    counted = sum(float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith("forcedphot_exposure_cache_requests_total{"))
    assert counted >= len(responses)  # the processes' cache outcomes reach the server's metrics


def test_errors_raised_in_a_process_are_named(client, repo):
    (repo["root"] / "broken.fits").write_bytes(b"SIMPLE  =                    T" + b" " * 50)
    response = client.post("/v1/forced-photometry", json=request(exposure={"uri": "broken.fits"}, difference=None))
    assert response.status_code == 422 and "broken.fits" in response.json()["detail"], response.text
    response = client.post("/v1/forced-photometry", json=request(psf_fwhm=None))  # the test files carry no PSF_FWHM
    assert response.status_code == 422 and "no PSF given" in response.json()["detail"], response.text


def _workers() -> list[int]:
    """The measurement processes: this process's spawned children (Linux /proc)."""
    children = []
    for task in Path("/proc/self/task").glob("*"):
        children += [int(c) for c in (task / "children").read_text().split()]
    return [pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_a_killed_process_costs_only_its_own_request_then_is_replaced(client, repo):
    """Two requests in flight, one per process; killing one process answers its request
    503 (Retry-After) and the other 200; the pool then answers normally."""
    n = 30_000
    rng = np.random.default_rng(2)
    many = repo["objects"].sample(n, replace=True, random_state=1).reset_index(drop=True)
    many["diaObjectId"] = np.arange(n) + 10_000
    many["ra"] += rng.normal(0, 1e-5, n)
    many.to_parquet(repo["root"] / "tables" / "many.parquet", index=False)
    heavy = request(objects={"uri": "tables/many.parquet"})
    with ThreadPoolExecutor(2) as pool:
        before = {pid: _cpu_ticks(pid) for pid in _workers()}
        pending = [pool.submit(client.post, "/v1/forced-photometry", json=heavy) for _ in range(2)]

        def both_busy() -> list[int] | None:  # each process has used 0.2 s of CPU on its request
            working = [pid for pid in _workers() if pid in before and _cpu_ticks(pid) > before[pid] + 20]
            return working if len(working) == 2 else None

        busy = wait_until(both_busy, timeout=20, interval=0.05)
        os.kill(busy[0], signal.SIGKILL)
        codes = sorted(f.result().status_code for f in pending)
    assert codes == [200, 503], codes
    died = next(f.result() for f in pending if f.result().status_code == 503)
    assert died.headers["retry-after"] == "1" and "retry" in died.json()["detail"]
    again = client.post("/v1/forced-photometry", json=request())
    assert again.status_code == 200, again.text
    assert_same_catalog(read_parquet(again.content), engine_catalog(repo["calexp"], repo["objects"], repo["difference"]))
