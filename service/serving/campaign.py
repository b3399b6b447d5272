"""Campaigns: light curves of many objects over many exposures, spread over a Dask cluster.

A campaign is a light-curve plan (:func:`~forcedphot.serving.lightcurves.plan_lightcurves`)
cut into one task per exposure: each task opens its exposure once, measures every object
it covers, and writes its rows as one partition of a parquet dataset (``part-NNNNNN.parquet``,
written to a hidden temporary name and renamed, so a retried task replaces it whole). Tasks run on
the Dask scheduler at ``FORCEDPHOT_DASK_SCHEDULER`` (``tcp://host:8786``), else on a
``distributed.LocalCluster`` started for the campaign, or in a local process pool. A task
that raises is retried (``retries`` times) by the cluster; an exposure whose files cannot be
measured, or a task out of retries, is named in the report and in ``_campaign.json`` beside
the partitions, never silently dropped.

An interrupted campaign resumes: the folder holds its plan (``_plan.json``: the objects, the
exposures and the options) and one record per finished task (``_done/NNNNNN.json``), so
running the same campaign into the same folder measures only the exposures not yet done;
a folder holding another campaign, or a finished one, is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
import hashlib
import itertools
import json
import logging
import os
from pathlib import Path
import signal
import time
from typing import Any, Literal
import uuid

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from forcedphot.photometry.config import MeasurementConfig
from forcedphot.photometry.lightcurve_products import with_epoch_columns
from forcedphot.serving.allocator import keep_temporaries_on_heap
from forcedphot.serving.executor import EpochInput, LightCurveTask, MeasureService

SCHEDULER_VARIABLE = "FORCEDPHOT_DASK_SCHEDULER"
MANIFEST = "_campaign.json"  # readers of the dataset skip names starting with "_"
PLAN = "_plan.json"
DONE = "_done"
Where = Literal["dask", "local"]


@dataclass(frozen=True)
class EpochJob:
    """One task: an exposure and the objects it covers, and the partition it writes."""

    number: int
    epoch: EpochInput
    objects: pd.DataFrame = field(repr=False)
    config: MeasurementConfig
    psf_fwhm: float | None
    path: str  # the partition file

    @property
    def label(self) -> str:
        return (self.epoch.difference or self.epoch.science).label

    @property
    def done_path(self) -> str:
        """The record of this task's outcome, written once its partition is in place."""
        folder, _ = os.path.split(self.path)
        return os.path.join(folder, DONE, f"{self.number:06d}.json")


@dataclass
class CampaignReport:
    """What a campaign did."""

    output: Path
    where: str  # "dask <scheduler address>, N workers" or "local, N processes"
    epochs: int
    pairs: int  # (object, exposure) pairs measured or attempted
    rows: int
    partitions: int
    seconds: float
    errors: list[dict[str, str]]  # exposures not measured: exposure, detail
    resumed: int = 0  # exposures found done by an earlier, interrupted run

    def manifest(self) -> dict[str, Any]:
        return {"where": self.where, "epochs": self.epochs, "pairs": self.pairs, "rows": self.rows, "partitions": self.partitions,
                "seconds": round(self.seconds, 3), "resumed": self.resumed, "errors": self.errors}


_SERVICES: dict[str, MeasureService] = {}


def measure_epoch(job: EpochJob) -> dict[str, Any]:
    """Run one task (in a worker): measure the exposure, write its partition; returns
    ``{"rows", "errors"}`` (an exposure that cannot be measured is an error, not a raise)."""
    from forcedphot.photometry.backend import select_backend
    from forcedphot.serving.exposure_cache import ExposureCache

    service = _SERVICES.get(job.config.backend)
    if service is None:  # one per worker process and backend: its file handles stay open between tasks
        keep_temporaries_on_heap()  # as the service's measurement processes do
        service = _SERVICES[job.config.backend] = MeasureService(ExposureCache(0), select_backend(job.config.backend), threads=1)
    epoch = EpochInput(job.epoch.science, job.epoch.difference, np.arange(len(job.objects)))
    result = service.run_lightcurves(LightCurveTask([epoch], job.objects, job.config, job.psf_fwhm))
    if result.table.num_rows:
        rows = with_epoch_columns(result.table)  # magnitudes, limits, epochStatus: per row, so per partition
        _write_whole(job.path, lambda partial: pq.write_table(rows, partial))
    outcome = {"rows": result.table.num_rows, "errors": result.errors}
    _write_whole(job.done_path, lambda partial: Path(partial).write_text(json.dumps(outcome)))
    return outcome


