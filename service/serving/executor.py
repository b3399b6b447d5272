"""The one place the service calls the engine: a task in, a measurement out, off the event loop.

Requests and jobs both go through :meth:`MeasureService.run`. Requests await
:meth:`MeasureService.measure_encoded`, which measures and encodes the catalog either

* in a bounded thread pool of this process (the kernels spend much of their time in
  NumPy, which releases the GIL, so the event loop keeps answering); a batching executor
  that coalesces concurrent requests is given as ``batcher``: every kernel call then goes
  through it. This is the mode for a GPU: one process owns the device.
* or, with ``processes > 0``, in measurement processes (a pebble ``ProcessPool`` of one
  worker each), each with its own exposure cache (a share of the cache size). A
  request that outlives its time budget, or whose caller cancels it (the client went
  away), has its process terminated and replaced; a process that dies costs only the
  request it was measuring. On a CPU backend this spreads requests over the cores one request at a
  time, whatever connection they came on: uvicorn worker processes instead share
  connections, and a few long-lived keep-alive connections may all land on one worker,
  leaving the other cores idle. A request goes to the process with the fewest requests
  queued; a light curve's epochs go by file, each always to the same process, so the files
  a process has open (:class:`HandleCache`) are the ones it is sent again.

Jobs always run in this process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
import multiprocessing
import multiprocessing.connection
import os
from pathlib import Path
import threading
import time
from typing import TypeVar
import zlib

import numpy as np
import pandas as pd
import pebble
import pyarrow as pa

from forcedphot.photometry.backend import Backend, select_backend
from forcedphot.photometry.config import MeasurementConfig
from forcedphot.photometry.exposure import DEFAULT_LIMITS, ExposureError, ExposureLimits, open_exposure
from forcedphot.photometry.formats import encode_catalog
from forcedphot.photometry.lightcurve import Epoch, LightCurves, measure_epochs, merge_lightcurves
from forcedphot.photometry.measure import Measurement, measure
from forcedphot.photometry.objects import ObjectArrays
from forcedphot.photometry.psf_choice import choose_psfs
from forcedphot.photometry.psf_models import PsfError
from forcedphot.photometry.runner import run_directly
from forcedphot.photometry.warm_up import exercise_measurement
from forcedphot.serving.allocator import keep_temporaries_on_heap
from forcedphot.serving.apdb import ApdbObjects, objects_on, open_apdb, store_forced_sources
from forcedphot.serving.batching import KernelBatcher
from forcedphot.serving.exposure_cache import ExposureCache, HandleCache
from forcedphot.serving.index import footprint_of

T = TypeVar("T")


@dataclass(frozen=True)
class ExposureInput:
    """A file to measure on (or a PSF file); ``label`` is how responses and provenance name it."""

    path: Path
    label: str
    uploaded: bool = False  # a client's file: never cached, and no pickle in it is ever loaded
    summary: str | None = field(default=None, compare=False, repr=False)  # the index's JSON summary: opened without its headers


@dataclass(frozen=True)
class MeasureTask:
    """Everything one measurement needs."""

    science: ExposureInput
    objects: ObjectArrays | ApdbObjects = field(repr=False)  # validated objects, or the APDB's DiaObjects on the exposure
    config: MeasurementConfig
    difference: ExposureInput | None = None
    psf_fwhm: float | None = None  # pixels; None: the exposure's PSF_FWHM keyword
    psf: ExposureInput | None = None  # a PSF file (PSFEx .psf or FITS image); wins over psf_fwhm
    store: str | None = None  # an APDB configuration: store the DiaForcedSources measured there


@dataclass(frozen=True)
class EpochInput:
    """One exposure of a light curve and the rows of the objects it covers."""

    science: ExposureInput
    difference: ExposureInput | None
    rows: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class LightCurveTask:
    """Everything a light curve needs: the objects, the epochs that cover them, how to measure."""

    epochs: list[EpochInput]
    objects: pd.DataFrame = field(repr=False)
    config: MeasurementConfig
    psf_fwhm: float | None = None  # pixels; None: each exposure's PSF_FWHM keyword

    def chunks(self, n: int) -> Iterator[tuple[int, LightCurveTask]]:
        """The epochs shared out into ``n`` tasks by file, each epoch always to the same
        one (a checksum of its science file's path, modulo ``n``): (its number, the task),
        the empty ones left out. Epochs keep their time order within a task."""
        shares: list[list[EpochInput]] = [[] for _ in range(n)]
        for epoch in self.epochs:
            shares[zlib.crc32(os.fsencode(epoch.science.path)) % n].append(epoch)
        return ((i, LightCurveTask(share, self.objects, self.config, self.psf_fwhm)) for i, share in enumerate(shares) if share)


@dataclass
class MeasureOutcome:
    """The engine's measurement plus what the service added: read time and cache outcome."""

    measurement: Measurement
    read_seconds: float
    cache: str  # "hit", "miss", "bypass" (uploads, or too large to cache)
    stored: int | None = None  # DiaForcedSources written to the APDB (None: not asked to store)

    def timings(self) -> dict[str, float]:
        """Seconds per stage: read, then the engine's select, stage, kernels, catalog."""
        return {"read": self.read_seconds, **self.measurement.timings}


class MeasurementProcessDied(RuntimeError):
    """A measurement process exited during a request (killed, or out of memory)."""


class MeasurementTimedOut(RuntimeError):
    """A request outlived its time budget; its measurement process was terminated (or, in
    a thread, it stopped at the next batch)."""


class MeasurementCancelled(RuntimeError):
    """The caller of a measurement in a thread went away; it stopped at the next batch."""


class _Budget:
    """A measurement in a thread: its deadline, and whether its caller went away. Threads
    cannot be killed: :meth:`check` is called between batches of kernels and between
    epochs, and stops the work there."""

    def __init__(self, seconds: float | None, what: str, advice: str):
        self.seconds, self.what, self.advice = seconds, what, advice
        self.deadline = time.monotonic() + seconds if seconds else float("inf")
        self.cancelled = threading.Event()

    def check(self, *progress: int) -> None:
        """Raise if the caller left or the deadline passed (``progress`` is ignored: this
        is also a ``progress(done, total)`` callback)."""
        if self.cancelled.is_set():
            raise MeasurementCancelled(f"{self.what} was cancelled")
        if time.monotonic() > self.deadline:
            raise MeasurementTimedOut(f"{self.what} took longer than the {self.seconds:g} s allowed a request; {self.advice}")


class MeasureService:
    """Runs measurements on a shared backend and exposure cache (or a pool of processes)."""

    def __init__(self, cache: ExposureCache, backend: Backend, threads: int, batcher: KernelBatcher | None = None,
                 processes: int = 0, on_process_cache_event: Callable[[str], None] | None = None,
                 time_limit: float | None = None, limits: ExposureLimits = DEFAULT_LIMITS, memory_map: bool = True):
        """``processes`` > 0 measures requests in that many processes, which share out
        ``cache.max_bytes`` equally for their own caches; ``on_process_cache_event`` is
        told their cache outcomes. ``time_limit`` (seconds) bounds a request measured in a
        process. Jobs use ``cache`` in this process. ``limits`` bound every file opened.
        ``memory_map``: files opened here are read through memory maps (a server process
        passes False: a file truncated under a map kills the process; the measurement
        processes map theirs, a death there costs one request)."""
        self.cache, self.backend, self.batcher, self.limits = cache, backend, batcher, limits
        self.time_limit = time_limit
        self._on_process_cache_event = on_process_cache_event or (lambda outcome: None)
        self._execute = batcher.execute if batcher is not None else run_directly
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="measure")
        self.processes = processes
        self.memory_map = memory_map
        self.handles = HandleCache(limits=limits, memory_map=memory_map)
        self._pools = [pebble.ProcessPool(max_workers=1, initializer=_start_process,
                                          initargs=(backend.name, cache.max_bytes // processes, limits),
                                          context=multiprocessing.get_context("spawn")) for _ in range(processes)]
        self._queued: list[set[Future]] = [set() for _ in range(processes)]  # each process's calls not yet done

    def warm_up(self) -> None:
        """Start every measurement process now (each imports the engine: about a second)."""
        for future in [self._schedule(i, _process_ready, (), None) for i in range(self.processes)]:
            future.result()

    def _schedule(self, process: int | None, function: Callable, args: tuple, timeout: float | None) -> Future:
        """``function(*args)`` queued for measurement process number ``process`` (None: the
        one with the fewest calls queued; ties go to the lowest number)."""
        if process is None:
            process = min(range(self.processes), key=lambda i: len(self._queued[i]))
        future = self._pools[process].schedule(function, args=args, timeout=timeout)
        queued = self._queued[process]
        queued.add(future)
        future.add_done_callback(queued.discard)
        return future

    def _open(self, stack: ExitStack, source: ExposureInput) -> tuple[object, str]:
        if not source.uploaded:
            return stack.enter_context(self.cache.lease(source.path, name=source.label))
        return stack.enter_context(open_exposure(source.path, name=source.label, limits=self.limits, memory_map=self.memory_map)), "bypass"

    def run(self, task: MeasureTask, progress: Callable[[int, int], None] | None = None) -> MeasureOutcome:
        """Measure ``task`` in the calling thread."""
        with ExitStack() as stack:
            start = time.perf_counter()
            science, cache = self._open(stack, task.science)
            difference = self._open(stack, task.difference)[0] if task.difference else None
            read_seconds = time.perf_counter() - start
            psf, science_psf = choose_psfs(science, difference, task.science.label, task.difference.label if task.difference else None,
                                           path=task.psf.path if task.psf else None, path_name=task.psf.label if task.psf else None,
                                           fwhm_pixels=task.psf_fwhm,
                                           allow_pickled=not any(source.uploaded for source in (task.science, task.difference) if source))
            objects = task.objects
            if isinstance(objects, ApdbObjects):
                objects = objects_on(open_apdb(objects.config), footprint_of(difference or science), objects.min_dia_sources)
            result = measure(science, objects, psf, task.config, difference=difference, science_psf=science_psf,
                             backend=self.backend, progress=progress, execute=self._execute)
        # name inputs by their references, not by server paths
        result.provenance["exposure"]["path"] = (task.difference or task.science).label
        if result.provenance.get("science"):
            result.provenance["science"]["path"] = task.science.label
        stored = store_forced_sources(open_apdb(task.store), result.table) if task.store else None
        if isinstance(task.objects, ApdbObjects) or stored is not None:
            result.provenance["apdb"] = {"min_dia_sources": getattr(task.objects, "min_dia_sources", None), "rows_stored": stored}
        return MeasureOutcome(result, read_seconds, cache, stored)

    def run_encoded(self, task: MeasureTask, fmt: str, progress: Callable[[int, int], None] | None = None
                    ) -> tuple[MeasureOutcome, bytes, float]:
        """Measure ``task`` here and serialise its catalog as ``fmt``: (outcome, body, encode seconds)."""
        outcome = self.run(task, progress)
        start = time.perf_counter()
        body = encode_catalog(outcome.measurement.table, outcome.measurement.provenance, fmt)
        return outcome, body, time.perf_counter() - start

    def run_lightcurves(self, task: LightCurveTask, check: Callable[..., None] | None = None) -> LightCurves:
        """Measure every epoch of ``task`` in the calling thread (files through the handle
        cache); epochs whose files cannot be read are reported, not fatal. ``check()`` is
        called before each epoch and ``check(n)`` after each kernel call (see
        :func:`~forcedphot.photometry.lightcurve.measure_epochs`; it may raise to stop the work)."""

        objects = ObjectArrays.of(task.objects)

        def epoch(item: EpochInput) -> Epoch:
            @contextmanager
            def files():
                with ExitStack() as stack:
                    science = stack.enter_context(self.handles.lease(item.science.path, item.science.label, item.science.summary))
                    difference = (stack.enter_context(self.handles.lease(item.difference.path, item.difference.label, item.difference.summary))
                                  if item.difference else None)
                    yield science, difference

            return Epoch(label=(item.difference or item.science).label, open=files, objects=objects.take(item.rows),
                         psf=lambda science, difference: choose_psfs(science, difference, item.science.label,
                                                                     item.difference.label if item.difference else None,
                                                                     fwhm_pixels=task.psf_fwhm))

        return measure_epochs((epoch(item) for item in task.epochs), task.config, backend=self.backend, execute=self._execute,
                              errors_of=(ExposureError, PsfError), check=check)

    async def measure_lightcurves(self, task: LightCurveTask) -> LightCurves:
        """:meth:`run_lightcurves` off the event loop: the epochs shared out over the
        measurement processes (each with its own handles), else on the thread pool."""
        if not self._pools:
            budget = _Budget(self.time_limit, "the light curves", "ask for fewer objects or a shorter time range, or submit a job")
            return await self._in_thread(budget, self.run_lightcurves, task, budget.check)
        parts = await self._in_processes([(i, _run_lightcurves_in_process, (chunk,)) for i, chunk in task.chunks(self.processes)],
                                         "the light curves", "ask for fewer objects or a shorter time range, or submit a job")
        return merge_lightcurves(parts, task.config)

    async def _in_processes(self, calls: list[tuple[int | None, Callable, tuple]], what: str, advice: str,
                            time_limit: float | None = None) -> list:
        """Run ``calls`` (process number or None, function, arguments; see :meth:`_schedule`)
        in the measurement processes, each under the time budget; a call past it is
        :class:`MeasurementTimedOut`, a process that died :class:`MeasurementProcessDied`
        (``what`` and ``advice`` word the message). The calls still running are cancelled
        (their processes terminated) when one fails or the caller is cancelled."""
        limit = time_limit or self.time_limit
        futures = [self._schedule(process, function, args, limit) for process, function, args in calls]
        try:
            return await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        except TimeoutError:
            raise MeasurementTimedOut(f"{what} took longer than the {limit:g} s allowed; {advice}") from None
        except pebble.ProcessExpired:
            raise MeasurementProcessDied("the measurement process exited during the request; retry it") from None
        finally:
            for future in futures:
                future.cancel()

    async def _in_thread(self, budget: _Budget, function: Callable[..., T], *args: object) -> T:
        """``function(*args)`` on the thread pool under ``budget``: the work stops at its next
        check when the deadline passes (:class:`MeasurementTimedOut`) or the awaiting task
        is cancelled (the client went away)."""
        future = self._executor.submit(function, *args)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            budget.cancelled.set()
            raise

    async def call(self, function: Callable[..., T], *args: object, what: str, advice: str, time_limit: float | None = None) -> T:
        """``function(*args)`` (a module-level function: it may be pickled) off the event loop:
        in a measurement process under ``time_limit`` (default: the request time budget),
        else on the thread pool."""
        if not self._pools:
            return await asyncio.wrap_future(self._executor.submit(function, *args))
        (result,) = await self._in_processes([(None, function, args)], what, advice, time_limit)
        return result

    async def measure_encoded(self, task: MeasureTask, fmt: str) -> tuple[MeasureOutcome, bytes, float]:
        """:meth:`run_encoded` off the event loop: in a measurement process, else on the thread pool.

        Cancelling the awaiting task terminates the measurement process (pebble cancels
        a running task that way), so no work outlives a caller that went away.
        """
        if not self._pools:
            budget = _Budget(self.time_limit, "the measurement", "send fewer objects, or submit a job")
            return await self._in_thread(budget, self.run_encoded, task, fmt, budget.check)
        (result,) = await self._in_processes([(None, _run_encoded_in_process, (task, fmt))], "the measurement",
                                             "send fewer objects, or submit a job")
        self._on_process_cache_event(result[0].cache)
        return result

    def close(self, timeout: float = 10.0) -> None:
        """Stop: queued requests are dropped; measurement processes get ``timeout`` seconds
        to finish what they run, then are terminated (none outlives the server)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        for pool in self._pools:
            pool.close()
        deadline = time.monotonic() + timeout
        for pool in self._pools:
            try:
                pool.join(max(deadline - time.monotonic(), 0.0))
            except TimeoutError:  # still measuring: terminated below
                pass
        for pool in self._pools:
            pool.stop()
            pool.join()
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


def _start_process(backend_name: str, cache_bytes: int, limits: ExposureLimits) -> None:
    """Initialise a measurement process: its allocator, backend and exposure cache."""
    global _PROCESS_SERVICE
    threading.Thread(target=_exit_with_parent, name="exit-with-parent", daemon=True).start()
    keep_temporaries_on_heap()
    backend = select_backend(backend_name)
    if backend.name == "numpy":  # the fused CPU kernels, loaded before the first request
        from forcedphot.kernels.fused_cpu import set_threads, warm_up

        # one core per measurement process (there is one process per core): the kernels'
        # threads would otherwise contend with the other processes'
        set_threads(1)
        warm_up()
    exercise_measurement()  # and the libraries' first-use costs paid
    _PROCESS_SERVICE = MeasureService(ExposureCache(cache_bytes, limits=limits, backend=backend), backend, threads=1, limits=limits)


def _process_ready() -> bool:
    return _PROCESS_SERVICE is not None


def _run_lightcurves_in_process(task: LightCurveTask) -> LightCurves:
    return _PROCESS_SERVICE.run_lightcurves(task)


def _run_encoded_in_process(task: MeasureTask, fmt: str) -> tuple[MeasureOutcome, bytes, float]:
    """:meth:`MeasureService.run_encoded` in a measurement process. The catalog travels
    back encoded; its table is replaced by one of no columns (the server process reads only
    the measurement's counts): what crosses the process boundary is the body, and the
    server process unpickles no schema (~0.4 ms of its CPU a request)."""
    outcome, body, encode_seconds = _PROCESS_SERVICE.run_encoded(task, fmt)
    outcome.measurement.table = pa.table({})
    return outcome, body, encode_seconds
