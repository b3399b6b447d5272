"""Benchmark the HTTP service with alert-like requests, in its three ways of measuring.

    python bench/service.py [--size 4096] [--objects 200] [--requests 400] [--concurrency 1,8,32] [--measurements all,psf]

Makes (once, cached in bench/.cache) a repository with one ``forcedphot demo`` detector
(science + difference image). For each mode it starts ``forcedphot serve`` on 127.0.0.1
(a free port), warms its exposure cache, then drives it from a second process (this one;
the server is its own process) with httpx at each concurrency: every request is one
detector, ``--objects`` DiaObjects sent inline as JSON records, the difference image
measured (psfFlux) and the science image (scienceFlux) as DiaForcedSourceTask does, parquet
back; each request asks for every measurement (``all``: apertures, local background and
pixel flags too) and, in a second run, for the PSF fluxes alone (``psf``, DiaForcedSourceTask's
own set). Modes:

* ``processes``: the default on NumPy: one uvicorn worker, requests measured in a pool
  of one measurement process per core;
* ``threads+batch``: one uvicorn worker per core, requests measured in threads of the
  worker, concurrent kernel calls coalesced (dynamic batching, the GPU set-up);
* ``threads``: the same without batching.

It prints requests/s and latency p50/p99 per concurrency and mode, the CPU time per
request of the server's processes (and of its main process alone) and of this client, and the engine's own time per
request (``measure`` in-process on the same files and objects, files already open).
All traffic stays on the loopback interface; every loop is bounded by --requests.
"""

import argparse
import asyncio
import os
from pathlib import Path
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

CACHE = Path(__file__).resolve().parent / ".cache"
VISIT_DIR = "{visit}/{detector}"


def repository(size: int) -> tuple[Path, int, int]:
    """A repository root holding one demo detector: <root>/<visit>/<detector>/{calexp,difference}.fits."""
    from forcedphot.demo import make_demo_visit
    from forcedphot.photometry.exposure import open_exposure

    root = CACHE / f"service-repo-{size}"
    marker = root / "ready"
    if not marker.exists():
        staging = CACHE / f"service-demo-{size}"
        visit = make_demo_visit(staging, size=size, n_objects=500, seed=7)
        folder = root / VISIT_DIR.format(visit=visit.visit, detector=visit.detector)
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("calexp.fits", "difference.fits"):
            (staging / name).replace(folder / name)
        marker.write_text(f"{visit.visit} {visit.detector}")
    visit, detector = (int(v) for v in marker.read_text().split())
    with open_exposure(root / VISIT_DIR.format(visit=visit, detector=detector) / "calexp.fits") as exposure:
        assert exposure.width == size
    return root, visit, detector


def alert_objects(root: Path, visit: int, detector: int, count: int, seed: int = 0) -> list[dict]:
    """``count`` DiaObjects at random positions on the detector, as JSON records."""
    from forcedphot.photometry.exposure import open_exposure

    rng = np.random.default_rng(seed)
    with open_exposure(root / VISIT_DIR.format(visit=visit, detector=detector) / "calexp.fits") as exposure:
        x, y = rng.uniform(0, exposure.width - 1, count), rng.uniform(0, exposure.height - 1, count)
        ra, dec = exposure.wcs.all_pix2world(x, y, 0)
    return [{"diaObjectId": int(i) + 1, "ra": float(r), "dec": float(d)} for i, r, d in zip(range(count), ra, dec)]


def engine_seconds(root: Path, visit: int, detector: int, records: list[dict], measurements: str = "all", repeats: int = 30) -> float:
    """Median in-process engine time for one request (files open, as the cache holds them)."""
    import pandas as pd

    from forcedphot.photometry.config import MeasurementConfig
    from forcedphot.photometry.exposure import open_exposure
    from forcedphot.photometry.measure import measure
    from forcedphot.photometry.objects import validate_objects
    from forcedphot.photometry.psf_models import PSF_FWHM_KEYWORD, load_psf

    folder = root / VISIT_DIR.format(visit=visit, detector=detector)
    objects = validate_objects(pd.DataFrame(records))
    times = []
    with open_exposure(folder / "calexp.fits") as science, open_exposure(folder / "difference.fits") as difference:
        psf = load_psf(fwhm_pixels=float(science.header[PSF_FWHM_KEYWORD]))
        config = MeasurementConfig(backend="numpy", measurements=measurements)
        for _ in range(repeats + 3):
            start = time.perf_counter()
            measure(science, objects, psf, config, difference=difference)
            times.append(time.perf_counter() - start)
    return statistics.median(times[3:])


