"""Batch jobs: what a job runs, and the threads that run the jobs of a store
(:mod:`forcedphot.serving.job_store`).

Runners *claim* queued jobs atomically, stamp a heartbeat while they run them, and write
the result to disk (a temporary file renamed into place) before marking them succeeded.
A job whose runner died (heartbeat older than ``stale_seconds``) is queued again by
whichever server process or replica notices first, at start-up or while running; after
``max_attempts`` interrupted runs it fails instead of looping.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
import shutil
import threading
import time
from typing import Any
import uuid

import numpy as np
import pandas as pd

from forcedphot.photometry.catalog_files import merge_parts, write_part
from forcedphot.photometry.config import MeasurementConfig
from forcedphot.photometry.exposure import ExposureError
from forcedphot.photometry.lightcurve_products import Products
from forcedphot.photometry.objects import InputError, ObjectArrays
from forcedphot.photometry.psf_models import PsfError
from forcedphot.serving.apdb import ApdbUnavailable, open_apdb, store_forced_sources
from forcedphot.serving.campaign import run_campaign
from forcedphot.serving.executor import EpochInput, ExposureInput, LightCurveTask, MeasureService, MeasureTask
from forcedphot.serving.job_store import STORE_ERRORS, Job, JobStore, store_error_reason

log = logging.getLogger("forcedphot.serving.jobs")

def job_spec(exposures: list[tuple[ExposureInput, ExposureInput | None, ExposureInput | None]], config: MeasurementConfig,
             psf_fwhm: float | None, order: str = "exposure", products: Products | None = None) -> dict[str, Any]:
    """What a job runs, as stored JSON: resolved files, measurement config, PSF, the order
    of the result's rows ("exposure": as measured; "lightcurve": by object, then time) and,
    for light curves, the products made of them (baseline, bins; see
    :mod:`~forcedphot.photometry.lightcurve_products`)."""

    def side(source: ExposureInput | None) -> dict[str, str] | None:
        return None if source is None else {"path": str(source.path), "label": source.label}

    return {
        "exposures": [{"science": side(s), "difference": side(d), "psf": side(p)} for s, d, p in exposures],
        "config": config.model_dump(mode="json"),
        "psf_fwhm": psf_fwhm,
        "order": order,
        "products": None if products is None else products.to_json(),
    }


class _Stop(Exception):
    """The running job must stop: server shutdown, the job was deleted, or its run lost
    the claim (re-queued while this server could not reach the store, then taken over)."""


class JobRunner:
    """Threads that claim and run jobs, and one that keeps heartbeats and requeues stale jobs.

    Store errors (a full disk, a read-only database) never end a thread: each store call
    is retried with exponential backoff while the runner runs. A job is heartbeaten only
    while its work progresses, so a run stuck for ``stale_seconds`` is re-queued like one
    whose server died.
    """

    def __init__(self, store: JobStore, service: MeasureService, *, workers: int, heartbeat_seconds: float,
                 stale_seconds: float, max_attempts: int, on_finished=None, max_backoff_seconds: float = 30.0,
                 dask_scheduler: str | None = None):
        """``dask_scheduler``: the address of a Dask scheduler that light-curve jobs run on
        as campaigns (one task per exposure); None: every job runs in this process."""
        self.store, self.service = store, service
        self.dask_scheduler = dask_scheduler
        self.workers, self.heartbeat, self.stale, self.max_attempts = workers, heartbeat_seconds, stale_seconds, max_attempts
        self.max_backoff = max_backoff_seconds
        self.owner = uuid.uuid4().hex
        self.on_finished = on_finished or (lambda state: None)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._deleted: set[str] = set()
        self._lost: set[str] = set()  # jobs whose run here lost its claim: they stop and write nothing
        self._progressed: dict[str, float] = {}  # job id -> monotonic time of its last progress
        self._attempts: dict[str, int] = {}  # job id -> the attempt this runner runs
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        removed = self._retrying("removing partial results", self.store.remove_partials)
        if removed:
            log.info("removed %d partial job results left by an earlier run", removed)
        self._retrying("re-queueing stale jobs", self.store.requeue_stale, self.stale, self.max_attempts)
        self._threads = [threading.Thread(target=self._keep, name="jobs-keeper", daemon=True)]
        self._threads += [threading.Thread(target=self._work, name=f"jobs-{i}", daemon=True) for i in range(self.workers)]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop; a job being run is interrupted and queued again for the next start."""
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def alive(self) -> bool:
        """Every runner thread is running (false before start and after stop)."""
        return bool(self._threads) and all(thread.is_alive() for thread in self._threads)

    def notify(self) -> None:
        """A job was queued."""
        self._wake.set()

    def deleted(self, job_id: str) -> None:
        """A job was deleted: stop running it."""
        self._deleted.add(job_id)

    def _retrying(self, what: str, call, *args, **kwargs):
        """``call(*args, **kwargs)``, retried with exponential backoff on store errors
        until it succeeds or the runner stops (then the last error is raised)."""
        delay = 0.1
        while True:
            try:
                return call(*args, **kwargs)
            except STORE_ERRORS as exc:
                if self._stop.is_set():
                    raise
                log.warning("job store: %s failed (%s); retrying in %.1f s", what, store_error_reason(exc), delay)
                self._stop.wait(delay)
                delay = min(2 * delay, self.max_backoff)

    def _progress_made(self, job_id: str) -> None:
        self._progressed[job_id] = time.monotonic()

    def _keep(self) -> None:
        while not self._stop.wait(self.heartbeat):
            recent = time.monotonic() - self.stale
            progressing = {job_id: self._attempts[job_id] for job_id, at in list(self._progressed.items())
                           if at > recent and job_id in self._attempts}
            try:
                self._lost.update(self.store.beat(self.owner, progressing))
                if self.store.requeue_stale(self.stale, self.max_attempts):
                    self._wake.set()
            except STORE_ERRORS as exc:
                log.warning("job store heartbeat failed: %s", store_error_reason(exc))

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._retrying("claiming a job", self.store.claim, self.owner)
            except STORE_ERRORS:  # stopping
                return
            if job is None:
                self._wake.wait(self.heartbeat)
                self._wake.clear()
                continue
            self._attempts[job.id] = job.attempts
            self._progress_made(job.id)
            try:
                self._run(job)
            except _Stop:
                self._remove_run_files(job)
                if job.id not in self._deleted and job.id not in self._lost:
                    self._finally("releasing a job", self.store.release, job.id, self.owner)
            except Exception as exc:  # a bug or a store fault must not kill the runner thread
                self._fail(job, exc)
            finally:
                self._progressed.pop(job.id, None)
                self._attempts.pop(job.id, None)
                self._deleted.discard(job.id)
                self._lost.discard(job.id)

    def _finally(self, what: str, call, *args, **kwargs):
        """A store call that must happen; given up only when the runner stops (the job is
        then re-queued as stale by whichever server notices)."""
        try:
            return self._retrying(what, call, *args, **kwargs)
        except STORE_ERRORS as exc:
            log.warning("job store: %s given up at shutdown: %s", what, store_error_reason(exc))
            return None

    def _remove_run_files(self, job: Job, result: bool = False) -> None:
        """Delete what this run wrote: its parts and partial result (and its result)."""
        shutil.rmtree(self.store.parts_dir(job.id, job.attempts), ignore_errors=True)
        self.store.partial_path(job.id, job.attempts).unlink(missing_ok=True)
        if result:
            self.store.result_path(job.id, job.attempts).unlink(missing_ok=True)

    def _fail(self, job: Job, exc: Exception) -> None:
        self._remove_run_files(job, result=True)
        if isinstance(exc, STORE_ERRORS):
            detail = f"the job store could not keep the result: {store_error_reason(exc)}"
            log.warning("job %s failed: %s", job.id, detail)
        else:
            detail = "internal error while running the job; it has been logged"
            log.exception("job %s failed", job.id)
        if self._finally("recording a failed job", self.store.finish, job.id, self.owner, job.attempts, state="failed", rows=None,
                         errors=[{"exposure": "*", "detail": detail}]):
            self.on_finished("failed")

    def _check(self, job_id: str) -> None:
        if self._stop.is_set() or job_id in self._deleted or job_id in self._lost:
            raise _Stop

    def _record_progress(self, job: Job, done: int, fraction: float, *, retry: bool) -> None:
        """Record progress (``retry``: until the store takes it); a run that lost its claim stops."""
        try:
            held = (self._retrying("recording progress", self.store.progress, job.id, self.owner, job.attempts, done, fraction)
                    if retry else self.store.progress(job.id, self.owner, job.attempts, done, fraction))
        except STORE_ERRORS as exc:  # progress within an exposure is for display only
            log.warning("job store: recording progress failed: %s", store_error_reason(exc))
            return
        if not held:
            self._lost.add(job.id)
            raise _Stop

    def _measure_here(self, job: Job, objects: pd.DataFrame, config: MeasurementConfig, parts: Path) -> tuple[list, list, list]:
        """Every exposure of the job in this process, one after the other, each catalog
        written to ``parts`` as it comes: (part files, provenances, errors)."""
        spec = job.spec
        n = len(spec["exposures"])
        written, provenances, errors = [], [], []
        arrays = ObjectArrays.of(objects)
        for i, item in enumerate(spec["exposures"]):
            self._check(job.id)
            science, difference = _input(item["science"]), _input(item["difference"])
            task = MeasureTask(science=science, difference=difference, objects=arrays, config=config, psf_fwhm=spec["psf_fwhm"],
                               psf=_input(item.get("psf")))
            last = [0.0]

            def progress(done: int, total: int, i: int = i) -> None:
                self._check(job.id)
                self._progress_made(job.id)
                if time.monotonic() - last[0] > 0.5:
                    last[0] = time.monotonic()
                    self._record_progress(job, i, (i + done / max(total, 1)) / n, retry=False)

            try:
                outcome = self.service.run(task, progress)
            except (InputError, ExposureError, PsfError, OSError) as exc:
                errors.append({"exposure": (difference or science).label, "detail": str(exc)})
                continue
            if outcome.measurement.table.num_rows:
                written.append(write_part(outcome.measurement.table, parts / f"part-{i:06d}.parquet"))
            if spec.get("store"):  # the measurement is kept whether or not the APDB takes it
                try:
                    stored = store_forced_sources(open_apdb(spec["store"]), outcome.measurement.table)
                    outcome.measurement.provenance["apdb"] = {"rows_stored": stored}
                except (ApdbUnavailable, InputError) as exc:
                    errors.append({"exposure": (difference or science).label, "detail": f"measured, but not stored in the APDB: {exc}"})
            provenances.append(outcome.measurement.provenance)
            self._progress_made(job.id)
            self._record_progress(job, i + 1, (i + 1) / n, retry=True)
        return written, provenances, errors

    def _measure_on_dask(self, job: Job, objects: pd.DataFrame, config: MeasurementConfig, parts: Path) -> tuple[list, list, list]:
        """A light-curve job as a campaign on the Dask scheduler: one task per exposure,
        its partitions written to ``parts``, progress as exposures finish."""
        spec = job.spec
        every = np.arange(len(objects))  # each exposure measures the objects it covers
        epochs = [EpochInput(_input(item["science"]), _input(item["difference"]), every) for item in spec["exposures"]]
        folder = parts / "dataset"

        def progress(done: int, total: int) -> None:
            self._check(job.id)
            self._progress_made(job.id)
            self._record_progress(job, done, done / max(total, 1), retry=False)

        report = run_campaign(LightCurveTask(epochs, objects, config, spec["psf_fwhm"]), folder, where="dask",
                              scheduler=self.dask_scheduler, progress=progress)
        written = sorted(folder.glob("*.parquet")) if report.rows else []
        return written, [{"campaign": report.manifest()}], report.errors

    def _run(self, job: Job) -> None:
        """Run ``job``: each exposure's catalog written as a part, the parts merged on disk
        into this run's result, the outcome recorded only while this run holds the claim."""
        spec = job.spec
        config = MeasurementConfig(**spec["config"])
        objects = pd.read_parquet(self.store.objects_path(job.id))
        on_dask = self.dask_scheduler is not None and spec.get("order") == "lightcurve" and not any(i.get("psf") for i in spec["exposures"])
        measure_all = self._measure_on_dask if on_dask else self._measure_here
        parts = self.store.parts_dir(job.id, job.attempts)
        shutil.rmtree(parts, ignore_errors=True)  # a rerun of this attempt starts afresh
        parts.mkdir(parents=True)
        written, provenances, errors = measure_all(job, objects, config, parts)
        self._check(job.id)
        rows = None
        if written:
            partial = self.store.partial_path(job.id, job.attempts)
            products = Products.from_json(spec["products"]) if spec.get("products") else None
            rows = merge_parts(written, partial, {"job": job.id, "exposures": provenances, "errors": errors},
                               lightcurve=spec.get("order") == "lightcurve", products=products)
            os.replace(partial, self.store.result_path(job.id, job.attempts))
        shutil.rmtree(parts, ignore_errors=True)
        self._check(job.id)
        state = "succeeded" if written else "failed"
        if self._finally("recording a finished job", self.store.finish, job.id, self.owner, job.attempts, state=state, errors=errors, rows=rows):
            self.on_finished(state)
        elif job.id in self._deleted:
            shutil.rmtree(self.store.job_dir(job.id), ignore_errors=True)
        else:  # the claim was lost meanwhile: the run that took over writes the result
            self._remove_run_files(job, result=True)


def _input(side: dict[str, str] | None) -> ExposureInput | None:
    """An exposure of a stored job spec (see :func:`job_spec`)."""
    return None if side is None else ExposureInput(Path(side["path"]), side["label"])
