"""Jobs belong to the API key that submitted them: other keys get 404 (listings too), an
idempotency key is one client's, one key cannot take every active-job place, and a
result in another format is encoded once and served from disk (hostile-client probe,
round 3, items 4 and 7)."""

from concurrent.futures import ThreadPoolExecutor
import io

from fastapi.testclient import TestClient
import pandas as pd
import pytest
from service_helpers import API_KEY, FWHM, VISIT, data_id, settings_for, wait_until

from forcedphot.api.app import create_app
from forcedphot.api.routes import jobs as jobs_routes

OTHER_KEY = "other-key-0123456789abcdef"
A = {"Authorization": f"Bearer {API_KEY}"}
B = {"Authorization": f"Bearer {OTHER_KEY}"}


def job_body(visit: int = VISIT):
    return {"exposures": [{"exposure": data_id(visit=visit)}], "objects": {"uri": "tables/objects.parquet"}, "psf_fwhm": FWHM}


@pytest.fixture()
def client(repo, tmp_path):
    app = create_app(settings_for(repo["root"], tmp_path, api_keys=[API_KEY, OTHER_KEY], max_active_jobs_per_key=2,
                                  job_heartbeat_seconds=0.05))
    with TestClient(app) as c:
        yield c


def finished(client, job_id, headers):
    return wait_until(lambda: (s := client.get(f"/v1/jobs/{job_id}", headers=headers).json())["state"] in ("succeeded", "failed") and s)


def test_another_key_cannot_see_fetch_or_delete_a_job(client):
    job = client.post("/v1/jobs", json=job_body(), headers=A).json()
    assert finished(client, job["id"], A)["state"] == "succeeded"
    for method, path in (("GET", f"/v1/jobs/{job['id']}"), ("GET", f"/v1/jobs/{job['id']}/result"), ("DELETE", f"/v1/jobs/{job['id']}")):
        response = client.request(method, path, headers=B)
        assert response.status_code == 404 and "of this API key" in response.json()["detail"], (method, path, response.text)
    assert client.get("/v1/jobs", headers=B).json()["jobs"] == []
    assert [j["id"] for j in client.get("/v1/jobs", headers=A).json()["jobs"]] == [job["id"]]
    assert client.get(f"/v1/jobs/{job['id']}/result", headers=A).status_code == 200  # still there: B's DELETE did nothing


def test_idempotency_keys_are_scoped_per_api_key(client):
    key = {"Idempotency-Key": "nightly-1"}
    first = client.post("/v1/jobs", json=job_body(), headers={**A, **key})
    replayed = client.post("/v1/jobs", json=job_body(), headers={**B, **key})
    assert first.status_code == 202 and replayed.status_code == 202  # B gets a job of its own, not A's
    assert replayed.json()["id"] != first.json()["id"]
    other_body = client.post("/v1/jobs", json=job_body(VISIT + 1), headers={**B, "Idempotency-Key": "claimed-by-b"})
    mine = client.post("/v1/jobs", json=job_body(), headers={**A, "Idempotency-Key": "claimed-by-b"})
    assert other_body.status_code == 202 and mine.status_code == 202  # B's use of a key does not block A
    again = client.post("/v1/jobs", json=job_body(), headers={**A, **key})
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]


def test_one_key_cannot_take_every_active_job_place(client):
    client.app.state.runtime.runner.stop()  # jobs stay queued
    codes = [client.post("/v1/jobs", json=job_body(), headers=A).status_code for _ in range(4)]
    assert codes == [202, 202, 429, 429]
    refused = client.post("/v1/jobs", json=job_body(), headers=A)
    assert "this API key has 2 jobs" in refused.json()["detail"] and refused.headers["retry-after"]
    assert client.post("/v1/jobs", json=job_body(), headers=B).status_code == 202


def test_a_result_in_another_format_is_encoded_once_and_served_from_disk(client, monkeypatch):
    job = client.post("/v1/jobs", json=job_body(), headers=A).json()
    assert finished(client, job["id"], A)["state"] == "succeeded"
    calls = []
    real = jobs_routes.convert

    def counted(*args):
        calls.append(args[1])
        return real(*args)

    monkeypatch.setattr(jobs_routes, "convert", counted)
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: client.get(f"/v1/jobs/{job['id']}/result", headers={**A, "Accept": "text/csv"}), range(3)))
    assert [a.status_code for a in answers] == [200] * 3 and len({a.content for a in answers}) == 1
    assert calls == ["csv"]
    csv = pd.read_csv(io.BytesIO(answers[0].content), comment="#")
    parquet = pd.read_parquet(io.BytesIO(client.get(f"/v1/jobs/{job['id']}/result", headers=A).content))
    assert len(csv) == len(parquet) and (csv["diaObjectId"].to_numpy() == parquet["diaObjectId"].to_numpy()).all()
    json_rows = client.get(f"/v1/jobs/{job['id']}/result", headers={**A, "Accept": "application/json"}).json()
    assert [r["diaObjectId"] for r in json_rows] == parquet["diaObjectId"].tolist()
    assert calls == ["csv", "json"]


def test_whole_table_formats_are_bounded(repo, tmp_path):
    app = create_app(settings_for(repo["root"], tmp_path, max_table_encode_rows=5, job_heartbeat_seconds=0.05))
    with TestClient(app, headers=A) as c:
        job = c.post("/v1/jobs", json=job_body()).json()
        assert finished(c, job["id"], A)["state"] == "succeeded"
        refused = c.get(f"/v1/jobs/{job['id']}/result", headers={"Accept": "application/fits"})
        assert refused.status_code == 413 and "parquet, CSV" in refused.json()["detail"]
        assert c.get(f"/v1/jobs/{job['id']}/result", headers={"Accept": "text/x-ecsv"}).status_code == 200
