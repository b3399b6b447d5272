"""Light curves: the same objects measured on many exposures, one table out.

Each epoch (an exposure, its difference image, its PSF and the objects it covers) is
planned as :func:`~forcedphot.photometry.measure.measure` plans one exposure, and its
cutouts are staged on the host; the kernels then run over the cutouts of all epochs
together, and the rows of all epochs form one catalog, sorted by ``diaObjectId`` then
``midpointMjdTai``, with the columns of the single-exposure catalog.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from forcedphot.kernels.cutouts import Cutouts
from forcedphot.photometry.backend import Backend, select_backend
from forcedphot.photometry.catalog import CatalogRows, catalog_columns, empty_catalog
from forcedphot.photometry.config import MeasurementConfig
from forcedphot.photometry.cutouts import BYTES_PER_BAND_PIXEL, BYTES_PER_STAGED_PIXEL, Windows, no_data_bit, plan_windows, stage_cutouts
from forcedphot.photometry.exposure import Exposure
from forcedphot.photometry.measure import Plan, catalog_table, plan_measurement
from forcedphot.photometry.objects import ObjectArrays
from forcedphot.photometry.psf_models import PsfModel, StackedPsf, describe_psf
from forcedphot.photometry.runner import (
    Execute,
    KernelInputs,
    KernelResults,
    KernelRunner,
    Scope,
    map_arrays,
    run_directly,
    runs_fused,
    scatter,
    unmeasured,
)

SORT_KEYS = [("diaObjectId", "ascending"), ("midpointMjdTai", "ascending"), ("visit", "ascending"), ("detector", "ascending")]


@dataclass
class Epoch:
    """One exposure to measure: files opened by ``open()`` (a context manager yielding
    ``(science, difference or None)``), the PSF chooser, and the (validated) objects it covers."""

    label: str
    open: Callable[[], AbstractContextManager[tuple[Exposure, Exposure | None]]]
    psf: Callable[[Exposure, Exposure | None], tuple[PsfModel, PsfModel]]  # (measured image's, science image's)
    objects: ObjectArrays


@dataclass
class LightCurves:
    """A light-curve catalog and what it took to make it."""

    table: pa.Table
    epochs: int
    pairs: int  # (object, epoch) pairs asked for
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, summed over epochs
    errors: list[dict[str, str]] = field(default_factory=list)  # epochs that failed: label, detail
    provenance: dict = field(default_factory=dict)


def sort_lightcurves(table: pa.Table) -> pa.Table:
    """Rows by object, then time."""
    return table.take(pc.sort_indices(table, sort_keys=SORT_KEYS)) if table.num_rows else table


def _one_table(tables: list[pa.Table], config: MeasurementConfig) -> pa.Table:
    """The rows of ``tables`` as one light-curve table (an empty catalog when there are none)."""
    tables = [t for t in tables if t.num_rows]
    return sort_lightcurves(pa.concat_tables(tables)) if tables else empty_catalog(config)


def _add_timings(total: dict[str, float], timings: dict[str, float]) -> None:
    for stage, seconds in timings.items():
        total[stage] = total.get(stage, 0.0) + seconds


@dataclass
class _Part:
    """One exposure's staged cutouts waiting for a kernel call, and the light-curve rows
    their results belong to."""

    runner: KernelRunner
    inputs: KernelInputs
    scope: Scope  # every measurement, else the PSF flux (and background) of the direct image
    science: bool  # measured on the direct image (scienceFlux), else on the image measured
    rows: np.ndarray  # light-curve rows (the epoch's first row plus its catalog rows)

    @property
    def key(self) -> tuple:
        """Parts with equal keys run in one call."""
        return (self.runner.key, self.inputs.shape_key, self.scope, self.science)


def _stacked(parts: list[_Part]) -> KernelInputs:
    """The inputs of several exposures' parts as one batch: windows, host cutouts, positions
    and PSFs (a :class:`StackedPsf`) concatenated."""
    if len(parts) == 1:
        return parts[0].inputs
    inputs = [p.inputs for p in parts]
    windows = [i.windows for i in inputs]
    joined = Windows(np.arange(sum(len(w) for w in windows)), *(np.concatenate([getattr(w, name) for w in windows])
                                                                for name in ("ix", "iy", "cx", "cy")), windows[0].size)
    pixels = Cutouts(*(np.concatenate(planes) for planes in zip(*(i.pixels for i in inputs))))
    return KernelInputs(joined, pixels, *(np.concatenate([getattr(i, name) for i in inputs]) for name in ("x", "y", "sigma")),
                        StackedPsf([i.psf for i in inputs], [len(i) for i in inputs]))


class _EpochKernels:
    """The kernel work of a light curve's epochs: staged parts run in one call per group of
    equal keys whenever they hold ``max_bytes`` of cutouts, and at the end; each call's
    results are kept with the light-curve rows they belong to."""

    def __init__(self, execute: Execute, max_bytes: int, pixel_bytes: int):
        self.execute, self.max_bytes, self.pixel_bytes = execute, max_bytes, pixel_bytes
        self.parts: list[_Part] = []
        self.bytes = 0
        self.calls: list[tuple[bool, np.ndarray, KernelResults]] = []  # (science, rows, results)
        self.seconds = 0.0

    def _bytes(self, part: _Part) -> int:
        """What ``part``'s staged cutouts hold."""
        return len(part.inputs) * part.inputs.windows.size ** 2 * self.pixel_bytes

    def add(self, part: _Part) -> bool:
        """Queue ``part``; True when that ran the queue."""
        self.parts.append(part)
        self.bytes += self._bytes(part)
        if self.bytes < self.max_bytes:
            return False
        self.run()
        return True

    def run(self) -> None:
        """Run what is queued, one kernel call per group of equal keys."""
        start = time.perf_counter()
        groups: dict[tuple, list[_Part]] = {}
        for part in self.parts:
            groups.setdefault(part.key, []).append(part)
        for group in groups.values():
            results = self.execute(group[0].runner, _stacked(group), group[0].scope)
            self.calls.append((group[0].science, np.concatenate([p.rows for p in group]), results))
        self.parts, self.bytes = [], 0
        self.seconds += time.perf_counter() - start

    def forget(self, first_row: int) -> None:
        """Drop the work of rows from ``first_row`` on (an epoch that failed part way)."""
        self.parts = [p for p in self.parts if p.rows[0] < first_row]
        self.bytes = sum(self._bytes(p) for p in self.parts)
        for i, (science, rows, results) in enumerate(self.calls):
            keep = rows < first_row
            if not keep.all():
                self.calls[i] = (science, rows[keep], map_arrays(lambda a, keep=keep: a[keep], results))

    def results(self, n_rows: int, n_apertures: int, scope: Scope, science_scope: Scope) -> tuple[KernelResults, KernelResults]:
        """Every row's results on the measured images and on the direct images (``scope`` and
        ``science_scope``: the most any call on such an image measured)."""
        primary, science = unmeasured(n_rows, n_apertures, scope), unmeasured(n_rows, n_apertures, science_scope)
        for on_science, rows, results in self.calls:
            scatter(science if on_science else primary, results, rows)
        return primary, science


