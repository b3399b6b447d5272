"""A real PostgreSQL server for tests: a temporary cluster (``initdb``) listening on a
loopback port, made and removed by a session fixture, with a fresh database per test."""

import glob
import os
from pathlib import Path
import shutil
import signal
import subprocess
import tempfile
import uuid

from server_helpers import free_port
from service_helpers import wait_until

USER = "forcedphot"


def postgres_bin() -> Path | None:
    """The folder holding ``initdb`` and ``postgres``: on PATH, else Debian's versioned folder."""
    found = shutil.which("initdb")
    if found and shutil.which("postgres"):
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


class PostgresServer:
    """``initdb`` + ``postgres`` in a temporary folder of its own (trust authentication,
    loopback only, fsync off), removed by :meth:`stop`.

    PostgreSQL refuses to run as root: under root the cluster belongs to ``nobody`` and both
    programs run as that user (the folder is made where ``nobody`` can reach it).
    """

    def __init__(self, bin_dir: Path):
        self.root, self.bin, self.port = Path(tempfile.mkdtemp(prefix="forcedphot-postgres-")), bin_dir, free_port()
        self.data = self.root / "cluster"
        self.as_user = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"] if os.geteuid() == 0 else []
        self.log = self.root / "postgres.log"
        self.process: subprocess.Popen | None = None

    def _run(self, *command: str) -> None:
        subprocess.run([*self.as_user, *command], check=True, capture_output=True, cwd=self.root)

    def start(self) -> "PostgresServer":
        if self.as_user:
            shutil.chown(self.root, "nobody", "nogroup")
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync")
        return self.resume()

    def halt(self) -> None:
        """Stop the server, keeping its cluster (an outage; :meth:`resume` ends it)."""
        self.process.send_signal(signal.SIGINT)  # PostgreSQL's fast shutdown: clients are disconnected
        self.process.wait(30)

    def resume(self) -> "PostgresServer":
        """Start the server on its cluster and port."""
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [*self.as_user, str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.root),
                 "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=200"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.root)
        wait_until(self._ready, timeout=60, interval=0.1)
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def _ready(self) -> bool:
        import psycopg

        assert self.process.poll() is None, f"postgres exited: {self.log.read_text()[-2000:]}"
        try:
            psycopg.connect(self.url(), connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False

    def new_database(self, extensions: tuple[str, ...] = ()) -> str:
        """A fresh empty database with these extensions (e.g. btree_gist, which a Butler
        registry needs); its URL."""
        import psycopg

        name = f"test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as db:
            db.execute(f"CREATE DATABASE {name}")
        with psycopg.connect(self.url(name), autocommit=True) as db:
            for extension in extensions:
                db.execute(f"CREATE EXTENSION IF NOT EXISTS {extension}")
        return self.url(name)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # fast shutdown: SIGTERM would wait for every client to leave
            self.process.wait(30)
        shutil.rmtree(self.root, ignore_errors=True)
