"""Campaign benchmark: object x exposure pairs per second, local processes against Dask.

    python bench/campaign.py [--epochs 48] [--size 1024] [--objects 2000] [--workers 1,2]

A demo survey (``--epochs`` dithered visits of ``--size``^2 pixels, ``--objects`` DiaObjects;
made once in bench/.cache) is measured as a campaign (one task per exposure, a parquet
partition each) by ``forcedphot.serving.campaign.run_campaign``:

- ``local``: a pool of N processes on this machine;
- ``dask``: a ``distributed.LocalCluster`` of N single-threaded worker processes, started
  beforehand (its start-up is printed apart, as a long-lived cluster pays it once).

For each it prints seconds, pairs per second, seconds per exposure task and the ratio to
one local process; then a scaling model for N workers of a real cluster, fitted to these
figures: ``time(N) = overhead + tasks x task_seconds / N`` (each task reads and measures
one exposure; the scheduler's per-task overhead on Dask is the difference from local).
"""

import argparse
from pathlib import Path
import sys
import tempfile
import time

sys.path.insert(0, str(Path(__file__).resolve().parent))
from service import CACHE  # noqa: E402


def survey(epochs: int, size: int, objects: int) -> Path:
    from forcedphot.demo.survey import make_demo_survey

    root = CACHE / f"campaign-{epochs}-{size}-{objects}"
    if not (root / "truth.parquet").exists():
        make_demo_survey(root, visits=epochs, size=size, n_objects=objects, days=max(60.0, float(epochs)), seed=17)
    return root


def plan(root: Path):
    from forcedphot.photometry.config import MeasurementConfig
    from forcedphot.photometry.objects import read_objects
    from forcedphot.serving.index import ExposureIndex
    from forcedphot.serving.lightcurves import plan_lightcurves
    from forcedphot.serving.repository import DEFAULT_PATH_TEMPLATE

    index = ExposureIndex(root / "index.sqlite")
    index.refresh([root], DEFAULT_PATH_TEMPLATE)
    return plan_lightcurves(index, read_objects(root / "diaObjects.parquet"), MeasurementConfig(backend="numpy"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=48)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--objects", type=int, default=2000)
    parser.add_argument("--workers", default="1,2")
    args = parser.parse_args()

    from distributed import Client, LocalCluster

    from forcedphot.serving.campaign import run_campaign

    task = plan(survey(args.epochs, args.size, args.objects))
    pairs = sum(len(e.rows) for e in task.epochs)
    import os

    print(f"{len(task.epochs)} exposures of {args.size}^2 px, {len(task.objects)} DiaObjects, {pairs} object x exposure pairs; "
          f"{os.cpu_count()} cores, NumPy backend")
    print(f"{'where':>6} {'N':>3} {'seconds':>8} {'pairs/s':>9} {'s/task':>8} {'vs local 1':>10}")
    base, results = None, {}
    for n in (int(w) for w in args.workers.split(",")):
        for where in ("local", "dask"):
            with tempfile.TemporaryDirectory() as folder:
                if where == "dask":
                    start = time.perf_counter()
                    cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None)
                    Client(cluster).close()
                    startup = time.perf_counter() - start
                    report = run_campaign(task, Path(folder) / "out", where="dask", scheduler=cluster.scheduler_address)
                    cluster.close()
                else:
                    startup = 0.0
                    report = run_campaign(task, Path(folder) / "out", where="local", workers=n)
            assert not report.errors, report.errors
            base = base or report.seconds
            results[(where, n)] = report.seconds
            print(f"{where:>6} {n:>3} {report.seconds:>8.2f} {pairs / report.seconds:>9.0f} {report.seconds * n / len(task.epochs):>8.3f} "
                  f"{base / report.seconds:>10.2f}" + (f"   (cluster start-up {startup:.1f} s, not counted)" if startup else ""))
    ns = sorted({n for _, n in results})
    if len(ns) >= 2:
        lo, hi = ns[0], ns[-1]
        for where in ("local", "dask"):
            t_lo, t_hi = results[(where, lo)], results[(where, hi)]
            per_task = (t_lo - t_hi) / (1 / lo - 1 / hi) / len(task.epochs)
            overhead = t_lo - len(task.epochs) * per_task / lo
            print(f"model {where}: time(N) = {overhead:.2f} s + {len(task.epochs)} tasks x {per_task:.3f} s / N")


if __name__ == "__main__":
    main()