def _staged(plan: Plan, first_row: int) -> Iterator[_Part]:
    """Host cutouts of the objects of one planned exposure (the measured image, and the
    direct image in difference mode), batch by batch, read while its files are open; its
    rows start at light-curve row ``first_row``."""
    sides = [(plan.primary, plan.kernels, plan.measured, plan.x, plan.y, plan.sigma, plan.size, plan.scope, False)]
    side = plan.science_side
    if side is not None:
        sides.append((plan.science, side.kernels, side.rows, side.x, side.y, side.sigma, side.size, side.scope, True))
    for exposure, runner, rows, x, y, sigma, size, scope, science in sides:
        no_data = no_data_bit(exposure.mask_planes)
        for windows in plan_windows(x[rows], y[rows], size, batch_bytes=plan.config.batch_bytes, band_width=exposure.width):
            index = rows[windows.index]
            inputs = runner.inputs(windows, stage_cutouts(exposure, windows, no_data), x[index], y[index], sigma[index])
            yield _Part(runner, inputs, scope, science, first_row + index)


def measure_epochs(epochs: Iterable[Epoch], config: MeasurementConfig, *, backend: Backend | None = None,
                   execute: Execute = run_directly, errors_of: tuple[type[Exception], ...] = (),
                   check: Callable[..., None] | None = None) -> LightCurves:
    """Measure every epoch as one batch: each epoch's objects are selected and their cutouts
    staged while its files are open, the kernels run over the cutouts of all epochs (one
    call per cutout size and mask layout, whenever the staged cutouts reach the configured
    batch size, and at the end), and one catalog is made of all rows at once.

    An epoch whose files raise one of ``errors_of`` is reported in ``errors`` (the others
    still count), any other error propagates. ``check`` (a deadline, a progress line) is
    called as ``check()`` before each epoch and as ``check(n)`` after each kernel call run
    while epochs are read, ``n`` the epochs begun so far.
    """
    backend = backend or select_backend(config.backend)
    kernels = _EpochKernels(execute, config.batch_bytes, BYTES_PER_BAND_PIXEL if runs_fused(backend, config) else BYTES_PER_STAGED_PIXEL)
    plans: list[tuple[Plan, int]] = []  # each with its first light-curve row
    timings, errors, provenance = {"open": 0.0, "select": 0.0, "stage": 0.0}, [], []
    count = pairs = rows = 0
    for epoch in epochs:
        if check:
            check()
        count += 1
        pairs += len(epoch.objects)
        start, kernel_seconds = time.perf_counter(), kernels.seconds
        try:
            with epoch.open() as (science, difference):
                opened = time.perf_counter()
                psf, science_psf = epoch.psf(science, difference)
                plan = plan_measurement(science, epoch.objects, psf, config, backend, difference=difference, science_psf=science_psf)
                planned = time.perf_counter()
                for part in _staged(plan, rows):
                    if kernels.add(part) and check:
                        check(count)
        except errors_of as exc:
            kernels.forget(rows)
            errors.append({"exposure": epoch.label, "detail": str(exc)})
            continue
        timings["open"] += opened - start
        timings["select"] += planned - opened
        timings["stage"] += time.perf_counter() - planned - (kernels.seconds - kernel_seconds)
        plans.append((plan, rows))
        rows += plan.row_map.n_rows
        provenance.append({"epoch": epoch.label, "psf": describe_psf(psf)})
    kernels.run()
    timings["kernels"] = kernels.seconds
    start = time.perf_counter()
    table = _catalog(plans, kernels, rows, config)
    timings["catalog"] = time.perf_counter() - start
    return LightCurves(table=table, epochs=count, pairs=pairs, timings=timings, errors=errors, provenance={"epochs": provenance})


