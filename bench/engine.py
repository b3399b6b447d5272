"""Benchmark the measurement engine against photutils and sep on one demo exposure.

    python bench/engine.py [--size 4096] [--counts 1000,10000,100000] [--photutils-psf-max 1000]

Makes (once, cached in bench/.cache) a ``forcedphot demo`` visit, then for each object
count runs every method in its own child process and prints objects/s and peak memory
(the child's peak resident set, VmHWM, including the Python + libraries baseline),
with ratios against the peers. Methods:

- ``engine``: file to parquet end to end (open exposure, read the object table, select,
  stage, kernels, catalog, write parquet), as ``forcedphot measure`` does;
- ``library``: ``forcedphot.measure`` called from Python as a notebook would, in a process
  with no allocator tuning (every other method runs with it), every measurement; and
  ``library-array-api``: the same with ``cpu_kernels="array-api"`` (the kernels a GPU
  runs, the CPU path before the fused kernel); ``library-psf``: the PSF flux alone
  (``measurements="psf"``, as Rubin's DiaForcedSourceTask), against ``photutils-psf``;
- ``kernels``: all the engine's kernels alone on pre-staged cutout stacks;
- ``kernels-psf`` / ``kernels-ap``: the PSF-flux kernel alone (PSF-sized stamps) and the
  aperture kernel alone (stamps just holding the 12 px aperture), for like-for-like
  comparison with the peers;
- ``photutils-ap``: ``aperture_photometry(method='exact')`` for the same 5 radii;
- ``photutils-psf``: ``PSFPhotometry`` with fixed positions and the same Gaussian PSF;
  slow, so it runs on at most ``--photutils-psf-max`` objects and reports that rate;
- ``sep-ap``: ``sep.sum_circle(subpix=0)`` for the same 5 radii.
Peers read the whole image into memory first (not timed), as their APIs need.
"""

import argparse
import json
import os
from pathlib import Path
import subprocess
import sys
import time

import numpy as np

CACHE = Path(__file__).resolve().parent / ".cache"
RADII = (3.0, 4.5, 6.0, 9.0, 12.0)


def demo_dir(size: int) -> Path:
    """A demo visit of the given size, made once."""
    from forcedphot.demo import make_demo_visit

    out = CACHE / f"demo{size}"
    if not (out / "calexp.fits").exists():
        make_demo_visit(out, size=size, n_objects=500, seed=1)
    return out


def objects_file(directory: Path, count: int) -> Path:
    """A DiaObject table of ``count`` random positions on the detector (made once)."""
    import pandas as pd

    from forcedphot.photometry.exposure import open_exposure

    path = directory / f"objects_{count}.parquet"
    if not path.exists():
        rng = np.random.default_rng(count)
        with open_exposure(directory / "calexp.fits") as exposure:
            x = rng.uniform(0, exposure.width - 1, count)
            y = rng.uniform(0, exposure.height - 1, count)
            ra, dec = exposure.wcs.all_pix2world(x, y, 0)
        pd.DataFrame({"diaObjectId": np.arange(count, dtype=np.int64) + 1, "ra": ra, "dec": dec}).to_parquet(path)
    return path


def _load_for_peers(directory: Path, count: int, limit: int | None):
    """Image, variance and pixel positions, read fully into memory (not timed)."""
    import pandas as pd

    from forcedphot.photometry.exposure import open_exposure
    from forcedphot.photometry.psf_models import PSF_FWHM_KEYWORD

    objects = pd.read_parquet(objects_file(directory, count))
    if limit is not None:
        objects = objects.iloc[:limit]
    with open_exposure(directory / "calexp.fits") as exposure:
        image, variance, _ = exposure.read_rows(0, exposure.height)
        image, variance = np.array(image, dtype=np.float64), np.array(variance, dtype=np.float64)
        x, y = exposure.wcs.all_world2pix(objects["ra"], objects["dec"], 0)
        fwhm = float(exposure.header[PSF_FWHM_KEYWORD])
    return image, variance, x, y, fwhm


