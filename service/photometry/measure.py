"""The measurement engine: one exposure (plus optionally its difference image) and a
DiaObject table in, a DiaForcedSource catalog out.

Data path: select (WCS, Box2D) -> cutout windows in batches -> pixels (staged from row
bands on the host, or gathered from the exposure's planes on a device) -> kernels on the
chosen backend -> host arrays -> catalog. With a difference image, as ``DiaForcedSourceTask``:
every measurement is made on the difference image, and ``scienceFlux`` is the PSF flux
on the direct image at the same sky position. With one exposure, everything is measured
on it and ``scienceFlux`` stays null.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property, partial
from itertools import islice
import time

import numpy as np
import pandas as pd
import pyarrow as pa

from forcedphot.kernels.cutouts import Cutouts
from forcedphot.photometry.backend import Backend, select_backend
from forcedphot.photometry.catalog import CatalogRows, ExposureRows, catalog_columns, table_with_units
from forcedphot.photometry.objects import ObjectArrays
from forcedphot.photometry.config import MeasurementConfig
from forcedphot.photometry.cutouts import (
    BYTES_PER_BAND_PIXEL,
    BYTES_PER_IN_PLACE_OBJECT,
    BYTES_PER_PLANE_PIXEL,
    Band,
    ResidentPlanes,
    Windows,
    no_data_bit,
    plan_windows,
    read_band,
    stage_cutouts,
)
from forcedphot.photometry.exposure import Exposure
from forcedphot.photometry.formats import to_pandas
from forcedphot.photometry.lightcurve_products import with_epoch_columns
from forcedphot.photometry.local_wcs import local_cd_matrix
from forcedphot.photometry.psf_models import PsfModel, describe_psf, gaussian_widths
from forcedphot.photometry.runner import (
    Execute,
    KernelResults,
    KernelRunner,
    Scope,
    cutout_half_size,
    measured_scope,
    psf_scope,
    run_directly,
    runs_fused,
    scatter,
    unmeasured,
)
from forcedphot.photometry.selection import same_wcs, select_on_image, sky_to_pixel
from forcedphot.photometry.sky import subtract_local_background, subtracts_background
from forcedphot.version import __version__

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


@dataclass(frozen=True)
class RowMap:
    """Which input objects become catalog rows, and which of those rows are measured.

    ``rows[i]`` is the input position of catalog row ``i``; ``measured`` lists the catalog
    rows on the detector (the others are flagged offimage or coord_flag, not measured).
    """

    rows: np.ndarray
    measured: np.ndarray

    @property
    def n_rows(self) -> int:
        return len(self.rows)

    def measured_mask(self) -> np.ndarray:
        """(n_rows,) bool: True for measured rows."""
        mask = np.zeros(self.n_rows, bool)
        mask[self.measured] = True
        return mask


def stays_on_device(exposure: Exposure, backend: Backend, n_objects: int, size: int) -> ResidentPlanes | None:
    """The exposure's planes on ``backend``'s device, or None to stage cutouts on the host.

    On NumPy: None (the host's row bands are zero-copy). On a device: the planes already
    there, else copied there when that moves no more bytes than uploading the cutouts
    would (12 bytes per exposure pixel against 13 per cutout pixel), which holds from a
    few hundred objects per detector; fewer objects (a light curve's one cutout per
    exposure) upload their host-staged cutouts.
    """
    if backend.name == "numpy":
        return None
    worth = n_objects * size * size * BYTES_PER_BAND_PIXEL >= exposure.width * exposure.height * BYTES_PER_PLANE_PIXEL
    return exposure.resident_planes(backend, upload=worth)


def batches(exposure: Exposure, backend: Backend, x: np.ndarray, y: np.ndarray, size: int,
            config: MeasurementConfig, psf: PsfModel) -> Iterator[tuple[Windows, Cutouts | ResidentPlanes | Band]]:
    """Cutout windows of objects at local ``(x, y)`` in memory-bounded batches, each with
    its pixels: the exposure's device-resident planes (:func:`stays_on_device`), host
    cutouts staged from bands of rows, or (the fused CPU kernels) the band itself.
    ``psf``: the objects' PSF (its stamps, float64, one an object, unless the fused kernels
    make Gaussian stamps themselves, one at a time)."""
    resident = stays_on_device(exposure, backend, len(x), size)
    if resident is not None:
        for windows in plan_windows(x, y, size, batch_bytes=config.batch_bytes):
            yield windows, resident
        return
    no_data = no_data_bit(exposure.mask_planes)
    if runs_fused(backend, config):
        # windows read in place from the band (those crossing the image's edge padded as they
        # are copied); where reading the band costs nothing (a memory map, or planes in memory)
        # an object costs its PSF stamp and results, else the band counts against the batch too
        if exposure.rows_in_place:
            stamp_bytes = 0 if gaussian_widths(psf) is not None else psf.stamp_size * psf.stamp_size * 8
            plan = plan_windows(x, y, size, batch_bytes=config.batch_bytes, in_place=stamp_bytes + BYTES_PER_IN_PLACE_OBJECT)
        else:
            plan = plan_windows(x, y, size, batch_bytes=config.batch_bytes, band_width=exposure.width, pixel_bytes=BYTES_PER_BAND_PIXEL)
        for windows in plan:
            yield windows, read_band(exposure, windows, no_data)
        return
    for windows in plan_windows(x, y, size, batch_bytes=config.batch_bytes, band_width=exposure.width):
        yield windows, stage_cutouts(exposure, windows, no_data)


@dataclass
class ScienceSide:
    """Where the objects fall on the direct image of a difference-mode measurement, for its
    PSF flux (and, with ``subtract``, its local background)."""

    kernels: KernelRunner
    x: np.ndarray  # (n,) local positions on the direct image, px, per catalog row
    y: np.ndarray
    near: np.ndarray  # (n,) bool: the PSF stamp reaches the image
    rows: np.ndarray  # catalog rows measured (``near``)
    sigma: np.ndarray  # (n,) PSF widths (NaN unless ``subtract``)
    size: int  # cutout side
    subtract: bool

    @property
    def scope(self) -> Scope:
        """What the kernels measure here: the PSF flux, and the local background when it is subtracted."""
        return psf_scope(self.subtract)


def _science_side(science: Exposure, kernels: KernelRunner, x: np.ndarray, y: np.ndarray, config: MeasurementConfig,
                  subtract: bool) -> ScienceSide:
    """The objects at local positions ``(x, y)`` on the direct image (difference mode); rows
    whose PSF stamp does not reach it are left out. ``subtract``: cutouts sized for the local
    background's annulus too."""
    h = kernels.psf.stamp_size // 2
    with np.errstate(invalid="ignore"):
        near = (x > -h - 1) & (x < science.width + h) & (y > -h - 1) & (y < science.height + h)
    rows = np.flatnonzero(near)
    sigma = np.full(len(x), np.nan)
    if subtract:
        sigma[rows] = kernels.psf.sigma(x[rows], y[rows])
    size = 2 * cutout_half_size(kernels.psf, sigma[rows], config, psf_scope(subtract)) + 1
    return ScienceSide(kernels, x, y, near, rows, sigma, size, subtract)