def alert_body(visit: int, detector: int, records: list[dict], measurements: str = "all") -> dict:
    """One alert-like request: the detector's difference image measured, objects inline;
    ``measurements`` "all" (every measurement, the default) or "psf" (the PSF fluxes alone,
    as Rubin's DiaForcedSourceTask)."""
    return {
        "exposure": {"visit": visit, "detector": detector, "datasetType": "calexp"},
        "difference": {"visit": visit, "detector": detector, "datasetType": "difference"},
        "objects": records,
        "measurements": measurements,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MODES = {  # name -> (uvicorn workers or None for one per core, environment)
    "processes": (1, {}),
    "threads+batch": (None, {"FORCEDPHOT_MEASURE_PROCESSES": "0", "FORCEDPHOT_BATCHING": "true"}),
    "threads": (None, {"FORCEDPHOT_MEASURE_PROCESSES": "0", "FORCEDPHOT_BATCHING": "false"}),
}
DEVICE_MODES = {  # one worker owning the device, requests in its threads (bench/gpu.py)
    "device+batch": (1, {"FORCEDPHOT_MEASURE_PROCESSES": "0", "FORCEDPHOT_BATCHING": "true"}),
    "device": (1, {"FORCEDPHOT_MEASURE_PROCESSES": "0", "FORCEDPHOT_BATCHING": "false"}),
}
LOAD_HEADER = (f"{'mode':>13} {'measure':>7} {'conc':>5} {'requests':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
               f"{'server CPU ms/req':>17} {'of which main proc':>18} {'client CPU ms/req':>17}")


class Server:
    """A ``forcedphot serve`` process on the loopback interface."""

    def __init__(self, root: Path, mode: str, key: str, **settings: str):
        """``settings``: extra ``FORCEDPHOT_*`` variables, e.g. ``REQUEST_TIME_LIMIT_SECONDS="2"``."""
        workers, mode_env = {**MODES, **DEVICE_MODES}[mode]
        self.port = free_port()
        self.data = tempfile.TemporaryDirectory(prefix="forcedphot-bench-")
        env = {**os.environ, "FORCEDPHOT_API_KEYS": key, "FORCEDPHOT_BACKEND": "numpy", "FORCEDPHOT_DATA_DIR": self.data.name,
               "FORCEDPHOT_MAX_CONCURRENT_REQUESTS": "64", "FORCEDPHOT_MEASURE_THREADS": "32", **mode_env,
               **{f"FORCEDPHOT_{name}": value for name, value in settings.items()}}
        cli = Path(sys.executable).with_name("forcedphot")
        self.process = subprocess.Popen([str(cli), "serve", "--port", str(self.port), "--repository", str(root),
                                         "--workers", str(workers or os.cpu_count())],
                                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"

    def processes(self) -> list[int]:
        """The server's process id and those of all its descendants (Linux /proc)."""
        found, todo = [], [self.process.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            for task in Path(f"/proc/{pid}/task").glob("*"):
                try:
                    todo += [int(c) for c in (task / "children").read_text().split()]
                except OSError:  # gone meanwhile
                    continue
        return found

    def cpu_seconds(self, alone: bool = False) -> float:
        """CPU time used so far by the server and all its processes (Linux /proc); with
        ``alone``, by the server process only (HTTP, validation, hand-off to the measurement
        processes)."""
        total = 0.0
        for pid in [self.process.pid] if alone else self.processes():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def wait_ready(self, timeout: float = 60.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/readyz", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.process.poll() is not None:
                raise RuntimeError("the server exited during start-up")
            time.sleep(0.2)
        raise RuntimeError("the server did not become ready")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.data.cleanup()


async def drive(url: str, key: str, body: dict, concurrency: int, total: int) -> tuple[float, list[float]]:
    """``total`` requests, ``concurrency`` at a time; returns (wall seconds, latencies)."""
    import httpx

    latencies: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120.0, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                start = time.perf_counter()
                response = await client.post("/v1/forced-photometry", json=body)
                latencies.append(time.perf_counter() - start)
                if response.status_code != 200:
                    raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--objects", type=int, default=200)
    parser.add_argument("--requests", type=int, default=400, help="requests per concurrency level")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--modes", default=",".join(MODES), help="modes to run, comma-separated")
    parser.add_argument("--measurements", default="all,psf",
                        help="what a request measures, comma-separated: all (every measurement), psf (the PSF fluxes alone)")
    args = parser.parse_args()
    from forcedphot.serving.allocator import keep_temporaries_on_heap

    keep_temporaries_on_heap()  # as the CLI and the service do (peers measured in this process benefit too)

    root, visit, detector = repository(args.size)
    records = alert_objects(root, visit, detector, args.objects)
    bodies = [alert_body(visit, detector, records, measurements) for measurements in args.measurements.split(",")]
    print(f"{args.size}x{args.size} detector, {args.objects} DiaObjects a request (difference + science), "
          f"python {sys.version.split()[0]}, {os.cpu_count()} cores, NumPy backend")
    for body in bodies:
        engine = engine_seconds(root, visit, detector, records, body["measurements"])
        print(f"engine alone, in-process, files open, measurements={body['measurements']}: {engine * 1e3:.1f} ms a request "
              f"({1 / engine:.0f} requests/s)")
    print(LOAD_HEADER)
    print("-" * len(LOAD_HEADER))
    for mode in args.modes.split(","):
        for body in bodies:
            for line in load(root, body, mode, [int(c) for c in args.concurrency.split(",")], args.requests):
                print(line)


def load(root: Path, body: dict, mode: str, concurrencies: list[int], requests: int, **settings: str):
    """Serve ``root`` in ``mode`` (``settings``: extra FORCEDPHOT_* variables) and drive it at
    each concurrency; yields one line of :data:`LOAD_HEADER` per concurrency."""
    key = secrets.token_hex(16)
    server = Server(root, mode, key, **settings)
    try:
        server.wait_ready()
        asyncio.run(drive(server.url, key, body, 2, 20))  # warm the exposure caches and the code paths
        for concurrency in concurrencies:
            server_cpu, main_cpu, client_cpu = server.cpu_seconds(), server.cpu_seconds(alone=True), time.process_time()
            wall, latencies = asyncio.run(drive(server.url, key, body, concurrency, requests))
            server_cpu, main_cpu = server.cpu_seconds() - server_cpu, server.cpu_seconds(alone=True) - main_cpu
            client_cpu = time.process_time() - client_cpu
            ms = np.array(latencies) * 1e3
            yield (f"{mode:>13} {body['measurements']:>7} {concurrency:>5} {len(ms):>8} {len(ms) / wall:>8.1f} {np.percentile(ms, 50):>8.1f} "
                   f"{np.percentile(ms, 99):>8.1f} {server_cpu / len(ms) * 1e3:>17.1f} {main_cpu / len(ms) * 1e3:>18.1f} "
                   f"{client_cpu / len(ms) * 1e3:>17.1f}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
