"""Batch jobs: a SQLite (WAL) job store and the threads that run the jobs.

A job is accepted only once its row is committed (with its validated object table written
beside it), so an accepted job survives any crash. Runners *claim* queued jobs
atomically, stamp a heartbeat while they run them, and write the result to disk (a
temporary file renamed into place) before marking them succeeded. A job whose runner
died (heartbeat older than ``stale_seconds``) is queued again by whichever server process
notices first, at start-up or while running; after ``max_attempts`` interrupted runs it
fails instead of looping. Several server processes may share one data directory.

Files: ``<jobs_dir>/jobs.sqlite`` and ``<jobs_dir>/<id>/{objects,result}.parquet``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
import json
import logging
import os
from pathlib import Path
import shutil
import sqlite3
import threading
import time
from typing import Any, Literal
import uuid

import pandas as pd
import pyarrow as pa
from pydantic import BaseModel, Field

from forcedphot.photometry.config import MeasurementConfig
from forcedphot.photometry.exposure import ExposureError
from forcedphot.photometry.formats import encode_catalog
from forcedphot.photometry.objects import InputError
from forcedphot.photometry.psf_models import PsfError
from forcedphot.serving.executor import ExposureInput, MeasureService, MeasureTask

log = logging.getLogger("forcedphot.serving.jobs")

JobState = Literal["queued", "running", "succeeded", "failed"]


class JobProgress(BaseModel):
    exposures_done: int
    exposures_total: int
    fraction: float = Field(description="0 to 1")


class JobError(BaseModel):
    exposure: str = Field(description="the exposure reference that failed")
    detail: str


class JobStatus(BaseModel):
    """A job as stored: state, progress and errors; ``result`` is set once it succeeded."""

    id: str
    state: JobState
    created: str
    started: str | None = None
    finished: str | None = None
    attempts: int = Field(description="runs started (a server death during a run starts another)")
    progress: JobProgress
    errors: list[JobError] = []
    rows: int | None = Field(None, description="rows in the result catalog")
    result: str | None = Field(None, description="URL path of the result catalog")


ACTIVE_STATES = ("queued", "running")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    idempotency_key TEXT UNIQUE,
    fingerprint TEXT NOT NULL,
    state TEXT NOT NULL,
    spec TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    heartbeat REAL,
    owner TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    exposures_done INTEGER NOT NULL DEFAULT 0,
    exposures_total INTEGER NOT NULL,
    fraction REAL NOT NULL DEFAULT 0,
    errors TEXT NOT NULL DEFAULT '[]',
    rows INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created);
"""


class JobLimitReached(Exception):
    """Too many queued and running jobs."""


class IdempotencyConflict(Exception):
    """An Idempotency-Key reused with a different request body."""


@dataclass(frozen=True)
class Job:
    """A job row."""

    id: str
    state: str
    spec: dict[str, Any]
    fingerprint: str
    created: float
    started: float | None
    finished: float | None
    attempts: int
    exposures_done: int
    exposures_total: int
    fraction: float
    errors: list[dict[str, str]]
    rows: int | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        return cls(id=row["id"], state=row["state"], spec=json.loads(row["spec"]), fingerprint=row["fingerprint"],
                   created=row["created"], started=row["started"], finished=row["finished"], attempts=row["attempts"],
                   exposures_done=row["exposures_done"], exposures_total=row["exposures_total"],
                   fraction=row["fraction"], errors=json.loads(row["errors"]), rows=row["rows"])

    def status(self) -> JobStatus:
        """The job as the API shows it."""
        return JobStatus(
            id=self.id, state=self.state, created=_iso(self.created), started=_iso(self.started),
            finished=_iso(self.finished), attempts=self.attempts,
            progress=JobProgress(exposures_done=self.exposures_done, exposures_total=self.exposures_total, fraction=self.fraction),
            errors=[JobError(**e) for e in self.errors], rows=self.rows,
            result=f"/v1/jobs/{self.id}/result" if self.state == "succeeded" else None,
        )


def _iso(epoch: float | None) -> str | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")