@dataclass
class Plan:
    """One exposure's measurement up to the kernels: which objects become catalog rows,
    where they fall, their PSF widths, the cutout side and the kernels to run; then what
    follows the kernels (:meth:`finish`, :meth:`rows`, :meth:`columns`)."""

    science: Exposure
    difference: Exposure | None
    objects: ObjectArrays
    psf: PsfModel  # the measured image's
    science_psf: PsfModel | None
    config: MeasurementConfig
    backend: Backend
    row_map: RowMap
    x: np.ndarray  # (rows,) local positions on the measured image, px
    y: np.ndarray
    sigma: np.ndarray  # (rows,) PSF determinant radius, px (NaN where not measured)
    invalid_psf: np.ndarray  # (rows,) bool
    measured: np.ndarray  # catalog rows given to the kernels
    kernels: KernelRunner
    scope: Scope  # what the kernels measure (see :func:`~forcedphot.photometry.runner.measured_scope`)
    size: int  # cutout side K
    subtract: bool  # the local background comes off the PSF and aperture fluxes
    science_side: ScienceSide | None
    timings: dict[str, float]

    @property
    def primary(self) -> Exposure:
        """The image measured: the difference image in difference mode."""
        return self.difference if self.difference is not None else self.science

    def finish(self, results: KernelResults, science_results: KernelResults | None) -> None:
        """What follows the kernels, in place on this exposure's rows of the results: the
        local backgrounds subtracted where asked, rows without a usable PSF (or, on the
        direct image, out of its reach) flagged."""
        if self.subtract:
            subtract_local_background(results)
        if self.science_side is not None:
            if self.science_side.subtract:
                subtract_local_background(science_results)
            science_results.psf.flag[~self.science_side.near] = True  # the PSF stamp does not reach the direct image
        results.psf.flag[self.invalid_psf] = True

    def rows(self) -> CatalogRows:
        """This exposure's rows of the catalog, but for the kernels' results."""
        primary, rows = self.primary, self.row_map.rows
        x_parent, y_parent = self.x + primary.x0, self.y + primary.y0
        return CatalogRows(
            self.objects.take(rows), x_parent, y_parent, self.row_map.measured_mask(), self.objects.coord_valid[rows], self.invalid_psf,
            local_cd_matrix(primary.wcs, self.x, self.y) if len(rows) else np.empty((0, 2, 2)),
            ExposureRows.of(primary, self.science if self.difference is not None else None, x_parent, y_parent),
        )

    def unmeasured(self) -> tuple[KernelResults, KernelResults | None]:
        """Results for every catalog row, on the measured image and (difference mode) on the
        direct image, for the kernels to fill."""
        n, n_apertures = self.row_map.n_rows, len(self.config.apertures_px)
        side = self.science_side
        return unmeasured(n, n_apertures, self.scope), unmeasured(n, n_apertures, side.scope) if side is not None else None

    def columns(self, results: KernelResults, science_results: KernelResults | None) -> dict[str, pa.Array | np.ndarray]:
        """The catalog's columns from the kernels' results (:func:`~forcedphot.photometry.catalog.catalog_columns`);
        called once, when every kernel has run (it subtracts the local backgrounds in place)."""
        self.finish(results, science_results)
        science_psf = science_results.psf if science_results is not None else None
        return catalog_columns(self.rows(), results, science_psf=science_psf, apertures_px=self.config.apertures_px,
                               extra_columns=self.config.extra_columns, measurements=self.config.measurements)

    def provenance(self) -> dict:
        """What was measured, how and where."""
        backend, difference = self.backend, self.difference is not None
        return {
            "software_version": __version__,
            "config": self.config.model_dump(mode="json"),
            "backend": f"{backend.name}:{backend.device}",
            "exposure": _describe(self.primary),
            "science": _describe(self.science) if difference else None,
            "psf": describe_psf(self.psf),
            "science_psf": describe_psf(self.science_psf or self.psf) if difference else None,
            "local_background_subtracted": {"exposure": self.subtract,
                                            "science": self.science_side.subtract if self.science_side else None},
        }


