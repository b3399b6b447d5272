"""Hostile inputs and faults against a real ``forcedphot serve``: what each one costs.

    python bench/reliability.py [--size 2048]

Starts the service (loopback only, NumPy, two measurement processes, a 2 s time budget,
2 s body and 1 s header timeouts) on a cached demo repository, then tries each input of
the hostile-client probe while good requests run, and prints one row per probe: what
was sent, the answer, how long it took, and how the good requests fared. Every loop is
bounded. Store faults (full disk, read-only or corrupt database) need a wrapped store
and are exercised by ``tests/serving/test_job_faults.py`` instead.
"""

import argparse
from concurrent.futures import ThreadPoolExecutor
import json
from pathlib import Path
import secrets
import signal
import socket
import sys
import tempfile
import time

from astropy.io import fits
import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from service import Server, alert_objects, repository  # noqa: E402  (the service benchmark's helpers)

SETTINGS = {"MEASURE_PROCESSES": "2", "REQUEST_TIME_LIMIT_SECONDS": "2", "BODY_TIMEOUT_SECONDS": "2",
            "HEADER_TIMEOUT_SECONDS": "1", "MAX_CONCURRENT_REQUESTS": "8"}


def compression_bomb(path: Path, side: int = 20000) -> Path:
    """A small file whose compressed HDU declares side x side pixels in one tile."""
    hdu = fits.CompImageHDU(np.zeros((64, 64), np.float32), compression_type="GZIP_1", tile_shape=(64, 64), name="IMAGE")
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(path, overwrite=True)
    with fits.open(path, mode="update", disable_image_compression=True) as hdul:
        for key in ("ZNAXIS1", "ZNAXIS2", "ZTILE1", "ZTILE2"):
            hdul[1].header[key] = side
    return path


def many_hdus(path: Path, count: int = 20000) -> Path:
    fits.HDUList([fits.PrimaryHDU()] + [fits.ImageHDU() for _ in range(count)]).writeto(path, overwrite=True)
    return path


