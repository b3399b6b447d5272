"""The measurement engine: one exposure (plus optionally its difference image) and a
DiaObject table in, a DiaForcedSource catalog out.

Data path: select (WCS, Box2D) -> stage cutouts in row bands -> kernels on the chosen
backend -> host arrays -> catalog. With a difference image, as ``DiaForcedSourceTask``:
every measurement is made on the difference image, and ``scienceFlux`` is the PSF flux
on the direct image at the same sky position. With one exposure, everything is measured
on it and ``scienceFlux`` stays null.
"""

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import cached_property
import math
import time

import numpy as np
import pandas as pd
import pyarrow as pa

from . import __version__
from .backend import Backend, select_backend, to_numpy
from .catalog import build_catalog, to_pandas
from .config import MeasurementConfig
from .cutouts import CutoutStack, stage_cutouts
from .exposure import Exposure
from .kernels.aperture import aperture_fluxes
from .kernels.local_background import local_background
from .kernels.pixel_flags import pixel_flags
from .kernels.psf_flux import psf_flux
from .local_wcs import local_cd_matrix
from .psf_models import PsfModel
from .selection import select_on_image, sky_to_pixel

# pixelFlags_<name> -> afw mask plane
PIXEL_FLAG_PLANES = {
    "edge": "EDGE",
    "nodata": "NO_DATA",
    "interpolated": "INTRP",
    "saturated": "SAT",
    "cr": "CR",
    "bad": "BAD",
    "suspect": "SUSPECT",
}
BACKGROUND_REJECT_PLANES = ("BAD", "SAT", "NO_DATA")
DEFAULT_NO_DATA_BIT = 8

Progress = Callable[[int, int], None]


@dataclass
class Measurement:
    """A catalog and what it took to make it."""

    table: pa.Table  # the DiaForcedSource catalog, one row per returned object
    n_input: int
    n_on_detector: int
    n_invalid_coords: int
    n_flagged: int
    backend: str
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    provenance: dict = field(default_factory=dict)

    @cached_property
    def catalog(self) -> pd.DataFrame:
        """The catalog as a DataFrame (see :func:`catalog.to_pandas`)."""
        return to_pandas(self.table)

    @property
    def n_off_detector(self) -> int:
        """Objects with valid coordinates that fall off the detector."""
        return self.n_input - self.n_on_detector - self.n_invalid_coords


def mask_bits(planes: dict[str, int], names) -> int:
    """OR of the bits of the named mask planes that the exposure defines."""
    return sum(1 << planes[name] for name in set(names) if name in planes)


def cutout_half_size(psf: PsfModel, sigma: np.ndarray, config: MeasurementConfig) -> int:
    """Half-width h (px) of cutouts large enough for every measurement.

    Covers the background annulus (outer radius in PSF sigmas), the largest aperture
    plus one pixel (so truncation by the cutout cannot happen), and the PSF stamp.
    """
    sigma_max = float(np.max(sigma)) if sigma.size else 0.0
    return max(
        math.ceil(config.background_outer_sigma * sigma_max),
        math.ceil(max(config.apertures_px) + 1),
        psf.stamp_size // 2,
    )


@dataclass(frozen=True)
class KernelInputs:
    """Host arrays for one kernel call. Inputs of several requests with the same cutout
    and PSF stamp sizes concatenate (:func:`concatenate_inputs`), so a service can
    measure them in one batch."""

    image: np.ndarray  # (n, K, K) float32
    variance: np.ndarray  # (n, K, K) float32
    mask: np.ndarray  # (n, K, K) int32
    inside: np.ndarray  # (n, K, K) bool
    cx: np.ndarray  # (n,) cutout coordinates, px
    cy: np.ndarray
    sigma: np.ndarray  # (n,) PSF determinant radius, px
    psf: np.ndarray  # (n, Kp, Kp) PSF stamps, each summing to 1

    def __len__(self) -> int:
        return self.image.shape[0]

    @property
    def shape_key(self) -> tuple:
        """Inputs with equal keys can be concatenated."""
        return self.image.shape[1:] + self.psf.shape[1:]


def concatenate_inputs(parts: list[KernelInputs]) -> KernelInputs:
    """One batch from several (equal :attr:`KernelInputs.shape_key`)."""
    return KernelInputs(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(KernelInputs)))


def split_results(results: dict[str, np.ndarray], sizes: list[int]) -> list[dict[str, np.ndarray]]:
    """Undo :func:`concatenate_inputs` on a kernel result."""
    bounds = np.cumsum([0] + sizes)
    return [{k: v[a:b] for k, v in results.items()} for a, b in zip(bounds[:-1], bounds[1:])]