def plan_measurement(science: Exposure, objects: ObjectArrays, psf: PsfModel, config: MeasurementConfig, backend: Backend, *,
                     difference: Exposure | None = None, science_psf: PsfModel | None = None) -> Plan:
    """Select the ``objects`` on the measured image (and the direct image, in difference
    mode) and size their cutouts: everything :func:`measure` does before the kernels."""
    primary = difference if difference is not None else science
    start = time.perf_counter()
    ra, dec, coord_valid = objects.ra, objects.dec, objects.coord_valid
    selection = select_on_image(primary.wcs, primary.width, primary.height, ra, dec, coord_valid)
    # rows returned: on the detector, those with unusable coordinates (flagged, so the
    # caller sees them), and on request those off the detector
    returned = selection.on_image | ~coord_valid | config.include_offimage
    rows = np.flatnonzero(returned)
    row_map = RowMap(rows=rows, measured=np.flatnonzero(selection.on_image[rows]))
    measured = row_map.measured
    x, y = selection.x[rows], selection.y[rows]
    sigma = np.full(len(rows), np.nan)
    sigma[measured] = psf.sigma(x[measured], y[measured])
    # as LSST's base_InvalidPsf_flag: no usable PSF model at the position; the row stays, NaN and flagged
    with np.errstate(invalid="ignore"):
        invalid_psf = row_map.measured_mask() & ~(sigma > 0)
    measured = measured[~invalid_psf[measured]]
    subtract = subtracts_background(config.subtract_background, primary.sky_subtracted, difference is not None)
    scope = measured_scope(config, subtract)
    science_side = None
    if difference is not None:
        science_kernels = KernelRunner(backend, science, science_psf or psf, config)  # the direct image's own PSF and masks
        subtract_science = subtracts_background(config.subtract_background, science.sky_subtracted, False)
        # the sky positions on the direct image: the same pixels when it shares the difference image's grid
        sx, sy = (x, y) if same_wcs(science.wcs, primary.wcs) else sky_to_pixel(science.wcs, ra[rows], dec[rows])
        science_side = _science_side(science, science_kernels, sx, sy, config, subtract_science)
    return Plan(
        science=science, difference=difference, objects=objects, psf=psf, science_psf=science_psf, config=config, backend=backend,
        row_map=row_map, x=x, y=y, sigma=sigma, invalid_psf=invalid_psf, measured=measured,
        kernels=KernelRunner(backend, primary, psf, config), scope=scope, size=2 * cutout_half_size(psf, sigma[measured], config, scope) + 1,
        subtract=subtract, science_side=science_side, timings={"select": time.perf_counter() - start},
    )


