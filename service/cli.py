"""Command line: ``forcedphot measure``, ``lightcurve``, ``campaign``, ``index``, ``demo``, ``serve``.

Errors in the caller's input (tables, FITS files, PSF files, options) print one line
naming the problem and exit with code 2; nothing prints a traceback for them.
"""

import argparse
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
import math
import os
from pathlib import Path
import sys
import time
from typing import get_args
import warnings

from forcedphot.defaults import DEFAULT_BATCH_BYTES, DEFAULT_MIN_DIA_SOURCES, DEFAULT_PATH_TEMPLATE, FORMATS, BackendName
from forcedphot.version import __version__

# The engine (NumPy, astropy, pandas, pydantic: about a second) is imported by each command
# when it runs, so that --help and argument errors answer at once.

USAGE_ERROR = 2
INTERRUPTED = 130  # 128 + SIGINT, as shells report it
FLAGGED = "flagged (PSF fit failed, or an edge/saturated/cosmic-ray/bad/... mask bit in the object's footprint: pixelFlags_*)"
DEFAULT_INDEX = ".forcedphot/index.sqlite"
EXTRA_HELP = "add AB magnitudes and limits as light curves have them: psfMag, psfMagErr, psfMagLim5Sigma (5-sigma limiting magnitude), isUpperLimit (S/N below 3: psfMag null), the same for scienceFlux (scienceMag, ...), psfFlux_snr, scienceFlux_snr and epochStatus"
SKY_CHOICES = ("auto", "on", "off")
MEASUREMENT_CHOICES = ("all", "psf")
MEASUREMENTS_HELP = ("all (default): PSF flux, apertures, local background, pixel flags; psf: the PSF fluxes alone, as Rubin's "
                     "DiaForcedSourceTask measures them (the APDB's DiaForcedSource columns; about a quarter of the kernel time)")
CAMPAIGN_PRODUCTS = "_lightcurves.parquet"  # beside the partitions; dataset readers skip names starting with "_"
SKY_HELP = ("subtract each object's local background from its fluxes: auto (default) on direct images in plain FITS, whose sky "
            "is still in the pixels, never on LSST files or difference images")


