"""Light curves: the same objects measured on many exposures, one table out.

Each epoch (an exposure, its difference image, its PSF and the objects it covers) is
measured by :func:`~forcedphot.photometry.measure.measure`; the rows of all epochs form
one catalog, sorted by ``diaObjectId`` then ``midpointMjdTai``, with the columns of the
single-exposure catalog.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
import time

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from forcedphot.photometry.backend import Backend
from forcedphot.photometry.catalog import empty_catalog
from forcedphot.photometry.config import MeasurementConfig
from forcedphot.photometry.exposure import Exposure
from forcedphot.photometry.measure import measure
from forcedphot.photometry.psf_models import PsfModel
from forcedphot.photometry.runner import Execute, run_directly

SORT_KEYS = [("diaObjectId", "ascending"), ("midpointMjdTai", "ascending"), ("visit", "ascending"), ("detector", "ascending")]


@dataclass
class Epoch:
    """One exposure to measure: files opened by ``open()`` (a context manager yielding
    ``(science, difference or None)``), the PSF chooser, and the objects it covers."""

    label: str
    open: Callable[[], AbstractContextManager[tuple[Exposure, Exposure | None]]]
    psf: Callable[[Exposure, Exposure | None], tuple[PsfModel, PsfModel]]  # (measured image's, science image's)
    objects: pd.DataFrame


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
    return sort_lightcurves(pa.concat_tables(tables)) if tables else empty_catalog(config.apertures_px)


def _add_timings(total: dict[str, float], timings: dict[str, float]) -> None:
    for stage, seconds in timings.items():
        total[stage] = total.get(stage, 0.0) + seconds


def measure_epochs(epochs: Iterable[Epoch], config: MeasurementConfig, *, backend: Backend | None = None,
                   execute: Execute = run_directly, errors_of: tuple[type[Exception], ...] = (),
                   check: Callable[..., None] | None = None) -> LightCurves:
    """Measure every epoch; an epoch whose files raise one of ``errors_of`` is reported in
    ``errors`` (the others still count), any other error propagates. ``check()`` (a
    deadline, say) is called before each epoch and after each batch of kernels."""
    tables, timings, errors, provenance = [], {"open": 0.0}, [], []
    count = pairs = 0
    for epoch in epochs:
        if check:
            check()
        count += 1
        pairs += len(epoch.objects)
        start = time.perf_counter()
        try:
            with epoch.open() as (science, difference):
                timings["open"] += time.perf_counter() - start
                psf, science_psf = epoch.psf(science, difference)
                result = measure(science, epoch.objects, psf, config, difference=difference, science_psf=science_psf,
                                 backend=backend, execute=execute, progress=check)
        except errors_of as exc:
            errors.append({"exposure": epoch.label, "detail": str(exc)})
            continue
        tables.append(result.table)
        provenance.append({"epoch": epoch.label, "psf": result.provenance["psf"]})
        _add_timings(timings, result.timings)
    return LightCurves(table=_one_table(tables, config), epochs=count, pairs=pairs, timings=timings, errors=errors,
                       provenance={"epochs": provenance})


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

