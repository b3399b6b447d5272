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
from forcedphot.photometry.lightcurve import sort_lightcurves
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
PARTIAL_RESULT = "result.partial"
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
    rows INTEGER,
    client TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created);
CREATE TABLE IF NOT EXISTS probe (id INTEGER PRIMARY KEY, at REAL);
"""
STORE_ERRORS = (sqlite3.Error, OSError)  # what a full, read-only or damaged store raises


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
            if "client" not in {row[1] for row in db.execute("PRAGMA table_info(jobs)")}:  # stores made before it
                db.execute("ALTER TABLE jobs ADD COLUMN client TEXT")

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

    def partial_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / PARTIAL_RESULT

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

    def of_client(self, client: str, *, limit: int, offset: int) -> list[Job]:
        """``client``'s jobs, newest first: ``limit`` of them from ``offset``."""
        db = self._connect()
        try:
            rows = db.execute("SELECT * FROM jobs WHERE client = ? ORDER BY created DESC, id LIMIT ? OFFSET ?",
                              (client, limit, offset)).fetchall()
        finally:
            db.close()
        return [Job.from_row(row) for row in rows]

    def count_active(self) -> int:
        db = self._connect()
        try:
            return db.execute("SELECT count(*) FROM jobs WHERE state IN (?, ?)", ACTIVE_STATES).fetchone()[0]
        finally:
            db.close()

    def create(self, *, spec: dict[str, Any], objects: pd.DataFrame, fingerprint: str, key: str | None,
               max_active: int, client: str | None = None) -> tuple[Job, bool]:
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
                    "INSERT INTO jobs (id, idempotency_key, fingerprint, state, spec, created, exposures_total, client) "
                    "VALUES (?, ?, ?, 'queued', ?, ?, ?, ?)",
                    (job_id, key, fingerprint, json.dumps(spec), time.time(), len(spec["exposures"]), client))
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

    def beat(self, owner: str, job_ids: list[str]) -> None:
        """Mark these running jobs of ``owner`` alive (those whose work progresses)."""
        for job_id in job_ids:
            self._run("UPDATE jobs SET heartbeat = ? WHERE id = ? AND state = 'running' AND owner = ?", time.time(), job_id, owner)

    def probe_write(self) -> None:
        """Write to the database and to the directory, as jobs do; raises (sqlite3 or OS
        error) when the store cannot take work: disk full, read-only, corrupt."""
        self._run("INSERT OR REPLACE INTO probe (id, at) VALUES (1, ?)", time.time())
        probe = self.directory / ".write-probe"
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()

    def remove_partials(self) -> int:
        """Delete result files left half-written by a run that failed or died."""
        partials = list(self.directory.glob(f"*/{PARTIAL_RESULT}"))
        for partial in partials:
            partial.unlink(missing_ok=True)
        return len(partials)

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


def job_spec(exposures: list[tuple[ExposureInput, ExposureInput | None, ExposureInput | None]], config: MeasurementConfig,
             psf_fwhm: float | None, order: str = "exposure") -> dict[str, Any]:
    """What a job runs, as stored JSON: resolved files, measurement config, PSF, and the
    order of the result's rows ("exposure": as measured; "lightcurve": by object, then time)."""

    def side(source: ExposureInput | None) -> dict[str, str] | None:
        return None if source is None else {"path": str(source.path), "label": source.label}

    return {
        "exposures": [{"science": side(s), "difference": side(d), "psf": side(p)} for s, d, p in exposures],
        "config": config.model_dump(mode="json"),
        "psf_fwhm": psf_fwhm,
        "order": order,
    }


class _Stop(Exception):
    """The running job must stop: server shutdown or the job was deleted."""