class JobStore:
    """Jobs in SQLite (WAL mode); every method opens its own connection (thread and process safe)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "jobs.sqlite"
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA synchronous=FULL")
        return db

    def job_dir(self, job_id: str) -> Path:
        return self.directory / job_id

    def objects_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "objects.parquet"

    def result_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "result.parquet"

    def _one(self, sql: str, *args: Any) -> Job | None:
        db = self._connect()
        try:
            row = db.execute(sql, args).fetchone()
        finally:
            db.close()
        return Job.from_row(row) if row else None

    def _run(self, sql: str, *args: Any) -> int:
        db = self._connect()
        try:
            return db.execute(sql, args).rowcount
        finally:
            db.close()

    def get(self, job_id: str) -> Job | None:
        return self._one("SELECT * FROM jobs WHERE id = ?", job_id)

    def by_key(self, key: str, fingerprint: str) -> Job | None:
        """The job accepted under idempotency ``key``, or None; :class:`IdempotencyConflict`
        when it was accepted for a request with another ``fingerprint``."""
        job = self._one("SELECT * FROM jobs WHERE idempotency_key = ?", key)
        return _same_request(job, fingerprint)

    def count_active(self) -> int:
        db = self._connect()
        try:
            return db.execute("SELECT count(*) FROM jobs WHERE state IN (?, ?)", ACTIVE_STATES).fetchone()[0]
        finally:
            db.close()

    def create(self, *, spec: dict[str, Any], objects: pd.DataFrame, fingerprint: str, key: str | None,
               max_active: int) -> tuple[Job, bool]:
        """Accept a job: ``(job, True)``, or ``(existing, False)`` for a known idempotency key.

        Raises :class:`JobLimitReached` or :class:`IdempotencyConflict`. The object table is
        written before the row is committed, so a committed job always has its inputs.
        """
        job_id = uuid.uuid4().hex
        self.job_dir(job_id).mkdir(parents=True)
        objects.to_parquet(self.objects_path(job_id), index=False)
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            existing = db.execute("SELECT * FROM jobs WHERE idempotency_key = ?", (key,)).fetchone() if key else None
            if existing is None and db.execute("SELECT count(*) FROM jobs WHERE state IN (?, ?)", ACTIVE_STATES).fetchone()[0] >= max_active:
                db.execute("ROLLBACK")
                raise JobLimitReached(f"{max_active} jobs are queued or running already")
            if existing is None:
                db.execute(
                    "INSERT INTO jobs (id, idempotency_key, fingerprint, state, spec, created, exposures_total) "
                    "VALUES (?, ?, ?, 'queued', ?, ?, ?)",
                    (job_id, key, fingerprint, json.dumps(spec), time.time(), len(spec["exposures"])))
            db.execute("COMMIT")
        except BaseException:
            shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
            raise
        finally:
            db.close()
        if existing is not None:
            shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
            return _same_request(Job.from_row(existing), fingerprint), False
        return self.get(job_id), True  # type: ignore[return-value]

    def claim(self, owner: str) -> Job | None:
        """Take the oldest queued job for ``owner`` (atomic across threads and processes)."""
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY created LIMIT 1").fetchone()
            if row is None:
                db.execute("COMMIT")
                return None
            now = time.time()
            db.execute("UPDATE jobs SET state = 'running', owner = ?, heartbeat = ?, started = coalesce(started, ?), "
                       "attempts = attempts + 1 WHERE id = ?", (owner, now, now, row["id"]))
            db.execute("COMMIT")
        finally:
            db.close()
        return self.get(row["id"])

    def beat(self, owner: str) -> None:
        """Mark ``owner``'s running jobs alive."""
        self._run("UPDATE jobs SET heartbeat = ? WHERE state = 'running' AND owner = ?", time.time(), owner)

    def requeue_stale(self, stale_seconds: float, max_attempts: int) -> int:
        """Queue again running jobs whose owner fell silent; fail those out of attempts."""
        limit = time.time() - stale_seconds
        error = json.dumps([{"exposure": "*", "detail": f"the server stopped during each of {max_attempts} runs of this job"}])
        failed = self._run("UPDATE jobs SET state = 'failed', owner = NULL, finished = ?, errors = ? "
                           "WHERE state = 'running' AND heartbeat < ? AND attempts >= ?", time.time(), error, limit, max_attempts)
        queued = self._run("UPDATE jobs SET state = 'queued', owner = NULL WHERE state = 'running' AND heartbeat < ?", limit)
        return failed + queued

    def progress(self, job_id: str, owner: str, done: int, fraction: float) -> None:
        self._run("UPDATE jobs SET exposures_done = ?, fraction = ?, heartbeat = ? WHERE id = ? AND owner = ? AND state = 'running'",
                  done, fraction, time.time(), job_id, owner)

    def finish(self, job_id: str, owner: str, *, state: str, errors: list[dict[str, str]], rows: int | None) -> bool:
        """Record the outcome; False when the job was deleted or taken over meanwhile."""
        return self._run(
            "UPDATE jobs SET state = ?, errors = ?, rows = ?, finished = ?, owner = NULL, "
            "exposures_done = exposures_total, fraction = 1 WHERE id = ? AND owner = ? AND state = 'running'",
            state, json.dumps(errors), rows, time.time(), job_id, owner) == 1

    def release(self, job_id: str, owner: str) -> None:
        """Put back a job interrupted by a clean shutdown (the run does not count as an attempt)."""
        self._run("UPDATE jobs SET state = 'queued', owner = NULL, attempts = attempts - 1 "
                  "WHERE id = ? AND owner = ? AND state = 'running'", job_id, owner)

    def delete(self, job_id: str) -> bool:
        """Forget a job and its files; False if there was no such job."""
        deleted = self._run("DELETE FROM jobs WHERE id = ?", job_id) == 1
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
        return deleted


