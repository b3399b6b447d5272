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
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
import json
import os
from pathlib import Path
import time
from typing import Any, Literal
import uuid

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from forcedphot.photometry.config import MeasurementConfig
from forcedphot.serving.allocator import keep_temporaries_on_heap
from forcedphot.serving.executor import EpochInput, LightCurveTask, MeasureService

SCHEDULER_VARIABLE = "FORCEDPHOT_DASK_SCHEDULER"
MANIFEST = "_campaign.json"  # readers of the dataset skip names starting with "_"
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

    def manifest(self) -> dict[str, Any]:
        return {"where": self.where, "epochs": self.epochs, "pairs": self.pairs, "rows": self.rows, "partitions": self.partitions,
                "seconds": round(self.seconds, 3), "errors": self.errors}


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
        folder, name = os.path.split(job.path)
        partial = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.partial")  # hidden: dataset readers skip it
        pq.write_table(result.table, partial)
        os.replace(partial, job.path)
    return {"rows": result.table.num_rows, "errors": result.errors}


def plan_jobs(task: LightCurveTask, output: Path) -> list[EpochJob]:
    """One task per exposure, numbered in the plan's (time) order."""
    return [EpochJob(i, epoch, task.objects.iloc[epoch.rows].reset_index(drop=True), task.config, task.psf_fwhm,
                     str(output / f"part-{i:06d}.parquet")) for i, epoch in enumerate(task.epochs)]


def run_campaign(task: LightCurveTask, output: Path, *, where: Where = "dask", scheduler: str | None = None, workers: int = 2,
                 retries: int = 2, progress: Callable[[int, int], None] | None = None,
                 measure: Callable[[EpochJob], dict[str, Any]] = measure_epoch) -> CampaignReport:
    """Measure ``task`` as a campaign into the dataset folder ``output`` (new or empty).

    ``where="dask"``: on ``scheduler`` (default ``$FORCEDPHOT_DASK_SCHEDULER``), else on a
    LocalCluster of ``workers`` single-threaded processes; ``"local"``: a pool of ``workers``
    processes. ``progress(done, total)`` is called as exposures finish. ``measure`` runs one
    task (a module-level function the workers can import).
    """
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise ValueError(f"campaign output {output} exists and is not empty; give a new folder")
    output.mkdir(parents=True, exist_ok=True)
    jobs = plan_jobs(task, output)
    start = time.perf_counter()
    runner = _on_dask if where == "dask" else _on_processes
    outcomes, description = runner(jobs, measure, scheduler or os.environ.get(SCHEDULER_VARIABLE), workers, retries, progress)
    errors = [e for outcome in outcomes for e in outcome["errors"]]
    report = CampaignReport(output=output, where=description, epochs=len(jobs), pairs=sum(len(j.objects) for j in jobs),
                            rows=sum(o["rows"] for o in outcomes), partitions=sum(1 for o in outcomes if o["rows"]),
                            seconds=time.perf_counter() - start, errors=errors)
    (output / MANIFEST).write_text(json.dumps(report.manifest(), indent=1))
    return report


def _failed(job: EpochJob, tries: int, exc: BaseException) -> dict[str, Any]:
    return {"rows": 0, "errors": [{"exposure": job.label, "detail": f"task {job.number} failed {tries} times: {type(exc).__name__}: {exc}"}]}


def _on_dask(jobs, measure, scheduler, workers, retries, progress) -> tuple[list[dict[str, Any]], str]:
    from distributed import Client, LocalCluster
    from distributed import as_completed as dask_completed

    cluster = None if scheduler else LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
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
    with ProcessPoolExecutor(workers) as pool:
        pending = {pool.submit(measure, job): job for job in jobs}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                job = pending.pop(future)
                exc = future.exception()
                if exc is not None and tries[job.number] <= retries:
                    tries[job.number] += 1
                    pending[pool.submit(measure, job)] = job
                    continue
                outcomes.append(future.result() if exc is None else _failed(job, tries[job.number], exc))
                if progress:
                    progress(len(outcomes), len(jobs))
    return outcomes, f"local, {workers} processes"
