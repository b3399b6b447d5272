"""SQLite databases in WAL mode that stay readable on a full disk."""

from __future__ import annotations

from pathlib import Path
import sqlite3


def keep_open(path: Path) -> sqlite3.Connection:
    """A read-only connection to the WAL database at ``path``, to hold open for the
    database's life (shared by threads).

    SQLite removes a WAL database's index (``-shm``) and log (``-wal``) when its last
    connection closes, and the next connection must make them again: on a full disk it
    cannot, and every read fails with the writes. While this connection is open they stay.
    """
    db = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
    db.execute("SELECT count(*) FROM sqlite_master").fetchone()  # opens the WAL index
    return db