class JobRunner:
    """Threads that claim and run jobs, and one that keeps heartbeats and requeues stale jobs.

    Store errors (a full disk, a read-only database) never end a thread: each store call
    is retried with exponential backoff while the runner runs. A job is heartbeaten only
    while its work progresses, so a run stuck for ``stale_seconds`` is re-queued like one
    whose server died.
    """

    def __init__(self, store: JobStore, service: MeasureService, *, workers: int, heartbeat_seconds: float,
                 stale_seconds: float, max_attempts: int, on_finished=None, max_backoff_seconds: float = 30.0):
        self.store, self.service = store, service
        self.workers, self.heartbeat, self.stale, self.max_attempts = workers, heartbeat_seconds, stale_seconds, max_attempts
        self.max_backoff = max_backoff_seconds
        self.owner = uuid.uuid4().hex
        self.on_finished = on_finished or (lambda state: None)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._deleted: set[str] = set()
        self._progressed: dict[str, float] = {}  # job id -> monotonic time of its last progress
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
            progressing = [job_id for job_id, at in list(self._progressed.items()) if at > recent]
            try:
                self.store.beat(self.owner, progressing)
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
            self._progress_made(job.id)
            try:
                self._run(job)
            except _Stop:
                if job.id not in self._deleted:
                    self._finally("releasing a job", self.store.release, job.id, self.owner)
            except Exception as exc:  # a bug or a store fault must not kill the runner thread
                self._fail(job, exc)
            finally:
                self._progressed.pop(job.id, None)
                self._deleted.discard(job.id)

    def _finally(self, what: str, call, *args, **kwargs):
        """A store call that must happen; given up only when the runner stops (the job is
        then re-queued as stale by whichever server notices)."""
        try:
            return self._retrying(what, call, *args, **kwargs)
        except STORE_ERRORS as exc:
            log.warning("job store: %s given up at shutdown: %s", what, store_error_reason(exc))
            return None

    def _fail(self, job: Job, exc: Exception) -> None:
        self.store.partial_path(job.id).unlink(missing_ok=True)
        if isinstance(exc, STORE_ERRORS):
            detail = f"the job store could not keep the result: {store_error_reason(exc)}"
            log.warning("job %s failed: %s", job.id, detail)
        else:
            detail = "internal error while running the job; it has been logged"
            log.exception("job %s failed", job.id)
        if self._finally("recording a failed job", self.store.finish, job.id, self.owner, state="failed", rows=None,
                         errors=[{"exposure": "*", "detail": detail}]):
            self.on_finished("failed")

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
            psf = ExposureInput(Path(item["psf"]["path"]), item["psf"]["label"]) if item.get("psf") else None
            task = MeasureTask(science=science, difference=difference, objects=objects, config=config, psf_fwhm=spec["psf_fwhm"], psf=psf)
            last = [0.0]

            def progress(done: int, total: int, i: int = i) -> None:
                self._check(job.id)
                self._progress_made(job.id)
                if time.monotonic() - last[0] > 0.5:
                    last[0] = time.monotonic()
                    try:  # progress within an exposure is for display only
                        self.store.progress(job.id, self.owner, i, (i + done / max(total, 1)) / n)
                    except STORE_ERRORS as exc:
                        log.warning("job store: recording progress failed: %s", store_error_reason(exc))

            try:
                outcome = self.service.run(task, progress)
            except (InputError, ExposureError, PsfError, OSError) as exc:
                errors.append({"exposure": (difference or science).label, "detail": str(exc)})
                continue
            catalogs.append(outcome.measurement.table)
            provenances.append(outcome.measurement.provenance)
            self._progress_made(job.id)
            self._retrying("recording progress", self.store.progress, job.id, self.owner, i + 1, (i + 1) / n)
        self._check(job.id)
        rows = None
        if catalogs:
            catalog = pa.concat_tables(catalogs)
            if spec.get("order") == "lightcurve":
                catalog = sort_lightcurves(catalog)
            partial = self.store.partial_path(job.id)
            partial.write_bytes(encode_catalog(catalog, {"job": job.id, "exposures": provenances, "errors": errors}, "parquet"))
            os.replace(partial, self.store.result_path(job.id))
            rows = catalog.num_rows
        state = "succeeded" if catalogs else "failed"
        if self._finally("recording a finished job", self.store.finish, job.id, self.owner, state=state, errors=errors, rows=rows):
            self.on_finished(state)
        elif job.id in self._deleted:
            shutil.rmtree(self.store.job_dir(job.id), ignore_errors=True)


def store_error_reason(exc: BaseException) -> str:
    """What went wrong, without file paths (an OSError's message names its file)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)