def measure(
    science: Exposure,
    objects: pd.DataFrame | ObjectArrays,
    psf: PsfModel,
    config: MeasurementConfig | None = None,
    *,
    difference: Exposure | None = None,
    science_psf: PsfModel | None = None,
    backend: Backend | None = None,
    progress: Progress | None = None,
    execute: Execute = run_directly,
) -> Measurement:
    """Forced photometry of ``objects``: a table (validated here unless
    :func:`objects.validate_objects` made it) or their arrays.

    ``psf`` is the PSF of the image measured (the difference image in difference mode);
    ``science_psf`` that of the direct image, for ``scienceFlux`` (default ``psf``); see
    :func:`~forcedphot.photometry.psf_choice.choose_psfs`.
    ``progress(done, total)`` is called after every batch of cutouts, in objects.
    ``execute`` runs the kernels on each batch's inputs; a service may pass one that
    coalesces the batches of concurrent requests into one kernel call.
    """
    config = config or MeasurementConfig()
    backend = backend or select_backend(config.backend)
    arrays = objects if isinstance(objects, ObjectArrays) else ObjectArrays.of(objects)  # a table made in memory: validated as a file's would be
    plan = plan_measurement(science, arrays, psf, config, backend, difference=difference, science_psf=science_psf)
    measured, x, y, sigma = plan.measured, plan.x, plan.y, plan.sigma
    results, science_results = plan.unmeasured()
    done = 0
    def counted(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, len(measured))

    seconds = _run_batches(plan.kernels, plan.scope, execute, results, counted,
                           batches(plan.primary, backend, x[measured], y[measured], plan.size, config, plan.kernels.psf),
                           measured, x, y, sigma)
    side = plan.science_side
    if side is not None:
        rows = side.rows
        seconds += _run_batches(side.kernels, side.scope, execute, science_results, None,
                                batches(science, backend, side.x[rows], side.y[rows], side.size, config, side.kernels.psf),
                                rows, side.x, side.y, side.sigma)
    timings = {**plan.timings, "stage": float(seconds[0]), "kernels": float(seconds[1])}

    start = time.perf_counter()
    columns = plan.columns(results, science_results)
    catalog = catalog_table(columns, config)
    timings["catalog"] = time.perf_counter() - start
    return Measurement(
        table=catalog,
        n_input=len(objects),
        n_on_detector=len(plan.row_map.measured),
        n_invalid_coords=int(np.count_nonzero(~arrays.coord_valid)),
        n_flagged=count_flagged(columns),
        backend=f"{backend.name}:{backend.device}",
        timings=timings,
        provenance=plan.provenance(),
    )


