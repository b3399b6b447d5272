"""Command line: ``forcedphot measure``, ``forcedphot demo``, ``forcedphot serve``.

Errors in the caller's input (tables, FITS files, PSF files, options) print one line
naming the problem and exit with code 2; nothing prints a traceback for them.
"""

import argparse
from contextlib import ExitStack
import sys
import time

from forcedphot.api.settings import SettingsError
from forcedphot.photometry.backend import BackendError, select_backend
from forcedphot.photometry.config import DEFAULT_BATCH_BYTES, MeasurementConfig
from forcedphot.photometry.exposure import ExposureError, open_exposure
from forcedphot.photometry.formats import write_catalog
from forcedphot.photometry.objects import InputError, read_objects
from forcedphot.photometry.psf_models import PsfError, choose_psf
from forcedphot.serving.allocator import keep_temporaries_on_heap
from forcedphot.version import __version__

USAGE_ERROR = 2


def _radii(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(r) for r in text.split(",") if r.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--apertures takes radii in pixels separated by commas, got {text!r}") from None


class _ProgressLine:
    """Progress on stderr for long runs: at most twice a second, only after one second."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.last = 0.0
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if now - self.start > 1.0 and now - self.last > 0.5:
            print(f"\r  measured {done}/{total} objects ({now - self.start:.1f} s)", end="", file=sys.stderr, flush=True)
            self.last, self.shown = now, True

    def close(self) -> None:
        if self.shown:
            print(file=sys.stderr)


def _measure(args: argparse.Namespace) -> int:
    from forcedphot.photometry.measure import measure

    start = time.perf_counter()
    config = MeasurementConfig(
        apertures_px=args.apertures or MeasurementConfig().apertures_px,
        backend=args.backend,
        include_offimage=args.include_offimage,
        batch_bytes=args.batch_mib * 2**20,
    )
    backend = select_backend(config.backend)
    objects = read_objects(args.objects)
    with ExitStack() as stack:
        science = stack.enter_context(open_exposure(args.exposure))
        difference = stack.enter_context(open_exposure(args.difference)) if args.difference else None
        psf = choose_psf(science.header, str(args.exposure), path=args.psf, fwhm_pixels=args.psf_fwhm,
                         fwhm_name="--psf-fwhm", how="use --psf-fwhm PIX or --psf FILE")
        progress = _ProgressLine()
        result = measure(science, objects, psf, config, difference=difference, backend=backend, progress=progress)
        progress.close()
    write_catalog(result.table, result.provenance, args.output)
    elapsed = time.perf_counter() - start
    print(
        f"{result.n_input} objects in, {result.n_on_detector} on the detector, {result.n_off_detector} off, "
        f"{result.n_invalid_coords} with invalid coordinates, {result.n_flagged} flagged; "
        f"{result.table.num_rows} rows -> {args.output} in {elapsed:.2f} s ({result.backend})"
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from forcedphot.demo.visit import make_demo_visit

    start = time.perf_counter()
    visit = make_demo_visit(args.directory, size=args.size, n_objects=args.objects, seed=args.seed)
    print(f"demo visit written to {args.directory} in {time.perf_counter() - start:.1f} s: {visit}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from forcedphot.api.server import run_server

    return run_server(host=args.host, port=args.port, repository=args.repository, workers=args.workers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forcedphot", description="Batched forced photometry of DiaObjects.")
    parser.add_argument("--version", action="version", version=f"forcedphot {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    m = commands.add_parser("measure", help="measure DiaObjects on one exposure")
    m.add_argument("exposure", help="science (direct) exposure, FITS")
    m.add_argument("objects", help="DiaObject table: parquet, CSV or JSON with diaObjectId, ra, dec (deg)")
    m.add_argument("-o", "--output", required=True, help="catalog to write (.parquet, .csv or .json)")
    m.add_argument("--difference", help="difference image: psfFlux is measured on it, scienceFlux on EXPOSURE")
    psf = m.add_mutually_exclusive_group()
    psf.add_argument("--psf-fwhm", type=float, help="circular Gaussian PSF of this FWHM, pixels")
    psf.add_argument("--psf", help="PSF file: PSFEx .psf, or a FITS PSF image")
    m.add_argument("--apertures", type=_radii, help="aperture radii in pixels, e.g. 3,6,12 (default 3,4.5,6,9,12)")
    m.add_argument("--backend", choices=("auto", "numpy", "cupy"), default="auto")
    m.add_argument("--include-offimage", action="store_true", help="also return objects off the detector, flagged")
    m.add_argument("--batch-mib", type=int, default=DEFAULT_BATCH_BYTES // 2**20,
                   help=f"memory bound per cutout batch, MiB (default {DEFAULT_BATCH_BYTES // 2**20})")
    m.set_defaults(run=_measure)

    d = commands.add_parser("demo", help="write a synthetic LSST-layout visit with DiaObjects and truth")
    d.add_argument("directory", help="output directory")
    d.add_argument("--size", type=int, default=4096, help="image side, pixels (default 4096)")
    d.add_argument("--objects", type=int, default=2000, help="number of DiaObjects (default 2000)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(run=_demo)

    s = commands.add_parser("serve", help="run the HTTP service (an embedded demo repository when none is given)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--repository", help="root directory of the exposure repository (default: embedded demo)")
    s.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    s.set_defaults(run=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_temporaries_on_heap()
    try:
        return args.run(args)
    except (InputError, ExposureError, PsfError, BackendError, SettingsError, ValueError, OSError) as exc:
        print(f"forcedphot {args.command}: error: {exc}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