class KernelRunner:
    """Runs the kernels on staged cutouts, on one backend, for one exposure's mask planes."""

    def __init__(self, backend: Backend, exposure: Exposure, psf: PsfModel, config: MeasurementConfig):
        self.backend, self.psf, self.config = backend, psf, config
        planes = exposure.mask_planes
        self.bad_fit_bits = mask_bits(planes, config.bad_mask_planes)
        self.background_reject_bits = mask_bits(planes, BACKGROUND_REJECT_PLANES)
        self.flag_bits = {name: planes[plane] for name, plane in PIXEL_FLAG_PLANES.items() if plane in planes}

    @cached_property
    def key(self) -> tuple:
        """Runners with equal keys compute identically: their inputs may share a batch."""
        return (self.backend.name, self.bad_fit_bits, self.background_reject_bits, tuple(sorted(self.flag_bits.items())), self.config.model_dump_json())

    def inputs(self, stack: CutoutStack, x: np.ndarray, y: np.ndarray, sigma: np.ndarray | None = None) -> KernelInputs:
        """Kernel inputs for a staged stack; x, y local positions, sigma PSF widths (px)."""
        sigma = np.full(len(x), np.nan) if sigma is None else sigma
        return KernelInputs(stack.image, stack.variance, stack.mask, stack.inside, stack.cx, stack.cy, sigma, self.psf.stamps(x, y, np))

    def _psf_fit(self, xp, image, variance, mask, inside, psf) -> dict:
        """PSF flux on the central PSF-stamp-sized part of the stack."""
        kp = psf.shape[1]
        start = image.shape[1] // 2 - kp // 2
        crop = (slice(None), slice(start, start + kp), slice(start, start + kp))
        image, variance, mask, inside = image[crop], variance[crop], mask[crop], inside[crop]
        usable = inside & xp.isfinite(image) & xp.isfinite(variance)
        if self.bad_fit_bits:
            usable = usable & ((mask & xp.asarray(self.bad_fit_bits, dtype=mask.dtype)) == 0)
        return psf_flux(image, variance, psf, inside, usable)

    def run(self, inputs: KernelInputs, full: bool = True) -> dict[str, np.ndarray]:
        """Every measurement (``full``) or the PSF flux alone; host arrays out."""
        xp = self.backend.xp
        to = self.backend.to_device
        image, variance, mask, inside = to(inputs.image), to(inputs.variance), to(inputs.mask), to(inputs.inside)
        fit = self._psf_fit(xp, image, variance, mask, inside, to(inputs.psf))
        if not full:
            return {k: to_numpy(v) for k, v in fit.items()}
        cx, cy, sigma = to(inputs.cx), to(inputs.cy), to(inputs.sigma)
        out = {f"psfFlux_{k}": v for k, v in fit.items()}

        valid = inside & xp.isfinite(image) & xp.isfinite(variance)
        flux, err, truncated = aperture_fluxes(image, variance, valid, cx, cy, self.config.apertures_px)
        out.update(apFlux=flux, apFluxErr=err, apTruncated=truncated)

        clean = valid & ((mask & xp.asarray(self.background_reject_bits, dtype=mask.dtype)) == 0)
        mean, std, _, no_good = local_background(
            image, clean, cx, cy, sigma,
            inner=self.config.background_inner_sigma, outer=self.config.background_outer_sigma,
            n_iter=self.config.background_iterations, n_sigma=self.config.background_clip_sigma,
        )
        out.update(localBackground_instFlux=mean, localBackground_instFluxErr=std, localBackground_flag_noGoodPixels=no_good)

        flags = pixel_flags(mask, inside, cx, cy, self.config.psf_footprint_scaling * sigma, self.flag_bits)
        out.update({f"pixelFlags_{k}": v for k, v in flags.items()})
        return {k: to_numpy(v) for k, v in out.items()}


Execute = Callable[[KernelRunner, KernelInputs, bool], dict[str, np.ndarray]]


def run_directly(runner: KernelRunner, inputs: KernelInputs, full: bool) -> dict[str, np.ndarray]:
    """The default executor: run the kernels now, in this thread."""
    return runner.run(inputs, full)


def _scatter(results: dict[str, np.ndarray], batch: dict[str, np.ndarray], index: np.ndarray, n: int) -> None:
    """Place one batch's values at their rows of the full-length result arrays."""
    for name, values in batch.items():
        if name not in results:
            fill = False if values.dtype == bool else (0 if values.dtype.kind in "iu" else np.nan)
            results[name] = np.full((n,) + values.shape[1:], fill, dtype=values.dtype)
        results[name][index] = values


def _science_psf_flux(science: Exposure, kernels: KernelRunner, ra, dec, config: MeasurementConfig, execute: Execute) -> dict[str, np.ndarray]:
    """PSF flux on the direct image at the objects' sky positions (difference mode)."""
    x, y = sky_to_pixel(science.wcs, ra, dec)
    h = kernels.psf.stamp_size // 2
    with np.errstate(invalid="ignore"):
        near = (x > -h - 1) & (x < science.width + h) & (y > -h - 1) & (y < science.height + h)
    results: dict[str, np.ndarray] = {}
    rows = np.flatnonzero(near)
    no_data = science.mask_planes.get("NO_DATA", DEFAULT_NO_DATA_BIT)
    for stack in stage_cutouts(science, x[rows], y[rows], 2 * h + 1, batch_bytes=config.batch_bytes, no_data_bit=no_data):
        index = rows[stack.index]
        _scatter(results, execute(kernels, kernels.inputs(stack, x[index], y[index]), False), index, len(ra))
    if "flag" not in results:  # nothing landed on the direct image
        results = {"instFlux": np.full(len(ra), np.nan), "instFluxErr": np.full(len(ra), np.nan), "flag": np.ones(len(ra), bool)}
    results["flag"] = results["flag"] | ~near
    return results


