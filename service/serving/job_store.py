"""Where jobs are kept: SQLite (WAL) in the data directory, or PostgreSQL shared by replicas.

One store, two databases. ``FORCEDPHOT_DATABASE_URL`` (``postgresql://...``) selects
PostgreSQL, which several service replicas share: they claim queued jobs with ``SELECT ...
FOR UPDATE SKIP LOCKED``, heartbeat the jobs they run, re-queue the jobs of a replica that
fell silent, and an idempotency key is unique across all of them. Without it the store is
``<data_dir>/jobs/jobs.sqlite``, which the processes of one machine share (claims and
submissions serialised by SQLite's write lock). Either way the schema is made and upgraded
by Alembic migrations (``forcedphot/serving/migrations``) when a store opens.

A job is accepted only once its row is committed, with its validated object table written
first to ``<jobs_dir>/<id>/objects.parquet``; results are written there too (a temporary
file renamed into place), so replicas sharing PostgreSQL share that directory (a
ReadWriteMany volume; see deploy/README.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
import fcntl
import json
import os
from pathlib import Path
import shutil
import sqlite3
import time
from typing import Any, Literal
import uuid

import pandas as pd
import psycopg
from psycopg.rows import dict_row
from pydantic import BaseModel, Field

from forcedphot.serving.sqlite_wal import keep_open

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


class JobLimitReached(Exception):
    """Too many queued and running jobs (in all, or of one client)."""


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
    def from_row(cls, row: Any) -> Job:
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


class StoreUnavailable(Exception):
    """The job store's database failed a call (down, unreachable, full, read-only,
    damaged); the message says why, without server paths or URLs."""


ACTIVE_STATES = ("queued", "running")
PARTIAL_RESULT = "result.partial"
DATABASE_ERRORS = (sqlite3.Error, psycopg.Error)
STORE_ERRORS = (StoreUnavailable, *DATABASE_ERRORS, OSError)  # what a full, read-only, damaged or unreachable store raises
_MIGRATIONS = Path(__file__).with_name("migrations")
_CREATE_LOCK = 0x666F7263  # PostgreSQL advisory lock taken by submissions ("forc")
_MIGRATE_LOCK = _CREATE_LOCK + 1


class _Sqlite:
    """SQLite in WAL mode: one file, shared by the processes of one machine."""

    name = "sqlite"

    def __init__(self, path: Path):
        self.path = path
        self._keeper: sqlite3.Connection | None = None

    def connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA synchronous=FULL")
        return db

    def prepare(self) -> None:
        with self.connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
        self._keeper = keep_open(self.path)  # reads keep working on a full disk

    def sql(self, statement: str) -> str:
        return statement

    def begin_write(self, db: Any) -> None:
        db.execute("BEGIN IMMEDIATE")  # the database's one write lock: submissions and claims in turn

    def claim(self, db: Any, owner: str, now: float) -> str | None:
        self.begin_write(db)
        row = db.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY created LIMIT 1").fetchone()
        if row is not None:
            db.execute("UPDATE jobs SET state = 'running', owner = ?, heartbeat = ?, started = coalesce(started, ?), "
                       "attempts = attempts + 1 WHERE id = ?", (owner, now, now, row["id"]))
        db.execute("COMMIT")
        return None if row is None else row["id"]

    @property
    def alembic_url(self) -> str:
        return f"sqlite:///{self.path}"

    @contextmanager
    def migration_lock(self, connection: Any) -> Iterator[None]:
        with open(self.path.with_suffix(".migrate-lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one process migrates at a time
            yield


class _Postgres:
    """PostgreSQL: one database shared by every replica."""

    name = "postgresql"

    def __init__(self, url: str):
        self.url = url

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.url, autocommit=True, row_factory=dict_row, connect_timeout=10)

    def prepare(self) -> None:
        """Nothing to set per database."""

    def sql(self, statement: str) -> str:
        return statement.replace("?", "%s")

    def begin_write(self, db: Any) -> None:
        db.execute("BEGIN")
        db.execute("SELECT pg_advisory_xact_lock(%s)", (_CREATE_LOCK,))  # submissions in turn, across replicas

    def claim(self, db: Any, owner: str, now: float) -> str | None:
        row = db.execute(
            "UPDATE jobs SET state = 'running', owner = %s, heartbeat = %s, started = coalesce(started, %s), attempts = attempts + 1 "
            "WHERE id = (SELECT id FROM jobs WHERE state = 'queued' ORDER BY created LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id",
            (owner, now, now)).fetchone()
        return None if row is None else row["id"]

    @property
    def alembic_url(self) -> str:
        return "postgresql+psycopg://" + self.url.split("://", 1)[1]

    @contextmanager
    def migration_lock(self, connection: Any) -> Iterator[None]:
        import sqlalchemy as sa

        connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATE_LOCK})  # held to the commit
        yield


def migrate(database: _Sqlite | _Postgres) -> None:
    """Bring the schema to Alembic's head revision, one process at a time."""
    from alembic import command
    from alembic.config import Config
    import sqlalchemy as sa

    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    engine = sa.create_engine(database.alembic_url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as connection, database.migration_lock(connection):
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    except sa.exc.DBAPIError as exc:  # the driver's own error, as the store's other calls raise
        raise exc.orig from None
    finally:
        engine.dispose()


class JobStore:
    """Jobs in SQLite or PostgreSQL (see the module docstring); every method opens its own
    connection, so a store is safe to share between threads and processes."""

    def __init__(self, directory: Path, database_url: str | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.database = _Postgres(database_url) if database_url else _Sqlite(self.directory / "jobs.sqlite")
        self.database.prepare()
        migrate(self.database)

    @property
    def kind(self) -> str:
        """"sqlite" or "postgresql"."""
        return self.database.name

    def job_dir(self, job_id: str) -> Path:
        return self.directory / job_id

    def objects_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "objects.parquet"

    def result_path(self, job_id: str, attempt: int, fmt: str = "parquet") -> Path:
        """The result of run ``attempt`` (its parquet catalog, or the same in ``fmt``):
        each run writes under its own name, so a run that lost its claim never touches
        the result of the run that took the job over."""
        return self.job_dir(job_id) / f"result-{attempt}.{fmt}"

    def partial_path(self, job_id: str, attempt: int) -> Path:
        """Where run ``attempt`` writes its result before renaming it into place."""
        return self.job_dir(job_id) / f"{PARTIAL_RESULT}-{attempt}"

    def parts_dir(self, job_id: str, attempt: int) -> Path:
        """Where run ``attempt`` writes the catalog of each exposure as it is measured."""
        return self.job_dir(job_id) / f"parts-{attempt}"

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        """A connection for one call; the database's errors leave as :class:`StoreUnavailable`."""
        try:
            db = self.database.connect()
            try:
                yield db
            finally:
                db.close()
        except DATABASE_ERRORS as exc:
            raise StoreUnavailable(store_error_reason(exc)) from exc

    def _rows(self, sql: str, *args: Any) -> list[Any]:
        with self._connection() as db:
            return db.execute(self.database.sql(sql), args).fetchall()

    def _one(self, sql: str, *args: Any) -> Job | None:
        rows = self._rows(sql, *args)
        return Job.from_row(rows[0]) if rows else None

    def _run(self, sql: str, *args: Any) -> int:
        with self._connection() as db:
            return db.execute(self.database.sql(sql), args).rowcount

    def get(self, job_id: str) -> Job | None:
        """The job, whoever submitted it (for the runners)."""
        return self._one("SELECT * FROM jobs WHERE id = ?", job_id)

    def of(self, job_id: str, client: str) -> Job | None:
        """The job if ``client`` submitted it, else None: a client never sees another's jobs."""
        return self._one("SELECT * FROM jobs WHERE id = ? AND client = ?", job_id, client)

    def by_key(self, client: str, key: str, fingerprint: str) -> Job | None:
        """The job ``client`` submitted under idempotency ``key``, or None;
        :class:`IdempotencyConflict` when it was accepted for a request with another
        ``fingerprint``. Keys are scoped per client: another client's key never matches."""
        job = self._one("SELECT * FROM jobs WHERE idempotency_key = ?", _scoped_key(client, key))
        return _same_request(job, fingerprint)

    def of_client(self, client: str, *, limit: int, offset: int) -> list[Job]:
        """``client``'s jobs, newest first: ``limit`` of them from ``offset``."""
        rows = self._rows("SELECT * FROM jobs WHERE client = ? ORDER BY created DESC, id LIMIT ? OFFSET ?", client, limit, offset)
        return [Job.from_row(row) for row in rows]

    def count_active(self) -> int:
        return self._rows("SELECT count(*) AS n FROM jobs WHERE state IN (?, ?)", *ACTIVE_STATES)[0]["n"]

    def create(self, *, spec: dict[str, Any], objects: pd.DataFrame, fingerprint: str, key: str | None,
               max_active: int, client: str, max_active_per_client: int | None = None) -> tuple[Job, bool]:
        """Accept ``client``'s job: ``(job, True)``, or ``(existing, False)`` for a key that
        client used before.

        Raises :class:`JobLimitReached` (``max_active`` queued and running jobs in all, or
        ``max_active_per_client`` of this client's) or :class:`IdempotencyConflict`. The
        object table is written before the row is committed, so a committed job always has
        its inputs. Submissions are serialised (SQLite's write lock, a PostgreSQL advisory
        lock), so the limits and the key hold across processes and replicas.
        """
        scoped = _scoped_key(client, key) if key else None
        job_id = uuid.uuid4().hex
        self.job_dir(job_id).mkdir(parents=True)
        objects.to_parquet(self.objects_path(job_id), index=False)
        sql = self.database.sql
        try:
            with self._connection() as db:
                self.database.begin_write(db)
                try:
                    existing = db.execute(sql("SELECT * FROM jobs WHERE idempotency_key = ?"), (scoped,)).fetchone() if key else None
                    if existing is None:
                        self._check_limits(db, client, max_active, max_active_per_client)
                        db.execute(sql(
                            "INSERT INTO jobs (id, idempotency_key, fingerprint, state, spec, created, exposures_total, client) "
                            "VALUES (?, ?, ?, 'queued', ?, ?, ?, ?)"),
                            (job_id, scoped, fingerprint, json.dumps(spec), time.time(), len(spec["exposures"]), client))
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
        except BaseException:
            shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
            raise
        if existing is not None:
            shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
            return _same_request(Job.from_row(existing), fingerprint), False
        return self.get(job_id), True  # type: ignore[return-value]

    def _check_limits(self, db: Any, client: str, max_active: int, max_active_per_client: int | None) -> None:
        """Raise :class:`JobLimitReached` when another job would pass a limit (inside the
        submission's transaction)."""
        sql = self.database.sql
        active = db.execute(sql("SELECT count(*) AS n FROM jobs WHERE state IN (?, ?)"), ACTIVE_STATES).fetchone()["n"]
        if active >= max_active:
            raise JobLimitReached(f"{max_active} jobs are queued or running already")
        if max_active_per_client is not None:
            mine = db.execute(sql("SELECT count(*) AS n FROM jobs WHERE state IN (?, ?) AND client = ?"),
                              (*ACTIVE_STATES, client)).fetchone()["n"]
            if mine >= max_active_per_client:
                raise JobLimitReached(f"this API key has {max_active_per_client} jobs queued or running already, "
                                      "the most one key may have")

    def claim(self, owner: str) -> Job | None:
        """Take the oldest queued job for ``owner`` (atomic across threads, processes and replicas)."""
        with self._connection() as db:
            job_id = self.database.claim(db, owner, time.time())
        return None if job_id is None else self.get(job_id)

    def beat(self, owner: str, runs: dict[str, int]) -> list[str]:
        """Mark these running jobs of ``owner`` alive (job id -> the attempt it runs); returns
        the ids of those whose claim was lost (re-queued, taken over, deleted)."""
        return [job_id for job_id, attempt in runs.items()
                if self._run("UPDATE jobs SET heartbeat = ? WHERE id = ? AND state = 'running' AND owner = ? AND attempts = ?",
                             time.time(), job_id, owner, attempt) != 1]

    def probe_write(self) -> None:
        """Write to the database and to the directory, as jobs do; raises (a database or OS
        error) when the store cannot take work: disk full, read-only, corrupt, unreachable."""
        self._run("INSERT INTO probe (id, at) VALUES (1, ?) ON CONFLICT (id) DO UPDATE SET at = excluded.at", time.time())
        probe = self.directory / f".write-probe-{uuid.uuid4().hex}"
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()

    def remove_partials(self) -> int:
        """Delete result files and parts left half-written by runs that are no longer running."""
        running = {row["id"] for row in self._rows("SELECT id FROM jobs WHERE state = 'running'")}
        partials = [p for pattern in (f"*/{PARTIAL_RESULT}*", "*/parts-*") for p in self.directory.glob(pattern)
                    if p.parent.name not in running]
        for partial in partials:
            shutil.rmtree(partial, ignore_errors=True) if partial.is_dir() else partial.unlink(missing_ok=True)
        return len(partials)

    def requeue_stale(self, stale_seconds: float, max_attempts: int) -> int:
        """Queue again running jobs whose owner fell silent; fail those out of attempts."""
        limit = time.time() - stale_seconds
        error = json.dumps([{"exposure": "*", "detail": f"the server stopped during each of {max_attempts} runs of this job"}])
        failed = self._run("UPDATE jobs SET state = 'failed', owner = NULL, finished = ?, errors = ? "
                           "WHERE state = 'running' AND heartbeat < ? AND attempts >= ?", time.time(), error, limit, max_attempts)
        queued = self._run("UPDATE jobs SET state = 'queued', owner = NULL WHERE state = 'running' AND heartbeat < ?", limit)
        return failed + queued

    def progress(self, job_id: str, owner: str, attempt: int, done: int, fraction: float) -> bool:
        """Record progress of run ``attempt``; False when that run lost its claim."""
        return self._run("UPDATE jobs SET exposures_done = ?, fraction = ?, heartbeat = ? "
                         "WHERE id = ? AND owner = ? AND attempts = ? AND state = 'running'",
                         done, fraction, time.time(), job_id, owner, attempt) == 1

    def finish(self, job_id: str, owner: str, attempt: int, *, state: str, errors: list[dict[str, str]], rows: int | None) -> bool:
        """Record the outcome of run ``attempt``; False when the job was deleted, re-queued
        or taken over meanwhile (fenced by owner and attempt: only the run holding the
        claim finishes a job)."""
        return self._run(
            "UPDATE jobs SET state = ?, errors = ?, rows = ?, finished = ?, owner = NULL, "
            "exposures_done = exposures_total, fraction = 1 WHERE id = ? AND owner = ? AND attempts = ? AND state = 'running'",
            state, json.dumps(errors), rows, time.time(), job_id, owner, attempt) == 1

    def release(self, job_id: str, owner: str) -> None:
        """Put back a job interrupted by a clean shutdown (the run does not count as an attempt)."""
        self._run("UPDATE jobs SET state = 'queued', owner = NULL, attempts = attempts - 1 "
                  "WHERE id = ? AND owner = ? AND state = 'running'", job_id, owner)

    def delete(self, job_id: str) -> bool:
        """Forget a job and its files; False if there was no such job."""
        deleted = self._run("DELETE FROM jobs WHERE id = ?", job_id) == 1
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
        return deleted



def _scoped_key(client: str, key: str) -> str:
    """The idempotency key as stored: the client's identity, then its key (one client's
    key never names another's job, nor blocks another from using the same key)."""
    return f"{client}\x1f{key}"


def _same_request(job: Job | None, fingerprint: str) -> Job | None:
    """``job``, if it was accepted for the request with ``fingerprint``."""
    if job is not None and job.fingerprint != fingerprint:
        raise IdempotencyConflict("this Idempotency-Key was used for a different request")
    return job


def store_error_reason(exc: BaseException) -> str:
    """What went wrong, without file paths (an OSError's message names its file) or
    connection details (a PostgreSQL error's first line only names the failure)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, psycopg.OperationalError):
        return "the database server cannot be reached" if "connect" in str(exc).lower() else "the database server failed the call"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__

