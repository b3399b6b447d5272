"""The job store itself, on SQLite and on PostgreSQL: claims from many stores at once take
each job exactly once, one idempotency key from many stores at once makes one job, the
schema is Alembic's and adopts stores made before it, times keep their precision."""

import sqlite3
import threading
import time

import pandas as pd
import pytest

from forcedphot.serving.job_store import JobLimitReached, JobStore

OBJECTS = pd.DataFrame({"diaObjectId": [1], "ra": [10.0], "dec": [-5.0]})


def spec(n: int = 1) -> dict:
    return {"exposures": [{"science": None}] * n}


def together(count: int, work) -> list:
    """``work(i)`` on ``count`` threads released at once; their results."""
    barrier, results = threading.Barrier(count), [None] * count

    def run(i):
        barrier.wait()
        results[i] = work(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_claims_from_many_stores_take_each_job_once(tmp_path, job_database):
    stores = [JobStore(tmp_path, job_database) for _ in range(6)]  # as six replicas
    created = [stores[0].create(spec=spec(), objects=OBJECTS, fingerprint=str(i), key=None, max_active=100, client="c")[0].id for i in range(30)]

    def drain(i):
        taken = []
        while (job := stores[i].claim(f"owner-{i}")) is not None:
            taken.append(job.id)
        return taken

    claimed = [job_id for taken in together(6, drain) for job_id in taken]
    assert sorted(claimed) == sorted(created)  # every job once, none twice
    assert all(stores[0].get(job_id).attempts == 1 and stores[0].get(job_id).state == "running" for job_id in created)


def test_one_key_from_many_stores_at_once_is_one_job(tmp_path, job_database):
    stores = [JobStore(tmp_path, job_database) for _ in range(6)]
    answers = together(6, lambda i: stores[i].create(spec=spec(), objects=OBJECTS, fingerprint="same", key="k-1", max_active=100, client="c"))
    assert len({job.id for job, _ in answers}) == 1 and sum(created for _, created in answers) == 1
    assert stores[0].count_active() == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [answers[0][0].id]  # the losers' files are gone


def test_the_active_limit_holds_across_stores(tmp_path, job_database):
    stores = [JobStore(tmp_path, job_database) for _ in range(6)]

    def submit(i):
        try:
            return stores[i].create(spec=spec(), objects=OBJECTS, fingerprint=str(i), key=None, max_active=3, client="c")[1]
        except JobLimitReached:
            return False

    assert sum(together(6, submit)) == 3 and stores[0].count_active() == 3


def test_stale_jobs_are_requeued_then_failed_and_times_keep_their_precision(tmp_path, job_database):
    store = JobStore(tmp_path, job_database)
    before = time.time()
    job, _ = store.create(spec=spec(2), objects=OBJECTS, fingerprint="f", key=None, max_active=10, client="c")
    assert before <= job.created <= time.time() + 1e-3  # float64 seconds (a float4 column would round to ~2 minutes)
    store.claim("dead")
    assert store.requeue_stale(60.0, max_attempts=3) == 0  # its heartbeat is fresh
    assert store.requeue_stale(-1.0, max_attempts=3) == 1 and store.get(job.id).state == "queued"
    store.claim("dead")
    assert store.requeue_stale(-1.0, max_attempts=2) == 1
    assert store.get(job.id).state == "failed" and "2 runs" in store.get(job.id).errors[0]["detail"]


def test_a_store_made_before_migrations_is_adopted(tmp_path):
    """A SQLite store written by an earlier version (its tables made directly, no ``client``
    column, no Alembic version) opens, keeps its jobs and gains the column."""
    db = sqlite3.connect(tmp_path / "jobs.sqlite")
    db.executescript("""
        CREATE TABLE jobs (id TEXT PRIMARY KEY, idempotency_key TEXT UNIQUE, fingerprint TEXT NOT NULL, state TEXT NOT NULL,
            spec TEXT NOT NULL, created REAL NOT NULL, started REAL, finished REAL, heartbeat REAL, owner TEXT,
            attempts INTEGER NOT NULL DEFAULT 0, exposures_done INTEGER NOT NULL DEFAULT 0, exposures_total INTEGER NOT NULL,
            fraction REAL NOT NULL DEFAULT 0, errors TEXT NOT NULL DEFAULT '[]', rows INTEGER);
        CREATE TABLE probe (id INTEGER PRIMARY KEY, at REAL);
        INSERT INTO jobs (id, fingerprint, state, spec, created, exposures_total) VALUES ('old', 'f', 'queued', '{"exposures": []}', 1.0, 0);
    """)
    db.close()
    store = JobStore(tmp_path)
    assert store.get("old").state == "queued"
    new, _ = store.create(spec=spec(), objects=OBJECTS, fingerprint="g", key=None, max_active=10, client="alice")
    assert [j.id for j in store.of_client("alice", limit=5, offset=0)] == [new.id]
    version = sqlite3.connect(tmp_path / "jobs.sqlite").execute("SELECT version_num FROM alembic_version").fetchall()
    assert version == [("0001",)]
    JobStore(tmp_path)  # opening again migrates nothing and fails nothing


def test_an_unreachable_database_raises_a_store_error(tmp_path):
    import psycopg

    with pytest.raises(psycopg.OperationalError):
        JobStore(tmp_path, "postgresql://nobody@127.0.0.1:1/none")