def _run_batches(kernels: KernelRunner, scope: Scope, execute: Execute, into: KernelResults, counted: Callable[[int], None] | None,
                 work: Iterator[tuple[Windows, Cutouts | ResidentPlanes | Band]], rows: np.ndarray, x: np.ndarray, y: np.ndarray,
                 sigma: np.ndarray) -> np.ndarray:
    """The kernels of ``scope`` on each batch of ``work`` (windows of the objects at
    ``rows``), their results written at those rows of ``into``; ``counted(n)`` after each
    batch of ``n`` objects. Returns the seconds spent making the batches (staging) and
    running the kernels on them.

    The fused CPU kernels called directly run as many batches at once as they have threads
    (:func:`~forcedphot.kernels.fused_cpu.alongside`): a batch's host work (its PSF stamps,
    the kernel's arguments) then overlaps another's compiled loop instead of leaving the
    other cores idle, which made small batches slow. Other executors get one batch at a time.
    """
    group = 1
    if execute is run_directly and kernels.fused:
        from forcedphot.kernels.fused_cpu import alongside, threads

        group = threads()
    seconds = np.zeros(2)
    while True:
        start = time.perf_counter()
        chunk = list(islice(work, group))
        staged = time.perf_counter()
        seconds[0] += staged - start
        if not chunk:
            return seconds
        calls, indices = [], []
        for windows, pixels in chunk:
            index = rows[windows.index]
            calls.append(partial(execute, kernels, kernels.inputs(windows, pixels, x[index], y[index], sigma[index]), scope))
            indices.append(index)
        for index, batch in zip(indices, alongside(calls) if group > 1 else [calls[0]()]):
            scatter(into, batch, index)
            if counted:
                counted(len(index))
        seconds[1] += time.perf_counter() - staged


def catalog_table(columns: dict[str, pa.Array | np.ndarray], config: MeasurementConfig) -> pa.Table:
    """The catalog of ``columns`` (:func:`~forcedphot.photometry.catalog.catalog_columns`),
    with units; with ``extra_columns``, the magnitudes, limits and epochStatus every light
    curve has."""
    catalog = table_with_units(columns)
    return with_epoch_columns(catalog) if config.extra_columns else catalog


def count_flagged(columns: dict[str, pa.Array | np.ndarray]) -> int:
    """Rows with any pixel flag or a failed PSF fit, of a catalog's ``columns`` (its flags
    are NumPy arrays: read before they become Arrow's bits)."""
    flags = [values for name, values in columns.items() if name.startswith("pixelFlags_") or name == "psfFlux_flag"]
    return int(np.count_nonzero(np.logical_or.reduce(flags)))


def _describe(exposure: Exposure) -> dict:
    return {
        "path": exposure.path,
        "visit": exposure.visit,
        "detector": exposure.detector,
        "calibration_source": exposure.calibration_source,
        "variance_estimated": exposure.variance_estimated,
    }