def _same_request(job: Job | None, fingerprint: str) -> Job | None:
    """``job``, if it was accepted for the request with ``fingerprint``."""
    if job is not None and job.fingerprint != fingerprint:
        raise IdempotencyConflict("this Idempotency-Key was used for a different request")
    return job


def job_spec(exposures: list[tuple[ExposureInput, ExposureInput | None]], config: MeasurementConfig,
             psf_fwhm: float | None) -> dict[str, Any]:
    """What a job runs, as stored JSON: resolved files, measurement config, PSF."""

    def side(source: ExposureInput | None) -> dict[str, str] | None:
        return None if source is None else {"path": str(source.path), "label": source.label}

    return {
        "exposures": [{"science": side(s), "difference": side(d)} for s, d in exposures],
        "config": config.model_dump(mode="json"),
        "psf_fwhm": psf_fwhm,
    }


class _Stop(Exception):
    """The running job must stop: server shutdown or the job was deleted."""


class JobRunner:
    """Threads that claim and run jobs, and one that keeps heartbeats and requeues stale jobs."""

    def __init__(self, store: JobStore, service: MeasureService, *, workers: int, heartbeat_seconds: float,
                 stale_seconds: float, max_attempts: int, on_finished=None):
        self.store, self.service = store, service
        self.workers, self.heartbeat, self.stale, self.max_attempts = workers, heartbeat_seconds, stale_seconds, max_attempts
        self.owner = uuid.uuid4().hex
        self.on_finished = on_finished or (lambda state: None)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._deleted: set[str] = set()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self.store.requeue_stale(self.stale, self.max_attempts)
        self._threads = [threading.Thread(target=self._keep, name="jobs-keeper", daemon=True)]
        self._threads += [threading.Thread(target=self._work, name=f"jobs-{i}", daemon=True) for i in range(self.workers)]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop; a job being run is interrupted and queued again for the next start."""
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout)

    def notify(self) -> None:
        """A job was queued."""
        self._wake.set()

    def deleted(self, job_id: str) -> None:
        """A job was deleted: stop running it."""
        self._deleted.add(job_id)

    def _keep(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                self.store.beat(self.owner)
                if self.store.requeue_stale(self.stale, self.max_attempts):
                    self._wake.set()
            except sqlite3.Error:
                log.exception("job store heartbeat failed")

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                job = self.store.claim(self.owner)
            except sqlite3.Error:
                log.exception("claiming a job failed")
                job = None
            if job is None:
                self._wake.wait(self.heartbeat)
                self._wake.clear()
                continue
            try:
                self._run(job)
            except _Stop:
                if job.id not in self._deleted:
                    self.store.release(job.id, self.owner)
            except Exception:  # a bug must not kill the runner thread
                log.exception("job %s failed", job.id)
                self.store.finish(job.id, self.owner, state="failed", rows=None,
                                  errors=[{"exposure": "*", "detail": "internal error while running the job; it has been logged"}])
            finally:
                self._deleted.discard(job.id)

    def _check(self, job_id: str) -> None:
        if self._stop.is_set() or job_id in self._deleted:
            raise _Stop

    def _run(self, job: Job) -> None:
        spec = job.spec
        config = MeasurementConfig(**spec["config"])
        objects = pd.read_parquet(self.store.objects_path(job.id))
        n = len(spec["exposures"])
        catalogs, provenances, errors = [], [], []
        for i, item in enumerate(spec["exposures"]):
            self._check(job.id)
            science = ExposureInput(Path(item["science"]["path"]), item["science"]["label"])
            difference = ExposureInput(Path(item["difference"]["path"]), item["difference"]["label"]) if item["difference"] else None
            task = MeasureTask(science=science, difference=difference, objects=objects, config=config, psf_fwhm=spec["psf_fwhm"])
            last = [0.0]

            def progress(done: int, total: int, i: int = i) -> None:
                self._check(job.id)
                if time.monotonic() - last[0] > 0.5:
                    last[0] = time.monotonic()
                    self.store.progress(job.id, self.owner, i, (i + done / max(total, 1)) / n)

            try:
                outcome = self.service.run(task, progress)
            except (InputError, ExposureError, PsfError, OSError) as exc:
                errors.append({"exposure": (difference or science).label, "detail": str(exc)})
                continue
            catalogs.append(outcome.measurement.table)
            provenances.append(outcome.measurement.provenance)
            self.store.progress(job.id, self.owner, i + 1, (i + 1) / n)
        self._check(job.id)
        rows = None
        if catalogs:
            catalog = pa.concat_tables(catalogs)
            target = self.store.result_path(job.id)
            partial = target.with_suffix(".partial")
            partial.write_bytes(encode_catalog(catalog, {"job": job.id, "exposures": provenances, "errors": errors}, "parquet"))
            os.replace(partial, target)
            rows = catalog.num_rows
        state = "succeeded" if catalogs else "failed"
        if self.store.finish(job.id, self.owner, state=state, errors=errors, rows=rows):
            self.on_finished(state)
        elif job.id in self._deleted:
            shutil.rmtree(self.store.job_dir(job.id), ignore_errors=True)