def _catalog(plans: list[tuple[Plan, int]], kernels: _EpochKernels, n_rows: int, config: MeasurementConfig) -> pa.Table:
    """One sorted table of the ``n_rows`` rows of every measured epoch, made at once."""
    if not n_rows:
        return empty_catalog(config)
    science_scope = max((plan.science_side.scope for plan, _ in plans if plan.science_side is not None), default=Scope.PSF)
    primary, science = kernels.results(n_rows, len(config.apertures_px), max(plan.scope for plan, _ in plans), science_scope)
    for plan, first in plans:
        def rows_of(results: KernelResults, lo=first, hi=first + plan.row_map.n_rows) -> KernelResults:
            return map_arrays(lambda a: a[lo:hi], results)  # views: finishing writes through

        plan.finish(rows_of(primary), rows_of(science) if plan.science_side is not None else None)
    columns = catalog_columns(CatalogRows.concat([plan.rows() for plan, _ in plans]), primary, science_psf=science.psf,
                              apertures_px=config.apertures_px, extra_columns=config.extra_columns, measurements=config.measurements)
    return sort_lightcurves(catalog_table(columns, config))


def merge_lightcurves(parts: list[LightCurves], config: MeasurementConfig) -> LightCurves:
    """One result from the results of disjoint sets of epochs (measured apart)."""
    timings: dict[str, float] = {}
    for part in parts:
        _add_timings(timings, part.timings)
    return LightCurves(
        table=_one_table([p.table for p in parts], config),
        epochs=sum(p.epochs for p in parts), pairs=sum(p.pairs for p in parts), timings=timings,
        errors=[e for p in parts for e in p.errors],
        provenance={"epochs": [e for p in parts for e in p.provenance.get("epochs", [])]},
    )