class Probe:
    """One server, its good request, and the rows of the table."""

    def __init__(self, root: Path, visit: int, detector: int, key: str, server: Server):
        self.server, self.headers = server, {"Authorization": f"Bearer {key}"}
        ref = {"visit": visit, "detector": detector}
        self.exposure = {"exposure": {**ref, "datasetType": "calexp"}, "difference": {**ref, "datasetType": "difference"}}
        self.alert = alert_objects(root, visit, detector, 200)
        self.heavy = alert_objects(root, visit, detector, 100_000, seed=1)
        self.rows: list[tuple[str, str, str, str]] = []

    def post(self, objects, timeout=60.0, **extra) -> httpx.Response:
        return httpx.post(f"{self.server.url}/v1/forced-photometry", json={**self.exposure, "objects": objects, "psf_fwhm": 3.5, **extra},
                          headers=self.headers, timeout=timeout)

    def good_during(self, attack, attacks: int = 2) -> tuple[list, float, list[int]]:
        """Run ``attacks`` copies of ``attack`` and 4 good requests at once."""
        with ThreadPoolExecutor(attacks + 4) as pool:
            start = time.perf_counter()
            hostile = [pool.submit(attack) for _ in range(attacks)]
            good = [pool.submit(self.post, self.alert) for _ in range(4)]
            results = [f.result() for f in hostile]
            codes = [f.result().status_code for f in good]
        return results, time.perf_counter() - start, codes

    def abandoned(self) -> float:
        metrics = httpx.get(f"{self.server.url}/metrics").text
        return float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("forcedphot_requests_abandoned_total")))

    def measurement_processes(self) -> set[int]:
        """Process ids of the server's measurement processes (Linux /proc)."""
        found = set()
        for pid in self.server.processes():
            try:
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.add(pid)
            except OSError:  # gone meanwhile
                continue
        return found

    def record(self, sent: str, answer: str, seconds: str, good: str) -> None:
        self.rows.append((sent, answer, seconds, good))
        print(f"{sent:58s} {answer:34s} {seconds:>9s}  {good}", flush=True)

    def upload(self, path: Path):
        def send():
            start = time.perf_counter()
            with open(path, "rb") as f:
                r = httpx.post(f"{self.server.url}/v1/forced-photometry", headers=self.headers, timeout=60, data={"psf_fwhm": "3.5"},
                               files={"exposure": (path.name, f, "application/fits"),
                                      "objects": ("o.json", json.dumps(self.alert[:5]).encode(), "application/json")})
            return r, time.perf_counter() - start
        return send

    def run(self, scratch: Path) -> None:
        for label, path in (("GZIP FITS, one 20000 x 20000 tile (8.6 KB), x2", compression_bomb(scratch / "bomb.fits")),
                            ("FITS with 20,000 empty HDUs (57 MB), x2", many_hdus(scratch / "hdus.fits"))):
            results, _, codes = self.good_during(self.upload(path))
            worst = max(seconds for _, seconds in results)
            self.record(label, ", ".join(sorted({f"{r.status_code} {r.json()['type'].rsplit(':', 1)[1]}" for r, _ in results})),
                        f"{worst:.2f} s", f"good: {codes}")

        def late():
            start = time.perf_counter()
            r = self.post(self.heavy)
            return r, time.perf_counter() - start
        results, _, codes = self.good_during(late, attacks=1)
        r, seconds = results[0]
        self.record("100k objects, 2 s time budget", f"{r.status_code} {r.json()['type'].rsplit(':', 1)[1]}", f"{seconds:.2f} s", f"good: {codes}")

        before = self.measurement_processes()
        try:
            self.post(self.heavy, timeout=httpx.Timeout(60, read=1.0))
        except httpx.ReadTimeout:
            pass
        left = time.perf_counter()
        while time.perf_counter() - left < 5 and not (self.abandoned() and self.measurement_processes() - before):
            time.sleep(0.02)
        stopped = time.perf_counter() - left
        replaced = len(self.measurement_processes() - before)
        after = self.post(self.alert)
        self.record("100k objects, client leaves after 1 s", f"abandoned {self.abandoned():g}, {replaced} process replaced",
                    f"{stopped:.2f} s", f"next: {after.status_code}")

        slow = []
        for _ in range(16):
            s = socket.create_connection(("127.0.0.1", self.server.port))
            s.sendall(b"POST /v1/forced-photometry HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: "
                      + self.headers["Authorization"].encode() + b"\r\nContent-Length: 100000\r\n\r\n{")
            slow.append(s)
        start = time.perf_counter()
        codes = [self.post(self.alert).status_code for _ in range(8)]
        answers = set()
        for s in slow:
            s.settimeout(10)
            answers.add(s.recv(12).decode(errors="replace").strip())
            s.close()
        self.record("16 connections sending a body slowly (8 slots)", ", ".join(sorted(answers)),
                    f"{time.perf_counter() - start:.2f} s", f"good meanwhile: {codes}")

        held = [socket.create_connection(("127.0.0.1", self.server.port)) for _ in range(200)]
        for s in held:
            s.sendall(b"GET /healthz HTTP/1.1\r\n")
        start = time.perf_counter()
        closed = 0
        for s in held:
            s.settimeout(5)
            try:
                closed += s.recv(10) == b""
            except OSError:
                pass
            s.close()
        self.record("200 connections sending headers slowly", f"{closed}/200 closed by the server", f"{time.perf_counter() - start:.2f} s",
                    f"good: {self.post(self.alert).status_code}")

        for label, objects, extra in (
            ("inline diaObjectId 18446744073709551615", [{"diaObjectId": 2**64 - 1, "ra": 1.0, "dec": 1.0}], {}),
            ("inline diaObjectId 1e19", [{"diaObjectId": 1e19, "ra": 1.0, "dec": 1.0}], {}),
            ("inline ra true", [{"diaObjectId": 1, "ra": True, "dec": 1.0}], {}),
            ("psf_fwhm 0.1 px", self.alert, {"psf_fwhm": 0.1}),
        ):
            start = time.perf_counter()
            r = self.post(objects, **extra)
            self.record(label, f"{r.status_code} {r.json()['type'].rsplit(':', 1)[1]}", f"{time.perf_counter() - start:.2f} s", "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2048)
    args = parser.parse_args()
    root, visit, detector = repository(args.size)
    key = secrets.token_hex(16)
    print(f"{args.size}x{args.size} detector, NumPy, settings {SETTINGS}")
    print(f"{'sent':58s} {'answer':34s} {'time':>9s}  good requests")
    server = Server(root, "processes", key, **SETTINGS)
    try:
        server.wait_ready()
        with tempfile.TemporaryDirectory() as scratch:
            probe = Probe(root, visit, detector, key, server)
            probe.run(Path(scratch))
            # SIGTERM while a 100k-object request runs
            with ThreadPoolExecutor(1) as pool:
                pool.submit(probe.post, probe.heavy)
                time.sleep(1.0)
                start = time.perf_counter()
                server.process.send_signal(signal.SIGTERM)
                server.process.wait(60)
                code = server.process.returncode
                probe.record("SIGTERM during a 100k-object request (grace 20 s)",
                             "graceful stop, SIGTERM re-raised" if code == -signal.SIGTERM else f"exit {code}",
                             f"{time.perf_counter() - start:.2f} s", "")
    finally:
        if server.process.poll() is None:
            server.stop()
        else:
            server.data.cleanup()


if __name__ == "__main__":
    main()
