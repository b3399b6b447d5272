"""A real ``forcedphot serve`` process for end-to-end tests, and demo-repository requests."""

import os
from pathlib import Path
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pandas as pd
from service_helpers import wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m forcedphot.cli serve`` in a subprocess with its own data directory."""

    def __init__(self, data_dir: Path, *args: str, **env: str):
        self.data_dir, self.port, self.args = data_dir, free_port(), list(args)
        inherited = {k: v for k, v in os.environ.items()
                     if k not in ("FORCEDPHOT_REPOSITORY_ROOTS", "FORCEDPHOT_API_KEYS", "FORCEDPHOT_CONFIG_FILE")}
        self.env = {**inherited, "FORCEDPHOT_DATA_DIR": str(data_dir), "FORCEDPHOT_BACKEND": "numpy", **env}
        self.log = data_dir / f"server-{self.port}.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Server":
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "forcedphot.cli", "serve", "--port", str(self.port), *self.args],
                                            env=self.env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(self._ready, timeout=90, interval=0.2)
        except AssertionError:
            self.stop()
            raise AssertionError(f"server did not become ready; log:\n{self.log.read_text()[-3000:]}") from None
        return self

    def _ready(self) -> bool:
        assert self.process.poll() is None, f"server exited: {self.log.read_text()[-3000:]}"
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def descendants(self) -> list[int]:
        """Process ids of the server's children and their children (Linux /proc)."""
        found, todo = [], [self.process.pid]
        while todo:
            pid = todo.pop()
            for task in Path(f"/proc/{pid}/task").glob("*"):
                try:
                    children = [int(c) for c in (task / "children").read_text().split()]
                except OSError:
                    continue
                found += children
                todo += children
        return found

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def serving(tmp_path_factory, name: str, **env: str):
    """A started server in a fresh folder, stopped when the generator is closed (for fixtures:
    ``yield from serving(...)``)."""
    running = Server(tmp_path_factory.mktemp(name), **env).start()
    try:
        yield running
    finally:
        running.stop()


def demo_visits(server: Server) -> list[dict]:
    """The demo repository's data ids, as ``/v1/info`` lists them."""
    return httpx.get(f"{server.url}/v1/info").json()["demo"]


def demo_request(visit: dict, objects=None) -> dict:
    ref = {"visit": visit["visit"], "detector": visit["detector"]}
    return {"exposure": {**ref, "datasetType": "calexp"}, "difference": {**ref, "datasetType": "difference"},
            "objects": objects or {"uri": visit["objects"]}}


def visit_dir(data_dir: Path, visit: dict) -> Path:
    return data_dir / "demo-repository" / str(visit["visit"]) / str(visit["detector"])


def many_objects(data_dir: Path, visit: dict, n: int) -> list[dict]:
    """``n`` DiaObjects spread over the demo detector (inside the box of the truth's objects
    on that visit's detector)."""
    truth = pd.read_parquet(data_dir / "demo-repository" / "truth.parquet")
    on = truth[truth["on_detector"] & (truth["visit"] == visit["visit"])]
    objects = pd.read_parquet(data_dir / "demo-repository" / "diaObjects.parquet").set_index("diaObjectId").loc[on["diaObjectId"]]
    on = objects
    rng = np.random.default_rng(5)
    ra = rng.uniform(on["ra"].min(), on["ra"].max(), n)
    dec = rng.uniform(on["dec"].min(), on["dec"].max(), n)
    return [{"diaObjectId": int(i) + 1, "ra": float(r), "dec": float(d)} for i, r, d in zip(range(n), ra, dec)]


def read_answer(s: socket.socket) -> bytes:
    """One whole HTTP answer with a Content-Length, read from a keep-alive connection; its head."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += _more(s, data)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += _more(s, body)
    return head


def _more(s: socket.socket, so_far: bytes) -> bytes:
    """The next bytes of an answer; the server closing the connection first fails the test."""
    chunk = s.recv(65536)
    assert chunk, f"the server closed the connection in the middle of an answer, after {so_far[:300]!r}"
    return chunk


def assert_closed_by_server(s: socket.socket, within: float = 3.0) -> None:
    """The server closes ``s`` (nothing more to read) within ``within`` seconds; ``s`` is closed after."""
    try:
        s.settimeout(within + 2)
        start = time.perf_counter()
        assert s.recv(100) == b""  # closed by the server
        assert time.perf_counter() - start < within
    finally:
        s.close()