def _write_whole(path: str, write: Callable[[str], None]) -> None:
    """Write ``path`` through a hidden temporary name (dataset readers skip it) renamed into place."""
    folder, name = os.path.split(path)
    partial = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.partial")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def plan_jobs(task: LightCurveTask, output: Path) -> list[EpochJob]:
    """One task per exposure, numbered in the plan's (time) order."""
    return [EpochJob(i, epoch, task.objects.iloc[epoch.rows].reset_index(drop=True), task.config, task.psf_fwhm,
                     str(output / f"part-{i:06d}.parquet")) for i, epoch in enumerate(task.epochs)]


def run_campaign(task: LightCurveTask, output: Path, *, where: Where = "dask", scheduler: str | None = None, workers: int = 2,
                 retries: int = 2, progress: Callable[[int, int], None] | None = None,
                 measure: Callable[[EpochJob], dict[str, Any]] = measure_epoch) -> CampaignReport:
    """Measure ``task`` as a campaign into the dataset folder ``output``: a new or empty
    one, or the folder of the same campaign interrupted earlier (its finished exposures are
    kept, the others measured).

    ``where="dask"``: on ``scheduler`` (default ``$FORCEDPHOT_DASK_SCHEDULER``), else on a
    LocalCluster of ``workers`` single-threaded processes; ``"local"``: a pool of ``workers``
    processes. ``progress(done, total)`` is called as exposures finish. ``measure`` runs one
    task (a module-level function the workers can import). Raises ValueError for a folder
    that holds anything else, KeyboardInterrupt as it comes (what finished stays, see
    :func:`finished_count`).
    """
    output = Path(output)
    jobs = plan_jobs(task, output)
    finished = _prepare(output, _plan_record(task, jobs))
    todo = [job for job in jobs if job.number not in finished]
    start = time.perf_counter()
    outcomes, description = list(finished.values()), "nothing left to measure"
    if todo:
        runner = _on_dask if where == "dask" else _on_processes
        done_before = len(finished)
        report_progress = None if progress is None else (lambda done, total: progress(done_before + done, len(jobs)))
        fresh, description = runner(todo, measure, scheduler or os.environ.get(SCHEDULER_VARIABLE), workers, retries, report_progress)
        outcomes += fresh
    errors = [e for outcome in outcomes for e in outcome["errors"]]
    report = CampaignReport(output=output, where=description, epochs=len(jobs), pairs=sum(len(j.objects) for j in jobs),
                            rows=sum(o["rows"] for o in outcomes), partitions=sum(1 for o in outcomes if o["rows"]),
                            seconds=time.perf_counter() - start, errors=errors, resumed=len(finished))
    (output / MANIFEST).write_text(json.dumps(report.manifest(), indent=1))
    return report


def finished_count(output: Path) -> int:
    """How many exposures of the campaign in ``output`` are done (0 for any other folder)."""
    folder = Path(output) / DONE
    return sum(1 for _ in folder.glob("*.json")) if folder.is_dir() else 0


def _plan_record(task: LightCurveTask, jobs: list[EpochJob]) -> dict[str, Any]:
    """What makes a campaign the same one: its objects, exposures and options."""
    objects = pd.util.hash_pandas_object(task.objects[["diaObjectId", "ra", "dec"]], index=False).to_numpy()
    return {"objects": hashlib.sha256(objects.tobytes()).hexdigest(), "exposures": [job.label for job in jobs],
            "config": repr(task.config), "psf_fwhm": task.psf_fwhm}


