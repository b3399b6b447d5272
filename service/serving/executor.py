"""The one place the service calls the engine: a task in, a measurement out, off the event loop.

Requests and jobs both go through :meth:`MeasureService.run`. Requests await
:meth:`MeasureService.measure_encoded`, which measures and encodes the catalog either

* in a bounded thread pool of this process (the kernels spend much of their time in
  NumPy, which releases the GIL, so the event loop keeps answering); a batching executor
  that coalesces concurrent requests is given as ``batcher``: every kernel call then goes
  through it. This is the mode for a GPU: one process owns the device.
* or, with ``processes > 0``, in a pool of measurement processes, each with its own
  exposure cache (a share of the cache size). On a CPU backend this spreads requests over the cores one request at a
  time, whatever connection they came on: uvicorn worker processes instead share
  connections, and a few long-lived keep-alive connections may all land on one worker,
  leaving the other cores idle.

Jobs always run in this process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack
from dataclasses import dataclass, field
import multiprocessing
import multiprocessing.connection
import os
from pathlib import Path
import threading
import time

import pandas as pd

from forcedphot.photometry.backend import Backend, select_backend
from forcedphot.photometry.config import MeasurementConfig
from forcedphot.photometry.exposure import open_exposure
from forcedphot.photometry.formats import encode_catalog
from forcedphot.photometry.measure import Measurement, measure
from forcedphot.photometry.psf_models import choose_psf
from forcedphot.photometry.runner import run_directly
from forcedphot.serving.allocator import keep_temporaries_on_heap
from forcedphot.serving.batching import KernelBatcher
from forcedphot.serving.exposure_cache import ExposureCache


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


class MeasurementProcessDied(RuntimeError):
    """A measurement process exited during a request (killed, or out of memory)."""


class MeasureService:
    """Runs measurements on a shared backend and exposure cache (or a pool of processes)."""

    def __init__(self, cache: ExposureCache, backend: Backend, threads: int, batcher: KernelBatcher | None = None,
                 processes: int = 0, on_process_cache_event: Callable[[str], None] | None = None):
        """``processes`` > 0 measures requests in that many processes, which share out
        ``cache.max_bytes`` equally for their own caches; ``on_process_cache_event`` is
        told their cache outcomes. Jobs use ``cache`` in this process."""
        self.cache, self.backend, self.batcher = cache, backend, batcher
        self._on_process_cache_event = on_process_cache_event or (lambda outcome: None)
        self._execute = batcher.execute if batcher is not None else run_directly
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="measure")
        self.processes = processes
        self._pool = self._new_pool() if processes else None

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_start_process, initargs=(self.backend.name, self.cache.max_bytes // self.processes))

    def warm_up(self) -> None:
        """Start every measurement process now (each imports the engine: about a second)."""
        if self._pool is not None:
            for future in [self._pool.submit(_process_ready) for _ in range(self.processes)]:
                future.result()

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
            psf = choose_psf(science.header, task.science.label, path=task.psf_path, fwhm_pixels=task.psf_fwhm)
            result = measure(science, task.objects, psf, task.config, difference=difference,
                             backend=self.backend, progress=progress, execute=self._execute)
        # name inputs by their references, not by server paths
        result.provenance["exposure"]["path"] = (task.difference or task.science).label
        if result.provenance.get("science"):
            result.provenance["science"]["path"] = task.science.label
        return MeasureOutcome(result, read_seconds, cache)

    def run_encoded(self, task: MeasureTask, fmt: str) -> tuple[MeasureOutcome, bytes, float]:
        """Measure ``task`` here and serialise its catalog as ``fmt``: (outcome, body, encode seconds)."""
        outcome = self.run(task)
        start = time.perf_counter()
        body = encode_catalog(outcome.measurement.table, outcome.measurement.provenance, fmt)
        return outcome, body, time.perf_counter() - start

    async def measure_encoded(self, task: MeasureTask, fmt: str) -> tuple[MeasureOutcome, bytes, float]:
        """:meth:`run_encoded` off the event loop: in a measurement process, else on the thread pool."""
        if self._pool is None:
            return await asyncio.wrap_future(self._executor.submit(self.run_encoded, task, fmt))
        pool = self._pool
        try:
            result = await asyncio.wrap_future(pool.submit(_run_encoded_in_process, task, fmt))
        except BrokenProcessPool:
            if self._pool is pool:  # the first request to notice replaces the pool
                self._pool = self._new_pool()
            raise MeasurementProcessDied("a measurement process exited during the request; retry it") from None
        self._on_process_cache_event(result[0].cache)
        return result

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._pool is not None:  # waits for running measurements (milliseconds), so no process outlives the server
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self.batcher is not None:
            self.batcher.close()


_PROCESS_SERVICE: MeasureService | None = None  # the service of a measurement process


def _exit_with_parent() -> None:
    """End this process when the server process ends, however it ends (even SIGKILL):
    a measurement process waits on a queue it holds both ends of, so it would never
    notice on its own."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(0)


def _start_process(backend_name: str, cache_bytes: int) -> None:
    """Initialise a measurement process: its allocator, backend and exposure cache."""
    global _PROCESS_SERVICE
    threading.Thread(target=_exit_with_parent, name="exit-with-parent", daemon=True).start()
    keep_temporaries_on_heap()
    _PROCESS_SERVICE = MeasureService(ExposureCache(cache_bytes), select_backend(backend_name), threads=1)


def _process_ready() -> bool:
    return _PROCESS_SERVICE is not None


def _run_encoded_in_process(task: MeasureTask, fmt: str) -> tuple[MeasureOutcome, bytes, float]:
    """:meth:`MeasureService.run_encoded` in a measurement process. The catalog travels
    back encoded; its table is replaced by an empty one of the same schema, which halves
    what crosses the process boundary (and the server process's unpickling work)."""
    outcome, body, encode_seconds = _PROCESS_SERVICE.run_encoded(task, fmt)
    outcome.measurement.table = outcome.measurement.table.schema.empty_table()
    return outcome, body, encode_seconds
