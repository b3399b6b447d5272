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
import gzip
import io
import json
import os
from pathlib import Path
import shutil
import secrets
import signal
import socket
import sys
import tempfile
import time

from astropy.io import fits
import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from server_helpers import read_answer  # noqa: E402  (the end-to-end tests' helper)
from service import Server, alert_objects, repository  # noqa: E402  (the service benchmark's helpers)

SETTINGS = {"MEASURE_PROCESSES": "2", "REQUEST_TIME_LIMIT_SECONDS": "2", "BODY_TIMEOUT_SECONDS": "2",
            "HEADER_TIMEOUT_SECONDS": "1", "MAX_CONCURRENT_REQUESTS": "8", "WRITE_TIMEOUT_SECONDS": "5"}
OTHER_KEY = "b" * 32  # a second API key: it probes the first key's jobs


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

    def upload_answer(self, path: Path):
        """A function uploading ``path`` as the exposure, giving the answer's status and type."""
        def send() -> str:
            r, _ = self.upload(path)()
            return f"{r.status_code} {r.json()['type'].rsplit(':', 1)[1]}"
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
        closed = count_closed(held)
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


def memory(pid: int) -> tuple[float, float]:
    """(RSS, peak RSS) of a process, MiB (Linux /proc: VmRSS, VmHWM)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def count_closed(sockets: list[socket.socket]) -> int:
    """How many of ``sockets`` the server closes within 5 s of waiting on each; closes them all."""
    closed = 0
    for s in sockets:
        s.settimeout(5)
        try:
            closed += s.recv(10) == b""
        except OSError:
            pass
        s.close()
    return closed


def constant_parquet(rows: int) -> bytes:
    """``rows`` identical DiaObjects, zstd: a few hundred KB (the probe's 818 KB for 60 M rows)."""
    piece = pa.table({"diaObjectId": np.ones(1_000_000, np.int64), "ra": np.ones(1_000_000), "dec": np.ones(1_000_000)})
    sink = io.BytesIO()
    with pq.ParquetWriter(sink, piece.schema, compression="zstd") as writer:
        for start in range(0, rows, 1_000_000):
            writer.write_table(piece.slice(0, min(1_000_000, rows - start)))
    return sink.getvalue()


class Round3:
    """The cases of the third hostile-client probe (issue 19): what each input costs the
    server process (RSS before, peak after), and what it answers."""

    def __init__(self, probe: Probe, root: Path, visit: int, detector: int):
        self.probe, self.root, self.visit, self.detector = probe, root, visit, detector
        self.server = probe.server

    def measured(self, label: str, size: str, send) -> None:
        """Run ``send()`` (returns the answer's description) and record the server's memory."""
        before, _ = memory(self.server.process.pid)
        start = time.perf_counter()
        answer = send()
        seconds = time.perf_counter() - start
        after, peak = memory(self.server.process.pid)
        alive = self.server.process.poll() is None
        self.probe.record(f"{label} ({size})", answer, f"{seconds:.2f} s",
                          f"RSS {before:.0f} -> {after:.0f} MiB, peak {peak:.0f}; {'alive' if alive else 'DEAD'}")

    def upload_objects(self, content: bytes, name: str, media_type: str) -> str:
        r = httpx.post(f"{self.server.url}/v1/forced-photometry", headers=self.probe.headers, timeout=120,
                       data={"exposure_ref": json.dumps(self.probe.exposure["exposure"]), "psf_fwhm": "3.5"},
                       files={"objects": (name, content, media_type)})
        return f"{r.status_code} {r.json()['type'].rsplit(':', 1)[1]}" if r.status_code != 200 else "200"

    def json_body(self, body: bytes) -> str:
        r = httpx.post(f"{self.server.url}/v1/forced-photometry", content=body, timeout=120,
                       headers={**self.probe.headers, "Content-Type": "application/json"})
        return f"{r.status_code} {r.json()['type'].rsplit(':', 1)[1]}"

    def run(self, scratch: Path) -> None:
        parquet = constant_parquet(60_000_000)
        self.measured("parquet of 60 M constant rows", f"{len(parquet) / 1e3:.0f} KB",
                      lambda: self.upload_objects(parquet, "o.parquet", "application/vnd.apache.parquet"))
        empty = b"[" + b",".join([b"{}"] * 10_000_000) + b"]"
        self.measured("JSON objects [{}, {}, ...] in a form part", f"{len(empty) / 2**20:.0f} MiB",
                      lambda: self.upload_objects(empty, "o.json", "application/json"))
        body = b'{"exposure": ' + json.dumps(self.probe.exposure["exposure"]).encode() + b', "objects": [' + b",".join([b"{}"] * 56_000_000) + b"]}"
        self.measured("JSON body of empty records", f"{len(body) / 2**20:.0f} MiB", lambda: self.json_body(body))
        body = body[:30 * 2**20 - 2] + b"]}"
        self.measured("JSON body of empty records under the byte limit", f"{len(body) / 2**20:.0f} MiB", lambda: self.json_body(body))

        def methods() -> str:
            for i in range(300):  # request lines up to 16 KiB reach the parser (h11 takes any method token, httptools refuses unknown ones)
                with socket.create_connection(("127.0.0.1", self.server.port)) as s:
                    s.sendall(f"X{'M' * 10_000}{i} /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                    s.recv(65536)
            return f"/metrics {len(httpx.get(self.server.url + '/metrics').content) / 1e3:.0f} KB"
        self.measured("300 requests with 10,000-character methods", "3 MB", methods)

        job = httpx.post(f"{self.server.url}/v1/jobs", headers=self.probe.headers, timeout=60,
                         json={"exposures": [self.probe.exposure], "objects": self.probe.heavy, "psf_fwhm": 3.5}).json()
        while httpx.get(f"{self.server.url}/v1/jobs/{job['id']}", headers=self.probe.headers).json()["state"] not in ("succeeded", "failed"):
            time.sleep(0.5)
        status = httpx.get(f"{self.server.url}/v1/jobs/{job['id']}", headers=self.probe.headers).json()

        def fetch_csv() -> str:
            with ThreadPoolExecutor(3) as pool:
                codes = list(pool.map(lambda _: httpx.get(f"{self.server.url}/v1/jobs/{job['id']}/result", timeout=120,
                                                          headers={**self.probe.headers, "Accept": "text/csv"}).status_code, range(3)))
            return f"{codes}"
        self.measured(f"3 concurrent CSV fetches of a {status['rows']}-row job result", "3 requests", fetch_csv)
        other = {"Authorization": f"Bearer {OTHER_KEY}"}
        self.measured("key B reads, fetches and deletes key A's job", "3 requests", lambda: str(
            [httpx.request(m, f"{self.server.url}/v1/jobs/{job['id']}{p}", headers=other).status_code
             for m, p in (("GET", ""), ("GET", "/result"), ("DELETE", ""))]))

        folder = self.root / "99" / "1"
        folder.mkdir(parents=True, exist_ok=True)
        source = self.root / f"{self.visit}" / f"{self.detector}" / "calexp.fits"
        shutil.copy(source, folder / "calexp.fits")
        target = self.probe.alert[0]
        query = {"visit": 99, "detector": 1, "ra": target["ra"], "dec": target["dec"], "size": 32}
        httpx.get(f"{self.server.url}/v1/stamps", params=query, headers=self.probe.headers)

        def rewritten() -> str:
            with open(folder / "calexp.fits", "r+b") as f:
                f.truncate(os.path.getsize(folder / "calexp.fits") // 3)
            r = httpx.get(f"{self.server.url}/v1/stamps", params=query, headers=self.probe.headers)
            return f"{r.status_code} {r.json()['type'].rsplit(':', 1)[1]}"
        try:
            self.measured("exposure truncated in place while served", "stamps", rewritten)
        finally:
            shutil.rmtree(self.root / "99")

        psf = scratch / "hostile.psf"
        write_hostile_psfex(psf, PSF_SAMP=300.0)
        self.measured("PSFEx upload with PSF_SAMP=300", f"{psf.stat().st_size / 1e3:.1f} KB", lambda: self.upload_psf(psf))
        bomb = scratch / "bomb.fits.gz"
        header = "SIMPLE  =                    T" + " " * 49 + f"{'BITPIX  =                  -32':80s}{'NAXIS   =                    2':80s}"
        header += f"{'NAXIS1  =                32768':80s}{'NAXIS2  =                16384':80s}{'END':80s}"
        bomb.write_bytes(gzip.compress(header.ljust(2880).encode() + bytes(2880 * 100)))
        self.measured("gzip FITS declaring 2 GiB", f"{bomb.stat().st_size / 1e3:.1f} KB", self.probe.upload_answer(bomb))

        def trickled() -> str:
            held = []
            for _ in range(300):
                s = socket.create_connection(("127.0.0.1", self.server.port))
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                read_answer(s)
                s.sendall(b"GET /healthz HTTP/1.1\r\nHo")  # the next request's headers, never finished
                held.append(s)
            return f"{count_closed(held)}/300 closed by the server"
        self.measured("300 connections trickling a later request's headers", "keep-alive", trickled)

        def unread() -> str:
            body = json.dumps({**self.probe.exposure, "objects": self.probe.heavy[:6_000], "psf_fwhm": 3.5, "include_offimage": True}).encode()
            held = []
            for _ in range(6):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.connect(("127.0.0.1", self.server.port))
                s.sendall(b"POST /v1/forced-photometry HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAccept: application/json\r\n"
                          + f"Authorization: {self.probe.headers['Authorization']}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
                held.append(s)
            time.sleep(40)  # measured, then unread past the write timeout
            rss = memory(self.server.process.pid)[0]
            dropped, codes = 0, []
            for s in held:
                s.settimeout(5)
                received = b""
                try:
                    while chunk := s.recv(1 << 20):
                        received += chunk
                except OSError:  # reset by the server
                    pass
                length = int(received.split(b"content-length: ")[1].split(b"\r\n")[0]) if b"content-length: " in received else 0
                dropped += len(received.partition(b"\r\n\r\n")[2]) < length
                codes.append(received[9:12].decode())
                s.close()
            return f"{codes}: {dropped}/6 dropped by the server; RSS {rss:.0f} MiB after 40 s"
        self.measured("6 clients never reading 6k-object JSON answers", "~10 MB each", unread)

    def upload_psf(self, path: Path) -> str:
        with open(path, "rb") as f:
            r = httpx.post(f"{self.server.url}/v1/forced-photometry", headers=self.probe.headers, timeout=120,
                           data={"exposure_ref": json.dumps(self.probe.exposure["exposure"])},
                           files={"psf": ("hostile.psf", f), "objects": ("o.json", json.dumps(self.probe.alert[:5]).encode(), "application/json")})
        return f"{r.status_code} {r.json()['type'].rsplit(':', 1)[1]}"


def write_hostile_psfex(path: Path, **changes) -> None:
    """A one-basis PSFEx file (degree 0) with ``changes`` to its header."""
    basis = np.zeros((1, 25, 25), np.float32)
    basis[0, 12, 12] = 1
    column = fits.Column(name="PSF_MASK", format=f"{basis.size}E", dim="(25, 25, 1)", array=basis[None])
    table = fits.BinTableHDU.from_columns([column], name="PSF_DATA")
    table.header.update(POLNAXIS=2, POLGRP1=1, POLNAME1="X_IMAGE", POLZERO1=1024.0, POLSCAL1=2048.0, POLGRP2=1, POLNAME2="Y_IMAGE",
                        POLZERO2=1024.0, POLSCAL2=2048.0, POLNGRP=1, POLDEG1=0, PSF_FWHM=3.5, PSF_SAMP=1.0, PSFNAXIS=3,
                        PSFAXIS1=25, PSFAXIS2=25, PSFAXIS3=1)
    table.header.update(changes)
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(path, overwrite=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--only", choices=["round3"], help="run only the third probe's cases (issue 19)")
    args = parser.parse_args()
    root, visit, detector = repository(args.size)
    key = secrets.token_hex(16)
    print(f"{args.size}x{args.size} detector, NumPy, settings {SETTINGS}")
    print(f"{'sent':58s} {'answer':34s} {'time':>9s}  good requests")
    server = Server(root, "processes", key, **SETTINGS, API_KEYS=f"{key},{OTHER_KEY}")
    try:
        server.wait_ready()
        with tempfile.TemporaryDirectory() as scratch:
            probe = Probe(root, visit, detector, key, server)
            if args.only != "round3":
                probe.run(Path(scratch))
            Round3(probe, root, visit, detector).run(Path(scratch))
            if args.only == "round3":
                return
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