def run_engine(directory: Path, count: int) -> tuple[int, float]:
    """``forcedphot measure`` in-process (the engine's imports done before the clock starts, as
    the command imports them lazily; numba's first load, ~0.45 s, is inside the timing, as a
    command pays it)."""
    from forcedphot.cli import main
    import forcedphot.photometry.measure  # noqa: F401
    import forcedphot.photometry.psf_choice  # noqa: F401
    import forcedphot.serving.apdb  # noqa: F401

    start = time.perf_counter()
    out = directory / f"forced_{count}.parquet"
    args = ["measure", str(directory / "calexp.fits"), str(objects_file(directory, count)), "-o", str(out), "--backend", "numpy"]
    with open(os.devnull, "w") as sink:
        stdout, sys.stdout = sys.stdout, sink
        try:
            assert main(args) == 0
        finally:
            sys.stdout = stdout
    return count, time.perf_counter() - start


def run_library(directory: Path, count: int, kernels: str, measurements: str = "all") -> tuple[int, float]:
    """The Python API, in-process (imports and the table read before the clock starts)."""
    import pandas as pd

    import forcedphot

    objects = pd.read_parquet(objects_file(directory, count))
    config = forcedphot.MeasurementConfig(backend="numpy", cpu_kernels=kernels, measurements=measurements)
    if kernels == "fused":  # numba compiles on first use (cached on disk): once, outside the timing
        with forcedphot.open_exposure(directory / "calexp.fits") as exposure:
            forcedphot.measure(exposure, objects.iloc[:10], forcedphot.choose_psf(exposure), config)
    start = time.perf_counter()
    with forcedphot.open_exposure(directory / "calexp.fits") as exposure:
        result = forcedphot.measure(exposure, objects, forcedphot.choose_psf(exposure), config)
    return result.n_on_detector, time.perf_counter() - start


def run_kernels(directory: Path, count: int, which: str = "all") -> tuple[int, float]:
    """Stage first (untimed), then time kernels alone; returns (count, seconds).

    ``which``: "all" (every measurement), "psf" (PSF flux on PSF-sized stamps) or "ap"
    (the five apertures on stamps just large enough for them).
    """
    import pandas as pd

    from forcedphot.kernels.aperture import aperture_fluxes
    from forcedphot.photometry.backend import select_backend
    from forcedphot.photometry.config import MeasurementConfig
    from forcedphot.photometry.cutouts import plan_windows, stage_cutouts
    from forcedphot.photometry.exposure import open_exposure
    from forcedphot.photometry.psf_models import PSF_FWHM_KEYWORD, load_psf
    from forcedphot.photometry.runner import KernelRunner, Scope, cutout_half_size

    objects = pd.read_parquet(objects_file(directory, count))
    config = MeasurementConfig(backend="numpy")
    with open_exposure(directory / "calexp.fits") as exposure:
        psf = load_psf(fwhm_pixels=float(exposure.header[PSF_FWHM_KEYWORD]))
        x, y = exposure.wcs.all_world2pix(objects["ra"], objects["dec"], 0)
        sigma = psf.sigma(x, y)
        size = {"all": 2 * cutout_half_size(psf, sigma, config) + 1, "psf": psf.stamp_size, "ap": 2 * int(np.ceil(max(RADII) + 1)) + 1}[which]
        windows = plan_windows(x, y, size, batch_bytes=config.batch_bytes, band_width=exposure.width)
        stacks = [(w, stage_cutouts(exposure, w, exposure.mask_planes["NO_DATA"])) for w in windows]
        kernels = KernelRunner(select_backend("numpy"), exposure, psf, config)
        start = time.perf_counter()  # PSF stamps are evaluated inside the timing, as photutils does
        for w, s in stacks:
            if which == "ap":
                valid = s.inside & np.isfinite(s.image) & np.isfinite(s.variance)
                aperture_fluxes(s.image, s.variance, valid, w.cx, w.cy, RADII)
            else:
                kernels.run([kernels.inputs(w, s, x[w.index], y[w.index], sigma[w.index])], Scope.ALL if which == "all" else Scope.PSF)
        return count, time.perf_counter() - start


def run_photutils_ap(directory: Path, count: int) -> tuple[int, float]:
    from photutils.aperture import CircularAperture, aperture_photometry

    image, variance, x, y, _ = _load_for_peers(directory, count, None)
    start = time.perf_counter()
    apertures = [CircularAperture(np.column_stack([x, y]), r=r) for r in RADII]
    aperture_photometry(image, apertures, error=np.sqrt(variance), method="exact")
    return count, time.perf_counter() - start


