"""A real full disk (a small tmpfs): reads of jobs, results and light curves keep working,
new jobs get 503 naming the storage, readiness says degraded, and all recovers when space
is back (hostile-client probe, round 3, item 9)."""

from pathlib import Path
import subprocess

from fastapi.testclient import TestClient
import pytest
from service_helpers import AUTH, FWHM, data_id, settings_for, wait_until

from forcedphot.api.app import create_app


@pytest.fixture()
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(folder: Path) -> Path:
    """Fill the disk. Unbuffered: a buffered file keeps the part of its last write the disk
    refused, and flushing it on close raised ENOSPC again, out of the loop (seen once in CI)."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    return filler


def test_reads_work_on_a_full_disk_and_writes_say_why_not(repo, small_disk):
    job_body = {"exposures": [{"exposure": data_id()}], "objects": {"uri": "tables/objects.parquet"}, "psf_fwhm": FWHM}
    position = {"objects": {"ra": float(repo["objects"]["ra"][0]), "dec": float(repo["objects"]["dec"][0])}, "psf_fwhm": FWHM}
    app = create_app(settings_for(repo["root"], small_disk / "data", job_heartbeat_seconds=0.05))
    with TestClient(app, headers=AUTH) as c:
        wait_until(lambda: c.get("/readyz").status_code == 200)
        job = c.post("/v1/jobs", json=job_body).json()
        wait_until(lambda: c.get(f"/v1/jobs/{job['id']}").json()["state"] == "succeeded")
        filler = fill(small_disk)
        assert c.get("/v1/jobs").status_code == 200
        assert c.get(f"/v1/jobs/{job['id']}").json()["state"] == "succeeded"
        assert c.get(f"/v1/jobs/{job['id']}/result").status_code == 200
        assert c.post("/v1/lightcurves", json=position, headers={"Accept": "application/json"}).status_code == 200
        refused = c.post("/v1/jobs", json=job_body)
        assert refused.status_code == 503 and refused.json()["type"].endswith("storage-unavailable"), refused.text
        assert "No space left" in refused.json()["detail"] and str(small_disk) not in refused.text and refused.headers["retry-after"]
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "degraded"
        filler.unlink()
        again = c.post("/v1/jobs", json=job_body)
        assert again.status_code == 202, again.text
        assert c.get("/readyz").json()["status"] == "ready"