def _radii(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(r) for r in text.split(",") if r.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--apertures takes radii in pixels separated by commas, got {text!r}") from None


class _ProgressLine:
    """Progress on stderr for long runs: at most twice a second, only after one second."""

    after, every = 1.0, 0.5  # seconds before the first line, and between lines

    def __init__(self, unit: str = "objects") -> None:
        self.start = time.perf_counter()
        self.last = 0.0
        self.shown = False
        self.unit = unit

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if now - self.start > self.after and now - self.last > self.every:
            print(f"\r  measured {done}/{total} {self.unit} ({now - self.start:.1f} s)", end="", file=sys.stderr, flush=True)
            self.last, self.shown = now, True

    def close(self) -> None:
        if self.shown:
            print(file=sys.stderr)


def _check_output(path: str, option: str) -> None:
    """Refuse, before any work, an output whose folder does not exist (ValueError naming
    the option and the folder)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{option} {path}: the folder {os.path.dirname(path) or '.'} does not exist")


def _measure(args: argparse.Namespace) -> int:
    from forcedphot.photometry.backend import select_backend
    from forcedphot.photometry.config import MeasurementConfig
    from forcedphot.photometry.exposure import open_exposure
    from forcedphot.photometry.formats import output_format, write_catalog
    from forcedphot.photometry.measure import measure
    from forcedphot.photometry.objects import read_objects
    from forcedphot.photometry.psf_choice import choose_psfs

    start = time.perf_counter()
    _check_output(args.output, "-o")
    output_format(args.output)  # an unknown suffix fails now, not after the measurement
    config = MeasurementConfig(
        extra_columns=args.extra_columns,
        apertures_px=args.apertures or MeasurementConfig().apertures_px,
        backend=args.backend,
        include_offimage=args.include_offimage,
        batch_bytes=args.batch_mib * 2**20,
        subtract_background=args.subtract_background,
        measurements=args.measurements,
    )
    backend = select_backend(config.backend)
    if args.butler:
        if args.objects is not None or args.difference:
            raise ValueError("with --butler the exposure is --visit and --detector (its difference image comes from the "
                             "repository): give only the OBJECTS table")
        args.objects = args.exposure
        args.exposure, args.difference = _butler_files(args)
    elif args.exposure is None:
        raise ValueError("give the EXPOSURE file, or --butler REPO --collections C --visit V --detector D")
    if args.objects is None and args.apdb is None:
        raise ValueError("give the OBJECTS table, or --apdb APDB.yaml to measure the APDB's DiaObjects")
    if args.store and args.apdb is None:
        raise ValueError("--store needs --apdb APDB.yaml")
    if args.min_dia_sources < 1:
        raise ValueError(f"--min-dia-sources must be at least 1, got {args.min_dia_sources}")
    objects = read_objects(args.objects) if args.objects else None
    with ExitStack() as stack:
        science = stack.enter_context(open_exposure(args.exposure))
        difference = stack.enter_context(open_exposure(args.difference)) if args.difference else None
        if objects is None:
            from forcedphot.serving.apdb import objects_on, open_apdb
            from forcedphot.serving.index import footprint_of

            objects = objects_on(open_apdb(args.apdb), footprint_of(difference or science), args.min_dia_sources)
        psf, science_psf = choose_psfs(science, difference, str(args.exposure), str(args.difference) if args.difference else None,
                                       path=args.psf, fwhm_pixels=args.psf_fwhm, fwhm_name="--psf-fwhm",
                                       how="use --psf-fwhm PIX or --psf FILE")
        progress = _ProgressLine()
        result = measure(science, objects, psf, config.model_copy(update={"cpu_kernels": args.cpu_kernels}), difference=difference,
                         science_psf=science_psf, backend=backend, progress=progress)
        progress.close()
    stored = None
    if args.store:
        from forcedphot.serving.apdb import open_apdb, store_forced_sources

        stored = store_forced_sources(open_apdb(args.apdb), result.table)
    write_catalog(result.table, result.provenance, args.output)
    elapsed = time.perf_counter() - start
    print(
        f"{plural(result.n_input, 'object')} in{' (from the APDB)' if args.objects is None else ''}, {result.n_on_detector} on the "
        f"detector, {result.n_off_detector} off, {result.n_invalid_coords} with invalid coordinates, {result.n_flagged} {FLAGGED}; "
        f"{result.table.num_rows} rows -> {args.output} in {elapsed:.2f} s ({result.backend})"
        + (f"; {plural(stored, 'DiaForcedSource')} stored in the APDB" if stored is not None else "")
    )
    uncalibrated = [side["path"] for side in (result.provenance["exposure"], result.provenance.get("science"))
                    if side and side["calibration_source"] == "none"]
    if uncalibrated:
        print(f"note: {', '.join(uncalibrated)} has no photometric calibration (no PhotoCalib, FLUXMAG0, zero point or "
              "BUNIT = 'nJy'): fluxes are in counts only (the *_instFlux columns); the nJy columns are null")
    return 0


def _butler_files(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """The science and (if the repository has one) difference files of ``--visit`` and
    ``--detector`` in the Butler repository ``--butler``."""
    from forcedphot.serving.repository import DataIdRef, UnknownReference

    if args.visit is None or args.detector is None:
        raise ValueError("--butler needs --visit and --detector (the exposure's data id)")
    source, _ = _open_index(args)

    def data_id(kind: str) -> DataIdRef:
        return DataIdRef(visit=args.visit, detector=args.detector, datasetType=kind, instrument=args.instrument)

    science = source.resolve(data_id("calexp"))
    try:
        difference = source.resolve(data_id("difference"))
    except UnknownReference:
        difference = None
    return science, difference


def _demo(args: argparse.Namespace) -> int:
    import shutil
    import uuid

    start = time.perf_counter()
    target = Path(args.directory)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(f"{target} exists and is not an empty folder; give a new one (a demo is written whole, never mixed "
                         "with older files)")
    _check_output(str(target), "DIRECTORY")
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.partial")  # renamed into place when complete
    try:
        if args.visits > 1:
            from forcedphot.demo.survey import make_demo_survey

            written = make_demo_survey(staging, visits=args.visits, size=args.size or 512, n_objects=args.objects or 200,
                                       seed=args.seed)
            what = "demo repository"
        else:
            from forcedphot.demo.visit import make_demo_visit

            written = make_demo_visit(staging, size=args.size or 4096, n_objects=args.objects or 2000, seed=args.seed)
            what = "demo visit"
        if target.exists():
            target.rmdir()  # empty, checked above
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"{what} written to {args.directory} in {time.perf_counter() - start:.1f} s: {written}")
    return 0


def plural(count: int, noun: str) -> str:
    """``1 object``, ``2 objects``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _index_path(args: argparse.Namespace) -> Path:
    return Path(args.index) if args.index else Path(args.repository) / DEFAULT_INDEX


def _open_index(args: argparse.Namespace):
    """The coverage of ``lightcurve`` and ``campaign``: a Butler's registry (``--butler``),
    else the file index of REPOSITORY, refreshed: (index, refresh report)."""
    from forcedphot.serving.index import ExposureIndex, RefreshReport

    if getattr(args, "butler", None):
        from forcedphot.api.settings import default_data_dir
        from forcedphot.serving.butler import DEFAULT_REMOTE_CACHE_BYTES, ButlerSource, RemoteFiles

        if not args.collections:
            raise ValueError("--butler needs --collections (comma-separated)")
        remote = RemoteFiles(default_data_dir() / "remote-files", DEFAULT_REMOTE_CACHE_BYTES)  # object storage files are copied here
        return ButlerSource(args.butler, args.collections, args.science_type, args.difference_type, remote=remote), RefreshReport()
    if args.repository is None:
        raise ValueError("give the REPOSITORY folder, or --butler REPO --collections C")
    if not Path(args.repository).is_dir():
        raise ValueError(f"repository {args.repository} is not a directory")
    index = ExposureIndex(_index_path(args))
    return index, index.refresh([Path(args.repository)], args.template)


def _index(args: argparse.Namespace) -> int:
    index, report = _open_index(args)
    where = f"the Butler registry at {args.butler} (its regions are the index)" if args.butler else _index_path(args)
    print(f"{where}: {plural(index.count(), 'exposure')}; {report}")
    return 0


def _plan(args: argparse.Namespace):
    """The light-curve plan of ``lightcurve`` and ``campaign``: (objects, index, refresh report, task)."""
    import pandas as pd

    from forcedphot.photometry.config import MeasurementConfig
    from forcedphot.photometry.objects import read_objects

    from forcedphot.photometry.objects import validate_objects
    from forcedphot.serving.lightcurves import plan_lightcurves

    if args.objects:
        objects = read_objects(args.objects)
    elif args.ra is not None and args.dec is not None:
        if not (0 <= args.ra < 360 and -90 <= args.dec <= 90):
            raise ValueError(f"--ra {args.ra:g} --dec {args.dec:g} is not a sky position (0 <= ra < 360, -90 <= dec <= 90, degrees)")
        objects = validate_objects(pd.DataFrame({"diaObjectId": [0], "ra": [args.ra], "dec": [args.dec]}))
    else:
        raise ValueError("give --objects FILE, or --ra and --dec (degrees)")
    config = MeasurementConfig(apertures_px=args.apertures or MeasurementConfig().apertures_px, backend=args.backend,
                               extra_columns=args.extra_columns, subtract_background=args.subtract_background,
                               measurements=args.measurements)
    if args.mjd_min is not None and args.mjd_max is not None and args.mjd_min > args.mjd_max:
        raise ValueError(f"--mjd-min {args.mjd_min:g} is after --mjd-max {args.mjd_max:g}: the time range is empty")
    index, report = _open_index(args)
    task = plan_lightcurves(index, objects, config, mjd_min=args.mjd_min, mjd_max=args.mjd_max, bands=args.band, psf_fwhm=args.psf_fwhm)
    if not task.epochs:
        print("forcedphot: note: no exposure covers these objects (in this time range and these bands)", file=sys.stderr)
    return objects, index, report, task


def _products(args: argparse.Namespace):
    """The light-curve products the options ask for (ValueError naming a bad option)."""
    from forcedphot.photometry.lightcurve_products import BaselineWindow, Products

    if not (args.snr_limit > 0 and math.isfinite(args.snr_limit)):
        raise ValueError(f"--snr-limit {args.snr_limit:g}: give a positive number")
    baseline = None
    if args.baseline_mjd_max is not None:
        if args.baseline_mjd_min is not None and args.baseline_mjd_min > args.baseline_mjd_max:
            raise ValueError(f"--baseline-mjd-min {args.baseline_mjd_min:g} is after --baseline-mjd-max {args.baseline_mjd_max:g}")
        if args.baseline_min_epochs < 2:
            raise ValueError("--baseline-min-epochs: give 2 or more")
        baseline = BaselineWindow(args.baseline_mjd_max, args.baseline_mjd_min, args.baseline_min_epochs)
    elif args.baseline_mjd_min is not None:
        raise ValueError("--baseline-mjd-min needs --baseline-mjd-max (the window's end, before the event)")
    days, night = None, args.bin == "night"
    if args.bin is not None and not night:
        try:
            days = float(args.bin)
        except ValueError:
            days = math.nan
        if not (days > 0 and math.isfinite(days)):
            raise ValueError(f"--bin {args.bin}: give a number of days, or 'night'")
    return Products(args.snr_limit, baseline, days, night)


def _lightcurve(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from forcedphot.photometry.backend import select_backend
    from forcedphot.photometry.formats import output_format, write_catalog
    from forcedphot.photometry.lightcurve_products import make_products
    from forcedphot.serving.executor import MeasureService
    from forcedphot.serving.exposure_cache import ExposureCache

    start = time.perf_counter()
    _check_output(args.output, "-o")
    if args.plot:
        _check_output(args.plot, "--plot")
    output_format(args.output)
    products = _products(args)
    objects, index, report, task = _plan(args)
    config = task.config
    service = MeasureService(ExposureCache(0), select_backend(config.backend), threads=1)
    progress, epochs = _ProgressLine("exposures"), [0]

    def each_epoch(*batch: int) -> None:  # called before each epoch (no arguments) and after each batch of it
        if not batch:
            progress(epochs[0], len(task.epochs))
            epochs[0] += 1

    try:
        result = service.run_lightcurves(task, each_epoch)
    finally:
        service.close()
        progress.close()
    table, done = make_products(result.table, products)
    write_catalog(table, {"lightcurves": result.provenance, "errors": result.errors, "products": done}, args.output)
    if args.plot:
        from forcedphot.photometry.formats import to_pandas
        from forcedphot.photometry.plot import plot_lightcurves

        # the epochs, not the bins
        shown = make_products(result.table, replace(products, bin_days=None, bin_night=False))[0] if products.binned else table
        plot_lightcurves(to_pandas(shown), args.plot, magnitudes=args.plot_magnitudes)
    n_objects = len(set(result.table.column("diaObjectId").to_pylist()))
    print(f"{plural(len(objects), 'object')}, {plural(len(task.epochs), 'covering exposure')} ({index.count()} indexed; "
          f"{report.added + report.updated} read now); {plural(result.table.num_rows, 'measurement')} of {plural(n_objects, 'object')} -> "
          f"{args.output} in "
          f"{time.perf_counter() - start:.2f} s" + (f"; plot -> {args.plot}" if args.plot else ""))
    for error in result.errors:
        print(f"  not measured: {error['exposure']}: {error['detail']}", file=sys.stderr)
    return 0


def _campaign(args: argparse.Namespace) -> int:
    from forcedphot.serving.campaign import finished_count, run_campaign

    _check_output(args.output, "-o")
    products = _products(args)
    objects, index, report, task = _plan(args)
    print(f"{plural(len(objects), 'object')} on {plural(len(task.epochs), 'covering exposure')} ({index.count()} indexed; {report.added + report.updated} "
          f"read now)")

    def progress(done: int, total: int) -> None:
        print(f"\r  {done}/{total} exposures", end="", file=sys.stderr, flush=True)

    try:
        result = run_campaign(task, Path(args.output), where=args.where, scheduler=args.scheduler, workers=args.workers,
                              retries=args.retries, progress=progress)
    except KeyboardInterrupt:
        done = finished_count(Path(args.output))
        print(f"\nforcedphot campaign: interrupted; {done} of {plural(len(task.epochs), 'exposure')} finished and kept in "
              f"{args.output}; the same command resumes there, measuring only the others", file=sys.stderr)
        return INTERRUPTED
    print(file=sys.stderr)
    resumed = f"; {plural(result.resumed, 'exposure')} done by an earlier run kept" if result.resumed else ""
    print(f"{result.rows} measurements in {result.partitions} partitions -> {args.output} in {result.seconds:.2f} s "
          f"({result.pairs / max(result.seconds, 1e-9):.0f} object-exposures/s; {result.where}{resumed})")
    for error in result.errors:
        print(f"  not measured: {error['exposure']}: {error['detail']}", file=sys.stderr)
    if products.baseline is not None or products.binned:
        from forcedphot.photometry.catalog_files import merge_parts

        partitions = sorted(Path(args.output).glob("part-*.parquet"))
        rows = merge_parts(partitions, Path(args.output) / CAMPAIGN_PRODUCTS, {"campaign": result.manifest()}, lightcurve=True,
                           products=products) if partitions else 0
        print(f"{plural(rows, 'bin' if products.binned else 'baseline-corrected row')} -> {Path(args.output) / CAMPAIGN_PRODUCTS}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from forcedphot.api.server import run_server

    return run_server(host=args.host, port=args.port, repository=args.repository, workers=args.workers,
                      butler=args.butler, collections=args.collections, apdb=args.apdb)


def _repository_arguments(parser: argparse.ArgumentParser, optional: bool = False) -> None:
    parser.add_argument("repository", nargs="?" if optional else None,
                        help="repository root directory" + (" (or --butler)" if optional else ""))
    parser.add_argument("--template", default=DEFAULT_PATH_TEMPLATE, help=f"path template of the files (default {DEFAULT_PATH_TEMPLATE})")
    parser.add_argument("--index", help=f"index file (default REPOSITORY/{DEFAULT_INDEX}); re-running adds new and changed files only")


def _butler_arguments(c: argparse.ArgumentParser) -> None:
    """Where a Butler repository's exposures are (instead of a folder of files)."""
    b = c.add_argument_group("a Butler repository instead of a folder (lsst-daf-butler)")
    b.add_argument("--butler", help="Butler repository root (or its butler.yaml URI)")
    b.add_argument("--collections", type=lambda text: [part.strip() for part in text.split(",") if part.strip()],
                   help="collections to search, comma-separated")
    b.add_argument("--science-type", default="visit_image", help="dataset type of the science image (default visit_image)")
    b.add_argument("--difference-type", default="difference_image", help="dataset type of the difference image (default difference_image)")


def _product_arguments(c: argparse.ArgumentParser, bins: str) -> None:
    """What ``lightcurve`` and ``campaign`` make of the epochs (see :func:`_products`)."""
    p = c.add_argument_group("products: magnitudes, limits and epochStatus are always added (see the README)")
    p.add_argument("--snr-limit", type=float, default=3.0, help="psfFlux / psfFluxErr below this is an upper limit (default 3)")
    p.add_argument("--baseline-mjd-max", type=float, help="subtract each object's and band's baseline: the median of its good "
                                                          "epochs up to this MJD (TAI), before the event")
    p.add_argument("--baseline-mjd-min", type=float, help="the baseline window's first MJD (default: the first epoch)")
    p.add_argument("--baseline-min-epochs", type=int, default=10, help="fewer good epochs in the window: no baseline (default 10)")
    p.add_argument("--bin", help=f"{bins}: a number of days, or 'night' (Rubin's day_obs)")


def _plan_arguments(c: argparse.ArgumentParser) -> None:
    """What ``lightcurve`` and ``campaign`` measure."""
    _repository_arguments(c, optional=True)
    _butler_arguments(c)
    where = c.add_argument_group("what to measure (--objects, or --ra and --dec)")
    where.add_argument("--objects", help="DiaObject table: parquet, CSV or JSON with diaObjectId, ra, dec (deg)")
    where.add_argument("--ra", type=float, help="right ascension of one position, deg (diaObjectId 0)")
    where.add_argument("--dec", type=float, help="declination of one position, deg")
    c.add_argument("--mjd-min", type=float, help="earliest exposure midpoint, MJD (TAI)")
    c.add_argument("--mjd-max", type=float, help="latest exposure midpoint, MJD (TAI)")
    c.add_argument("--band", action="append", help="only this band (repeat for several)")
    c.add_argument("--psf-fwhm", type=float, help="Gaussian PSF FWHM, pixels (default: each exposure's PSF_FWHM keyword)")
    c.add_argument("--apertures", type=_radii, help="aperture radii in pixels, e.g. 3,6,12 (default 3,4.5,6,9,12)")
    c.add_argument("--backend", choices=get_args(BackendName), default="auto", help="array backend (default auto)")
    c.add_argument("--extra-columns", action="store_true", help=EXTRA_HELP)
    c.add_argument("--subtract-background", choices=SKY_CHOICES, default="auto", help=SKY_HELP)
    c.add_argument("--measurements", choices=MEASUREMENT_CHOICES, default="all", help=MEASUREMENTS_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forcedphot", description="Batched forced photometry of DiaObjects.")
    parser.add_argument("--version", action="version", version=f"forcedphot {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, example: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                                   epilog=f"example:\n  {example}", formatter_class=argparse.RawDescriptionHelpFormatter)

    formats = ", ".join("." + f for f in FORMATS)
    m = command("measure", "measure DiaObjects on one exposure",
                "forcedphot measure demo/calexp.fits demo/diaObjects.parquet --difference demo/difference.fits -o forced.parquet")
    m.add_argument("exposure", nargs="?", help="science (direct) exposure, FITS (or, with --butler, --visit and --detector)")
    m.add_argument("objects", nargs="?", help="DiaObject table: parquet, CSV or JSON with diaObjectId, ra, dec (deg); "
                                              "or none, with --apdb")
    m.add_argument("-o", "--output", required=True, help=f"catalog to write; the suffix picks the format ({formats})")
    _butler_arguments(m)
    butler = m.add_argument_group("the exposure's data id in the Butler repository (its difference image is used when there is one)")
    butler.add_argument("--visit", type=int, help="visit")
    butler.add_argument("--detector", type=int, help="detector")
    butler.add_argument("--instrument", help="instrument (default: the repository's only one)")
    apdb = m.add_argument_group("an APDB (lsst-dax-apdb) for the DiaObjects and the DiaForcedSources")
    apdb.add_argument("--apdb", help="APDB configuration file: without OBJECTS, measure its DiaObjects on the exposure")
    apdb.add_argument("--min-dia-sources", type=int, default=DEFAULT_MIN_DIA_SOURCES,
                      help=f"only DiaObjects with at least this many DiaSources (default {DEFAULT_MIN_DIA_SOURCES}, as Rubin's "
                           "DiaForcedSourceTask; 1 takes all)")
    apdb.add_argument("--store", action="store_true", help="store the DiaForcedSources in the APDB (rows already there are left alone)")
    m.add_argument("--difference", help="difference image: psfFlux is measured on it, scienceFlux on EXPOSURE")
    psf = m.add_mutually_exclusive_group()
    psf.add_argument("--psf-fwhm", type=float, help="circular Gaussian PSF of this FWHM, pixels")
    psf.add_argument("--psf", help="PSF file: PSFEx .psf, or a FITS PSF image")
    m.add_argument("--apertures", type=_radii, help="aperture radii in pixels, e.g. 3,6,12 (default 3,4.5,6,9,12)")
    m.add_argument("--backend", choices=get_args(BackendName), default="auto",
                   help="array backend (default auto: cupy when a CUDA device answers, else numpy)")
    m.add_argument("--extra-columns", action="store_true", help=EXTRA_HELP)
    m.add_argument("--subtract-background", choices=SKY_CHOICES, default="auto", help=SKY_HELP)
    m.add_argument("--measurements", choices=MEASUREMENT_CHOICES, default="all", help=MEASUREMENTS_HELP)
    m.add_argument("--include-offimage", action="store_true", help="also return objects off the detector, flagged")
    m.add_argument("--cpu-kernels", choices=("fused", "array-api"), default="fused",
                   help="on the CPU: the compiled fused kernels (default; the service runs them too), or the array-API ones "
                        "(the same numbers to 1e-10; no ~0.5 s load of the compiled code: quicker below a few thousand objects)")
    m.add_argument("--batch-mib", type=int, default=DEFAULT_BATCH_BYTES // 2**20,
                   help=f"memory bound per cutout batch, MiB (default {DEFAULT_BATCH_BYTES // 2**20})")
    m.set_defaults(run=_measure)

    d = command("demo", "write a synthetic LSST-layout visit, or a repository of many visits (--visits)",
                "forcedphot demo survey --visits 24")
    d.add_argument("directory", help="output directory")
    d.add_argument("--visits", type=int, default=1,
                   help="visits to write (default 1: one visit in DIRECTORY; more: a repository of dithered g/r visits over 60 days "
                        "with variable DiaObjects, in the path template {visit}/{detector}/{datasetType}.fits)")
    d.add_argument("--size", type=int, help="image side, pixels (default 4096, or 512 for a repository)")
    d.add_argument("--objects", type=int, help="number of DiaObjects (default 2000, or 200 for a repository)")
    d.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same files")
    d.set_defaults(run=_demo)

    i = command("index", "index a repository's exposures (sky footprints, times, bands) for light curves", "forcedphot index survey")
    _repository_arguments(i, optional=True)
    _butler_arguments(i)
    i.set_defaults(run=_index)

    c = command("lightcurve", "measure objects on every indexed exposure that covers them",
                "forcedphot lightcurve survey --ra 150.1 --dec 2.2 --band g --band r -o lc.parquet --plot lc.png")
    _plan_arguments(c)
    c.add_argument("-o", "--output", required=True, help=f"table to write, one row per measurement; the suffix picks the format ({formats})")
    c.add_argument("--plot", help="also draw the light curves (flux vs time per band) to this PNG")
    c.add_argument("--plot-magnitudes", action="store_true", help="draw AB magnitudes, upper limits at their 5-sigma limit")
    _product_arguments(c, "write bins instead of epochs")
    c.set_defaults(run=_lightcurve)

    k = command("campaign", "measure many objects on every covering exposure, one task per exposure, on Dask",
                "FORCEDPHOT_DASK_SCHEDULER=tcp://scheduler:8786 forcedphot campaign survey --objects objects.parquet -o lc-dataset")
    _plan_arguments(k)
    k.add_argument("-o", "--output", required=True, help="new folder for the parquet dataset (one partition per exposure)")
    k.add_argument("--where", choices=("dask", "local"), default="dask",
                   help="dask ($FORCEDPHOT_DASK_SCHEDULER, else a LocalCluster) or a local process pool (default dask)")
    k.add_argument("--scheduler", help="Dask scheduler address (default: $FORCEDPHOT_DASK_SCHEDULER, else a LocalCluster)")
    k.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="LocalCluster workers or local processes (default: one per core)")
    k.add_argument("--retries", type=int, default=2, help="times a failed task is run again (default 2)")
    _product_arguments(k, f"bins in DATASET/{CAMPAIGN_PRODUCTS} beside the epochs' partitions (where a baseline alone writes "
                          "the corrected epochs)")
    k.set_defaults(run=_campaign)

    s = command("serve", "run the HTTP service (an embedded demo repository when none is given)",
                "FORCEDPHOT_API_KEYS=$(openssl rand -hex 16) forcedphot serve --repository /data/repo --port 8000")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    s.add_argument("--repository", help="root directory of the exposure repository (default: embedded demo)")
    s.add_argument("--butler", help="a Butler repository instead (root or butler.yaml URI); with --collections")
    s.add_argument("--collections", help="Butler collections to search, comma-separated")
    s.add_argument("--apdb", help="an APDB configuration file (apdb-cli create-sql): DiaObjects from it, DiaForcedSources stored in it")
    s.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    s.set_defaults(run=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from forcedphot.api.settings import SettingsError
    from forcedphot.photometry.backend import BackendError
    from forcedphot.photometry.exposure import ExposureError
    from forcedphot.photometry.objects import InputError
    from forcedphot.photometry.psf_models import PsfError
    from forcedphot.serving.allocator import keep_temporaries_on_heap
    from forcedphot.serving.apdb import ApdbUnavailable
    from forcedphot.serving.repository import RepositoryError

    keep_temporaries_on_heap()
    try:
        with _header_warnings(args.command):
            return args.run(args)
    except (InputError, ExposureError, PsfError, BackendError, SettingsError, ApdbUnavailable, RepositoryError, ValueError, OSError) as exc:
        print(f"forcedphot {args.command}: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(f"\nforcedphot {args.command}: interrupted; nothing was written", file=sys.stderr)
        return INTERRUPTED


@contextmanager
def _header_warnings(command: str) -> Iterator[None]:
    """Collect astropy's warnings about FITS headers and WCS into one summary line."""
    from astropy.utils.exceptions import AstropyWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AstropyWarning)
        yield
    if caught:
        distinct = list(dict.fromkeys(str(w.message).splitlines()[0] for w in caught))
        print(f"forcedphot {command}: {len(caught)} astropy warning(s) about the FITS headers, e.g. {distinct[0]}"
              + (f" (and {len(distinct) - 1} other kinds)" if len(distinct) > 1 else ""), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