def run_photutils_psf(directory: Path, count: int, limit: int) -> tuple[int, float]:
    from astropy.table import QTable
    from photutils.psf import CircularGaussianPRF, PSFPhotometry

    from forcedphot.photometry.psf_models import load_psf

    image, variance, x, y, fwhm = _load_for_peers(directory, count, limit)
    model = CircularGaussianPRF(fwhm=fwhm)
    model.x_0.fixed = True
    model.y_0.fixed = True
    size = load_psf(fwhm_pixels=fwhm).stamp_size
    phot = PSFPhotometry(model, fit_shape=(size, size), aperture_radius=3)
    start = time.perf_counter()
    phot(image, error=np.sqrt(variance), init_params=QTable({"x": x, "y": y, "flux": np.full(len(x), 1000.0)}))
    return len(x), time.perf_counter() - start


def run_sep_ap(directory: Path, count: int) -> tuple[int, float]:
    import sep

    image, variance, x, y, _ = _load_for_peers(directory, count, None)
    start = time.perf_counter()
    for r in RADII:
        sep.sum_circle(image, x, y, r, var=variance, subpix=0)
    return count, time.perf_counter() - start


def child(method: str, directory: Path, count: int, limit: int) -> None:
    """Run one method; print JSON with objects, seconds and peak RSS."""
    if method == "engine":
        n, seconds = run_engine(directory, count)
    elif method.startswith("library"):
        n, seconds = run_library(directory, count, "array-api" if method.endswith("array-api") else "fused",
                                 "psf" if method.endswith("-psf") else "all")
    elif method == "photutils-psf":
        n, seconds = run_photutils_psf(directory, count, limit)
    elif method.startswith("kernels"):
        n, seconds = run_kernels(directory, count, method.partition("-")[2] or "all")
    else:
        n, seconds = {"photutils-ap": run_photutils_ap, "sep-ap": run_sep_ap}[method](directory, count)
    print(json.dumps({"objects": n, "seconds": seconds, "peak_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss it is reset by exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


METHODS = ("engine", "library", "library-array-api", "library-psf", "kernels", "kernels-psf", "photutils-psf", "kernels-ap", "sep-ap", "photutils-ap")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--counts", default="1000,10000,100000")
    parser.add_argument("--photutils-psf-max", type=int, default=1000)
    parser.add_argument("--methods", default=",".join(METHODS), help="methods to run, comma-separated")
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "DIR", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    from forcedphot.serving.allocator import keep_temporaries_on_heap

    if not (args.child and args.child[0].startswith("library")):  # the library path runs as a notebook would
        keep_temporaries_on_heap()  # as the CLI and the service do (peers measured in this process benefit too)
    if args.child:
        child(args.child[0], Path(args.child[1]), int(args.child[2]), args.photutils_psf_max)
        return

    directory = demo_dir(args.size)
    counts = [int(c) for c in args.counts.split(",")]
    for count in counts:
        objects_file(directory, count)
    print(f"demo exposure {args.size}x{args.size}: {directory}; python {sys.version.split()[0]}, {os.cpu_count()} cores")
    header = f"{'objects':>8} {'method':<14} {'measured':>8} {'seconds':>9} {'objects/s':>11} {'peak MB':>8}"
    print(header)
    print("-" * len(header))
    for count in counts:
        rates = {}
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--child", method, str(directory), str(count), "--photutils-psf-max", str(args.photutils_psf_max)]
            result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            rate = result["objects"] / result["seconds"]
            rates[method] = rate
            note = f"  (subsample of {result['objects']})" if result["objects"] < count else ""
            print(f"{count:>8} {method:<14} {result['objects']:>8} {result['seconds']:>9.3f} {rate:>11.0f} {result['peak_mb']:>8.0f}{note}")
        ratios = {"kernels-psf/photutils-psf": ("kernels-psf", "photutils-psf"), "engine/photutils-psf": ("engine", "photutils-psf"),
                  "library-psf/photutils-psf": ("library-psf", "photutils-psf"),
                  "kernels-ap/sep-ap": ("kernels-ap", "sep-ap"), "kernels-ap/photutils-ap": ("kernels-ap", "photutils-ap")}
        shown = [f"{name} = {rates[a] / rates[b]:.2f}x" for name, (a, b) in ratios.items() if a in rates and b in rates]
        # the figure: seconds of every measurement through the library per second of sep's five apertures
        shown += [f"{m} time / sep-ap time = {rates['sep-ap'] / rates[m]:.2f}x" for m in ("library", "library-array-api", "engine")
                  if m in rates and "sep-ap" in rates]
        print(f"{'':>8} ratios: " + ", ".join(shown))


if __name__ == "__main__":
    main()
