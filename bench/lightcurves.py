"""Light-curve benchmark: index queries at 100k exposures, and light curves over 100 epochs.

    python bench/lightcurves.py [--epochs 100] [--size 512] [--repeats 5]

1. A synthetic index of 100,000 exposures (LSST-sized footprints over the whole sky):
   time of ``covering(ra, dec)`` at random positions (median, p99).
2. A demo survey of ``--epochs`` visits (cached in bench/.cache), served by a real
   ``forcedphot serve`` on 127.0.0.1 (two measurement processes, NumPy): the time of
   ``POST /v1/lightcurves`` for 1 object over one epoch, and for 1 object and 100 objects
   over every epoch, first request (files not yet open) and then the median of
   ``--repeats`` (files open), with the server's own breakdown (Server-Timing, summed over
   epochs and processes), and the ratio of 100 epochs to one.
3. The same light curves measured in this process on one thread (MeasureService), for
   the cost per epoch without HTTP or processes.
"""

import argparse
from pathlib import Path
import secrets
import statistics
import sys
import tempfile
import time

import httpx
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from service import CACHE, Server  # noqa: E402  (the service benchmark's server helper)


def survey(epochs: int, size: int) -> Path:
    from forcedphot.demo.survey import make_demo_survey

    root = CACHE / f"survey-{epochs}-{size}"
    if not (root / "truth.parquet").exists():
        make_demo_survey(root, visits=epochs, size=size, n_objects=200, days=max(60.0, epochs * 1.0), seed=11)
    return root