def _prepare(output: Path, plan: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Make ``output`` ready: a new campaign's folder, or the interrupted one of the same
    ``plan`` (its unfinished temporary files removed); returns the outcomes of the tasks
    already done, by task number."""
    if not output.exists() or (output.is_dir() and not any(output.iterdir())):
        (output / DONE).mkdir(parents=True, exist_ok=True)
        (output / PLAN).write_text(json.dumps(plan))
        return {}
    if not (output / PLAN).is_file():
        raise ValueError(f"campaign output {output} exists and is not empty; give a new folder")
    if (output / MANIFEST).exists():
        raise ValueError(f"campaign output {output} holds a finished campaign; give a new folder")
    if json.loads((output / PLAN).read_text()) != plan:
        raise ValueError(f"campaign output {output} holds an interrupted campaign of other objects, exposures or options; "
                         "give a new folder, or run that campaign's command to finish it")
    for leftover in [*output.glob(".*.partial"), *(output / DONE).glob(".*.partial")]:
        leftover.unlink(missing_ok=True)
    return {int(record.stem): json.loads(record.read_text()) for record in (output / DONE).glob("*.json")}


def _failed(job: EpochJob, tries: int, exc: BaseException) -> dict[str, Any]:
    return {"rows": 0, "errors": [{"exposure": job.label, "detail": f"task {job.number} failed {tries} times: {type(exc).__name__}: {exc}"}]}


def _on_dask(jobs, measure, scheduler, workers, retries, progress) -> tuple[list[dict[str, Any]], str]:
    from distributed import Client, LocalCluster
    from distributed import as_completed as dask_completed

    cluster = None if scheduler else LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                                                  silence_logs=logging.CRITICAL)  # failures are reported per task; Ctrl-C is not 50 lines
    try:
        with Client(scheduler or cluster) as client:
            n_workers = len(client.scheduler_info()["workers"])
            futures = {client.submit(measure, job, key=f"epoch-{job.number}-{uuid.uuid4().hex[:8]}", retries=retries): job for job in jobs}
            outcomes = []
            for future in dask_completed(list(futures)):
                job = futures[future]
                if future.status == "error":
                    outcomes.append(_failed(job, retries + 1, future.exception()))
                else:
                    outcomes.append(future.result())
                if progress:
                    progress(len(outcomes), len(jobs))
    finally:
        if cluster is not None:
            cluster.close()
    return outcomes, f"dask {scheduler or 'LocalCluster'}, {n_workers} workers"


def _on_processes(jobs, measure, scheduler, workers, retries, progress) -> tuple[list[dict[str, Any]], str]:
    outcomes, tries = [], {job.number: 1 for job in jobs}
    waiting = iter(jobs)
    with ProcessPoolExecutor(workers, initializer=_ignore_interrupts) as pool:
        pending = {pool.submit(measure, job): job for job in itertools.islice(waiting, workers)}  # one task a worker at a time
        try:
            _collect(pool, pending, waiting, measure, tries, retries, outcomes, len(jobs), progress)
        except BaseException:  # Ctrl-C: nothing more starts; the tasks running finish and are kept
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return outcomes, f"local, {workers} processes"


def _ignore_interrupts() -> None:
    """In a pool's worker: Ctrl-C is the parent's to handle (a worker finishes its task)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _collect(pool, pending, waiting, measure, tries, retries, outcomes, total, progress) -> None:
    """Wait for the pool's tasks, resubmitting failed ones while they have retries left and
    starting a waiting one as each finishes."""
    while pending:
        done, _ = wait(pending, return_when=FIRST_COMPLETED)
        for future in done:
            job = pending.pop(future)
            exc = future.exception()
            if exc is not None and tries[job.number] <= retries:
                tries[job.number] += 1
                pending[pool.submit(measure, job)] = job
                continue
            pending.update({pool.submit(measure, following): following for following in itertools.islice(waiting, 1)})
            outcomes.append(future.result() if exc is None else _failed(job, tries[job.number], exc))
            if progress:
                progress(len(outcomes), total)
