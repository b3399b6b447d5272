"""The one place the service calls the engine: a task in, a measurement out, off the event loop.

Requests and jobs both go through :meth:`MeasureService.run`. Requests await
:meth:`MeasureService.measure`, which runs it on a bounded thread pool (the kernels spend
their time in NumPy, which releases the GIL, so the event loop keeps answering). A
batching executor that coalesces concurrent requests is given as ``batcher``: every kernel call then goes through it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .backend import Backend
from .catalog import encode_catalog
from .config import MeasurementConfig
from .batching import KernelBatcher
from .engine import Measurement, measure, run_directly
from .exposure import open_exposure
from .exposure_cache import ExposureCache
from .psf_models import PSF_FWHM_KEYWORD, PsfError, PsfModel, header_fwhm_pixels, load_psf
from .schemas import MAX_PSF_FWHM_PX


@dataclass(frozen=True)
class ExposureInput:
    """A FITS file to measure on; ``label`` is how responses and provenance name it."""

    path: Path
    label: str
    cacheable: bool = True  # repository files are cached; uploads are not


@dataclass(frozen=True)
class MeasureTask:
    """Everything one measurement needs."""

    science: ExposureInput
    objects: pd.DataFrame = field(repr=False)
    config: MeasurementConfig
    difference: ExposureInput | None = None
    psf_fwhm: float | None = None  # pixels; None: the exposure's PSF_FWHM keyword
    psf_path: Path | None = None


@dataclass
class MeasureOutcome:
    """The engine's measurement plus what the service added: read time and cache outcome."""

    measurement: Measurement
    read_seconds: float
    cache: str  # "hit", "miss", "bypass" (uploads, or too large to cache)

    def timings(self) -> dict[str, float]:
        """Seconds per stage: read, then the engine's select, stage, kernels, catalog."""
        return {"read": self.read_seconds, **self.measurement.timings}


def check_psf_fwhm(value: float, source: str) -> float:
    """A usable Gaussian FWHM in pixels, else :class:`PsfError` naming ``source``."""
    if not (math.isfinite(value) and 0 < value <= MAX_PSF_FWHM_PX):
        raise PsfError(f"{source}: PSF FWHM {value!r} px is outside (0, {MAX_PSF_FWHM_PX:g}]")
    return value


def _psf_for(task: MeasureTask, science) -> PsfModel:
    if task.psf_path is not None:
        return load_psf(path=str(task.psf_path))
    if task.psf_fwhm is not None:
        return load_psf(fwhm_pixels=check_psf_fwhm(task.psf_fwhm, "psf_fwhm"))
    value = header_fwhm_pixels(science.header, task.science.label)
    if value is not None:
        return load_psf(fwhm_pixels=check_psf_fwhm(value, f"{task.science.label} {PSF_FWHM_KEYWORD}"))
    raise PsfError(f"{task.science.label}: no PSF given and no {PSF_FWHM_KEYWORD} keyword in its header; send psf_fwhm (pixels)")


class MeasureService:
    """Runs measurements on a shared backend and exposure cache."""

    def __init__(self, cache: ExposureCache, backend: Backend, threads: int, batcher: KernelBatcher | None = None):
        self.cache, self.backend, self.batcher = cache, backend, batcher
        self._execute = batcher.execute if batcher is not None else run_directly
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="measure")

    def _open(self, stack: ExitStack, source: ExposureInput) -> tuple[object, str]:
        if source.cacheable:
            return stack.enter_context(self.cache.lease(source.path))
        return stack.enter_context(open_exposure(source.path)), "bypass"

    def run(self, task: MeasureTask, progress: Callable[[int, int], None] | None = None) -> MeasureOutcome:
        """Measure ``task`` in the calling thread."""
        with ExitStack() as stack:
            start = time.perf_counter()
            science, cache = self._open(stack, task.science)
            difference = self._open(stack, task.difference)[0] if task.difference else None
            read_seconds = time.perf_counter() - start
            psf = _psf_for(task, science)
            result = measure(science, task.objects, psf, task.config, difference=difference,
                             backend=self.backend, progress=progress, execute=self._execute)
        # name inputs by their references, not by server paths
        result.provenance["exposure"]["path"] = (task.difference or task.science).label
        if result.provenance.get("science"):
            result.provenance["science"]["path"] = task.science.label
        return MeasureOutcome(result, read_seconds, cache)

    async def measure(self, task: MeasureTask) -> MeasureOutcome:
        """Measure ``task`` on the thread pool, without blocking the event loop."""
        return await asyncio.wrap_future(self._executor.submit(self.run, task))

    async def encode(self, outcome: MeasureOutcome, fmt: str) -> tuple[bytes, float]:
        """The catalog serialised as ``fmt``, and the seconds it took (on the thread pool)."""

        def work() -> tuple[bytes, float]:
            start = time.perf_counter()
            body = encode_catalog(outcome.measurement.table, outcome.measurement.provenance, fmt)
            return body, time.perf_counter() - start

        return await asyncio.wrap_future(self._executor.submit(work))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self.batcher is not None:
            self.batcher.close()