def index_queries(n: int = 100_000, queries: int = 200) -> tuple[float, float, float]:
    """(build seconds, median query seconds, p99) for a synthetic all-sky index of n exposures."""
    from forcedphot.serving.index import ExposureIndex

    rng = np.random.default_rng(9)
    ra, dec = rng.uniform(0, 360, n), np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    half = 0.1  # deg: an LSST detector is ~0.2 deg across
    records = []
    for i in range(n):
        c = max(np.cos(np.radians(dec[i])), 1e-6)
        corners = [((ra[i] + dx * half / c) % 360.0, float(np.clip(dec[i] + dy * half, -89.999, 89.999)))
                   for dx, dy in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
        records.append({"visit": i, "detector": 0, "band": "r", "midpoint_mjd_tai": 61000.0 + i * 1e-3, "exposure_time": 30.0,
                        "footprint": corners, "psf_fwhm_px": 3.5, "calibration": 1.0, "science_path": f"/synthetic/{i}",
                        "difference_path": None})
    with tempfile.TemporaryDirectory() as scratch:
        index = ExposureIndex(Path(scratch) / "index.sqlite")
        start = time.perf_counter()
        index.add(records)
        build = time.perf_counter() - start
        seconds = []
        for i in rng.integers(0, n, queries):
            start = time.perf_counter()
            index.covering(ra[i], dec[i])
            seconds.append(time.perf_counter() - start)
    return build, statistics.median(seconds), float(np.percentile(seconds, 99))


def in_process(root: Path, objects: pd.DataFrame, repeats: int) -> tuple[float, dict[str, float], int]:
    """Median seconds, stage timings and epochs of a light curve measured here on one thread (files open)."""
    from forcedphot.photometry.backend import select_backend
    from forcedphot.photometry.config import MeasurementConfig
    from forcedphot.photometry.objects import validate_objects
    from forcedphot.serving.allocator import keep_temporaries_on_heap
    from forcedphot.serving.executor import MeasureService
    from forcedphot.serving.exposure_cache import ExposureCache
    from forcedphot.serving.index import ExposureIndex
    from forcedphot.serving.lightcurves import plan_lightcurves

    keep_temporaries_on_heap()
    with tempfile.TemporaryDirectory() as scratch:
        index = ExposureIndex(Path(scratch) / "index.sqlite")
        index.refresh([root], "{visit}/{detector}/{datasetType}.fits")
        service = MeasureService(ExposureCache(0), select_backend("numpy"), threads=1)
        config = MeasurementConfig(backend="numpy")
        task = plan_lightcurves(index, validate_objects(objects), config)
        service.run_lightcurves(task)  # open the files
        times, result = [], None
        for _ in range(repeats):
            start = time.perf_counter()
            result = service.run_lightcurves(plan_lightcurves(index, validate_objects(objects), config))
            times.append(time.perf_counter() - start)
        service.close()
    return statistics.median(times), result.timings, len(task.epochs)


def served(root: Path, objects: pd.DataFrame, repeats: int, url: str, headers: dict, **query: float) -> tuple[float, float, str, str]:
    body = {"objects": objects.to_dict(orient="records"), **query}
    start = time.perf_counter()
    first = httpx.post(f"{url}/v1/lightcurves", json=body, headers=headers, timeout=120)
    cold = time.perf_counter() - start
    first.raise_for_status()
    times, response = [], first
    for _ in range(repeats):
        start = time.perf_counter()
        response = httpx.post(f"{url}/v1/lightcurves", json=body, headers=headers, timeout=120)
        times.append(time.perf_counter() - start)
        response.raise_for_status()
    return cold, statistics.median(times), response.headers["x-epochs"], response.headers["server-timing"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    build, median, p99 = index_queries()
    print(f"index of 100,000 synthetic exposures: built in {build:.1f} s; covering(ra, dec) median {median * 1e3:.2f} ms, "
          f"p99 {p99 * 1e3:.2f} ms (200 random positions)")

    root = survey(args.epochs, args.size)
    all_objects = pd.read_parquet(root / "diaObjects.parquet")
    truth = pd.read_parquet(root / "truth.parquet")
    always = truth.groupby("diaObjectId")["on_detector"].sum()
    central = all_objects.set_index("diaObjectId").loc[always.sort_values(ascending=False).index].reset_index()
    cases = {"1 object": central.head(1), "100 objects": central.head(100)}
    first = truth[truth["diaObjectId"] == central["diaObjectId"].iloc[0]].sort_values("midpointMjdTai")
    one_epoch = float(first.loc[first["on_detector"], "midpointMjdTai"].iloc[0])  # the object's first covered epoch alone
    print(f"survey: {args.epochs} visits of {args.size} x {args.size} px (science + difference), NumPy, 2 cores")

    key = secrets.token_hex(16)
    server = Server(root, "processes", key, MAX_LIGHTCURVE_PAIRS="100000", REQUEST_TIME_LIMIT_SECONDS="120")
    try:
        server.wait_ready()
        headers = {"Authorization": f"Bearer {key}"}
        deadline = time.monotonic() + 60
        while httpx.get(f"{server.url}/v1/exposures", params={"ra": 0, "dec": 0}, headers=headers).status_code != 200:
            assert time.monotonic() < deadline, "the index was not built"
            time.sleep(0.2)
        print(f"{'case':12s} {'epochs':>6s} {'pairs':>6s} {'first s':>8s} {'warm s':>7s} {'ms/epoch':>8s}  server breakdown (warm, ms)")
        warms = []
        for name, objects, query in [("1 object", cases["1 object"], {"mjd_min": one_epoch - 1e-6, "mjd_max": one_epoch + 1e-6}),
                                     *((name, objects, {}) for name, objects in cases.items())]:
            cold, warm, epochs, timing = served(root, objects, args.repeats, server.url, headers, **query)
            pairs = int(truth[truth["diaObjectId"].isin(objects["diaObjectId"])]["on_detector"].sum()) if not query else 1
            warms.append((epochs, warm))
            print(f"{name:12s} {epochs:>6s} {pairs:>6d} {cold:8.3f} {warm:7.3f} {warm / int(epochs) * 1e3:8.2f}  {timing}")
        (one, one_warm), (many, many_warm) = warms[:2]
        print(f"ratio, 1 object, warm: {many} epochs / {one} epoch = {many_warm / one_warm:.2f}x")
    finally:
        server.stop()

    print("in this process, one thread, files open (median of repeats):")
    for name, objects in cases.items():
        seconds, timings, epochs = in_process(root, objects, args.repeats)
        stages = ", ".join(f"{stage} {value / epochs * 1e3:.2f}" for stage, value in timings.items())
        print(f"{name:12s} {epochs} epochs: {seconds:.3f} s = {seconds / epochs * 1e3:.2f} ms/epoch ({stages} ms/epoch)")


if __name__ == "__main__":
    main()