def measure(
    science: Exposure,
    objects: pd.DataFrame,
    psf: PsfModel,
    config: MeasurementConfig | None = None,
    *,
    difference: Exposure | None = None,
    backend: Backend | None = None,
    progress: Progress | None = None,
    execute: Execute = run_directly,
) -> Measurement:
    """Forced photometry of validated ``objects`` (see :func:`objects.validate_objects`).

    ``progress(done, total)`` is called after every batch of cutouts. ``execute`` runs
    the kernels on each batch's inputs; a service may pass one that coalesces the
    batches of concurrent requests into one kernel call.
    """
    config = config or MeasurementConfig()
    backend = backend or select_backend(config.backend)
    primary = difference if difference is not None else science
    timings: dict[str, float] = {}

    start = time.perf_counter()
    ra, dec = objects["ra"].to_numpy(), objects["dec"].to_numpy()
    coord_valid = objects["coord_valid"].to_numpy()
    selection = select_on_image(primary.wcs, primary.width, primary.height, ra, dec, coord_valid)
    on = np.flatnonzero(selection.on_image)
    # rows returned: on the detector, those with unusable coordinates (flagged, so the
    # caller sees them), and on request those off the detector
    returned = selection.on_image | ~coord_valid | config.include_offimage
    rows = np.flatnonzero(returned)
    measured_mask = selection.on_image[rows]
    measured_rows = np.flatnonzero(measured_mask)  # positions within `rows`
    x, y = selection.x[rows], selection.y[rows]
    sigma = np.full(len(rows), np.nan)
    sigma[measured_rows] = psf.sigma(x[measured_rows], y[measured_rows])
    timings["select"] = time.perf_counter() - start

    kernels = KernelRunner(backend, primary, psf, config)
    size = 2 * cutout_half_size(psf, sigma[measured_rows], config) + 1
    no_data = primary.mask_planes.get("NO_DATA", DEFAULT_NO_DATA_BIT)
    results: dict[str, np.ndarray] = {}
    stage_time = kernel_time = 0.0
    done, total = 0, len(measured_rows) * (2 if difference is not None else 1)
    t0 = time.perf_counter()
    mx, my = x[measured_rows], y[measured_rows]
    for stack in stage_cutouts(primary, mx, my, size, batch_bytes=config.batch_bytes, no_data_bit=no_data):
        t1 = time.perf_counter()
        index = measured_rows[stack.index]
        _scatter(results, execute(kernels, kernels.inputs(stack, x[index], y[index], sigma[index]), True), index, len(rows))
        t2 = time.perf_counter()
        stage_time += t1 - t0
        kernel_time += t2 - t1
        done += len(index)
        if progress:
            progress(done, total)
        t0 = time.perf_counter()

    science_results = None
    if difference is not None:
        t1 = time.perf_counter()
        science_results = _science_psf_flux(science, kernels, ra[rows], dec[rows], config, execute)
        kernel_time += time.perf_counter() - t1
        if progress:
            progress(total, total)
    timings["stage"], timings["kernels"] = stage_time, kernel_time

    start = time.perf_counter()
    cd = local_cd_matrix(primary.wcs, x, y) if len(rows) else np.empty((0, 2, 2))
    catalog = build_catalog(
        objects.iloc[rows],
        x + primary.x0,
        y + primary.y0,
        results,
        on_image=measured_mask,
        coord_valid=coord_valid[rows],
        cd_matrix=cd,
        primary=primary,
        science=science if difference is not None else None,
        science_results=science_results,
        apertures_px=config.apertures_px,
    )
    timings["catalog"] = time.perf_counter() - start
    flag_columns = [c for c in catalog.column_names if c.startswith("pixelFlags_")] + ["psfFlux_flag"]
    flagged = np.zeros(catalog.num_rows, bool)
    for column in flag_columns:
        flagged |= catalog[column].to_numpy()
    return Measurement(
        table=catalog,
        n_input=len(objects),
        n_on_detector=len(on),
        n_invalid_coords=int(np.count_nonzero(~coord_valid)),
        n_flagged=int(np.count_nonzero(flagged)),
        backend=f"{backend.name}:{backend.device}",
        timings=timings,
        provenance={
            "software_version": __version__,
            "config": config.model_dump(mode="json"),
            "backend": f"{backend.name}:{backend.device}",
            "exposure": _describe(primary),
            "science": _describe(science) if difference is not None else None,
            "psf": repr(psf),
        },
    )


def _describe(exposure: Exposure) -> dict:
    return {
        "path": exposure.path,
        "visit": exposure.visit,
        "detector": exposure.detector,
        "calibration_source": exposure.calibration_source,
        "variance_estimated": exposure.variance_estimated,
    }
