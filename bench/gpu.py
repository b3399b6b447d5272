"""The engine on a device: parity with NumPy, throughput and what crosses the host/device boundary.

    pip install -e '.[gpu,test]' && python bench/gpu.py [--size 4096] [--counts 1000,10000,100000,1000000]

On a machine where CuPy finds a CUDA device the device is the GPU; elsewhere the same code
runs on the stand-in device (``array_api_strict`` on ``Device("device1")``), which the
output says, and whose timings mean nothing for a GPU. For the demo visit (made once, in
bench/.cache) it prints:

- parity: every catalog column of a difference-mode measurement on the device against
  NumPy (flags and integers identical, numbers to 1e-6 relative);
- per kernel call: host->device transfers and bytes, bytes per object, device->host
  transfers, scalar reads of device arrays (counted on the stand-in only);
- throughput at each object count, NumPy and the device side by side, with the engine's
  stage timings (select, stage, kernels, catalog) and the ratio; on the device "stage"
  includes copying the exposure's planes to it once;
- the alert-like service load (bench/service.py's requests: one detector, --objects
  DiaObjects, difference mode) served on the device by one worker, with dynamic batching
  on and off.
"""

import argparse
from pathlib import Path
import sys
import time

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import demo_dir, objects_file  # noqa: E402  (bench/engine.py: the cached demo visit)

from service import DEVICE_MODES, LOAD_HEADER, alert_body, alert_objects, load, repository  # noqa: E402


def device_backend():
    from forcedphot.photometry.backend import select_backend

    backend = select_backend("auto")
    return backend if backend.name == "cupy" else select_backend("stand-in")


def measure_on(backend, directory: Path, objects_path: Path, difference: bool = True):
    """(catalog, timings, per-call transfer counts, the whole measurement's counts) of one
    measurement, files opened afresh; on a device both exposures' planes are copied there
    first (inside the timing), as the service's exposure cache does."""
    from forcedphot.photometry.config import MeasurementConfig
    from forcedphot.photometry.exposure import open_exposure
    from forcedphot.photometry.measure import measure
    from forcedphot.photometry.objects import read_objects
    from forcedphot.photometry.psf_choice import choose_psf
    from forcedphot.photometry.runner import run_directly

    calls = []

    def execute(runner, inputs, scope):
        before = backend.counts.snapshot()
        results = run_directly(runner, inputs, scope)
        calls.append((scope, len(inputs), backend.counts.since(before)))
        return results

    objects = read_objects(objects_path)
    with open_exposure(directory / "calexp.fits") as science, open_exposure(directory / "difference.fits") as diff:
        psf = choose_psf(science, "calexp")
        before = backend.counts.snapshot()
        start = time.perf_counter()
        if backend.name != "numpy":  # as the service's exposure cache does: planes on the device, once per exposure
            for exposure in (science, diff) if difference else (science,):
                exposure.resident_planes(backend)
        result = measure(science, objects, psf, MeasurementConfig(), difference=diff if difference else None, backend=backend,
                         execute=execute)
        elapsed = time.perf_counter() - start
    return result.catalog, {"total": elapsed, **result.timings}, calls, backend.counts.since(before)


def parity(host, device) -> str:
    worst, mismatched = 0.0, []
    for column in host.columns:
        if column == "timeProcessedMjdTai":
            continue
        a, b = host[column], device[column]
        if a.dtype == bool or a.dtype.kind in "iuO":
            if not a.equals(b):
                mismatched.append(column)
            continue
        a, b = a.to_numpy(np.float64), b.to_numpy(np.float64)
        same_nan = np.array_equal(np.isnan(a), np.isnan(b))
        finite = np.isfinite(a) & np.isfinite(b)
        rel = np.abs(a[finite] - b[finite]) / np.maximum(np.abs(a[finite]), 1e-300)
        worst = max(worst, float(rel.max()) if rel.size else 0.0)
        if not same_nan or (rel.size and rel.max() > 1e-6):
            mismatched.append(column)
    verdict = "PASS" if not mismatched else f"FAIL ({', '.join(mismatched)})"
    return f"{verdict}: {len(host.columns) - 1} columns, {len(host)} rows, largest relative difference {worst:.2e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--counts", default=None, help="object counts (default 1000,10000,100000,1000000 on a GPU; 1000,10000 on the stand-in)")
    parser.add_argument("--objects", type=int, default=200, help="DiaObjects per request of the service load")
    parser.add_argument("--requests", type=int, default=None, help="requests per concurrency (default 400 on a GPU, 40 on the stand-in)")
    parser.add_argument("--concurrency", default="1,8,32")
    args = parser.parse_args()

    from forcedphot.photometry.backend import select_backend

    device = device_backend()
    host = select_backend("numpy")
    on_gpu = device.name == "cupy"
    counts = [int(c) for c in (args.counts or ("1000,10000,100000,1000000" if on_gpu else "1000,10000")).split(",")]
    print(f"device: {device.name} ({device.device})" + ("" if on_gpu else " -- no GPU here: timings are the stand-in's, not a GPU's"))
    directory = demo_dir(args.size)

    catalog_host, *_ = measure_on(host, directory, directory / "diaObjects.parquet")
    catalog_device, _, calls, whole = measure_on(device, directory, directory / "diaObjects.parquet")
    print(f"parity (difference mode, demo objects): {parity(catalog_host, catalog_device)}")

    print("\nper kernel call (difference mode: full measurement on the difference image, PSF fit on the science image)")
    print(f"{'call':>6} {'objects':>8} {'uploads':>8} {'up bytes':>10} {'B/object':>9} {'downloads':>9} {'down bytes':>10} {'scalar reads':>12}")
    for full, n, c in calls[:6]:
        print(f"{'full' if full else 'psf':>6} {n:>8} {c.uploads:>8} {c.upload_bytes:>10} {c.upload_bytes / max(n, 1):>9.0f} "
              f"{c.downloads:>9} {c.download_bytes:>10} {c.scalar_reads:>12}")
    total_n = sum(n for full, n, _ in calls if full)
    total_up = sum(c.upload_bytes for _, _, c in calls)
    print(f"all {len(calls)} calls: {total_up / max(total_n, 1):.0f} bytes host->device per object, "
          f"{max(c.downloads for *_, c in calls)} download per call, {sum(c.scalar_reads for *_, c in calls)} scalar reads")
    planes = whole.upload_bytes - total_up
    print(f"outside the calls: {whole.uploads - sum(c.uploads for *_, c in calls)} uploads, {planes / 2**20:.1f} MiB "
          f"(the exposures' planes, once each; {planes / max(total_n, 1):.0f} bytes per object of this measurement), "
          f"{whole.scalar_reads - sum(c.scalar_reads for *_, c in calls)} scalar reads")

    print(f"\nthroughput, direct image only ({args.size}^2 demo visit)")
    print(f"{'objects':>8} {'backend':>9} {'total s':>8} {'obj/s':>10} {'select':>7} {'stage':>7} {'kernels':>8} {'catalog':>8}")
    for count in counts:
        rates = {}
        for backend in (host, device):
            _, timings, *_ = measure_on(backend, directory, objects_file(directory, count), difference=False)
            rates[backend.name] = count / timings["total"]
            print(f"{count:>8} {backend.name:>9} {timings['total']:>8.3f} {rates[backend.name]:>10.0f} {timings['select']:>7.3f} "
                  f"{timings['stage']:>7.3f} {timings['kernels']:>8.3f} {timings['catalog']:>8.3f}")
        print(f"{'':>8} {'ratio':>9} device/numpy = {rates[device.name] / rates['numpy']:.2f}")
    root, visit, detector = repository(args.size)
    records = alert_objects(root, visit, detector, args.objects)
    print(f"\nservice load on {device.name}: one worker, {args.objects} DiaObjects a request (difference + science), batching on and off,"
          " every measurement and the PSF fluxes alone")
    print(LOAD_HEADER)
    print("-" * len(LOAD_HEADER))
    for mode in DEVICE_MODES:
        for measurements in ("all", "psf"):
            for line in load(root, alert_body(visit, detector, records, measurements), mode, [int(c) for c in args.concurrency.split(",")],
                             args.requests or (400 if on_gpu else 40), BACKEND=device.name):
                print(line)


if __name__ == "__main__":
    main()
