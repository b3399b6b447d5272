"""``forcedphot serve``: run the application under uvicorn.

Settings come from the environment (``FORCEDPHOT_*``) and the config file; the command
line's ``--repository`` overrides the repository roots. With ``--workers N`` uvicorn runs N
processes, each building its application with :func:`app_from_environment`; they share
the data directory (job store, demo repository).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from forcedphot.api.problems import PROBLEM_MEDIA_TYPE, problem_body
from forcedphot.api.settings import ENV_PREFIX, SettingsError, load_settings
from forcedphot.photometry.backend import select_backend


class GuardedHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's HTTP protocol with Nagle's algorithm off, a deadline for every request's
    headers, a write timeout, and a cap on open connections.

    asyncio turns ``TCP_NODELAY`` on only for sockets it knows to be TCP. With
    ``--workers N > 1`` uvicorn hands its listening socket to the worker processes in a
    form asyncio does not recognise, so a response written in two parts (headers, then
    body) waited for the client's delayed ACK (about 40 ms on Linux; see
    ``bench/RESULTS.md``).

    uvicorn itself bounds none of the rest:

    - headers: a connection that has not completed a request's headers within
      :attr:`header_timeout` seconds of its first byte (or, for the first request, of
      the connection) is closed, on every request of a keep-alive connection (idle
      connections are closed by uvicorn's ``timeout_keep_alive``);
    - slow readers: while a client reads nothing, its answer waits in memory; a
      connection whose writes stay paused (the transport's buffer above its high-water
      mark) for :attr:`write_timeout` seconds is aborted, which frees the buffer;
    - connections: beyond :attr:`max_connections` open ones, a new connection is
      answered 503 with Retry-After and closed, before it holds anything.
    """

    header_timeout: float = 10.0  # these three are set from the settings by app_from_environment
    write_timeout: float = 30.0
    max_connections: int = 1000

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)
        self._write_deadline: asyncio.TimerHandle | None = None
        self._header_deadline: asyncio.TimerHandle | None = None
        if len(self.connections) > self.max_connections:
            transport.write(CONNECTIONS_FULL)
            transport.close()
            return
        self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_overdue, self.cycle)

    def _awaiting_headers(self) -> bool:
        """No request is being answered: the next bytes are a request's headers."""
        return self.cycle is None or self.cycle.response_complete

    def data_received(self, data: bytes) -> None:
        if self._header_deadline is None and self._awaiting_headers():
            self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_overdue, self.cycle)
        before = self.cycle
        super().data_received(data)
        if self.cycle is not before and self._header_deadline is not None:  # a request's headers are complete
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_overdue(self, cycle: object) -> None:
        self._header_deadline = None
        if self.cycle is cycle and self._awaiting_headers() and not self.transport.is_closing():
            self.transport.close()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_deadline is None:
            self._write_deadline = self.loop.call_later(self.write_timeout, self._writes_overdue)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None

    def _writes_overdue(self) -> None:
        self._write_deadline = None
        if not self.transport.is_closing():
            self.transport.abort()  # drops what the client did not read

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._header_deadline, self._write_deadline):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)


def _refusal(status: str, slug: str, detail: str) -> bytes:
    """A whole HTTP/1.1 problem+json answer, written before any request was read."""
    body = json.dumps(problem_body(int(status.split()[0]), slug, detail)).encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: {PROBLEM_MEDIA_TYPE}\r\nretry-after: 1\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


CONNECTIONS_FULL = _refusal("503 Service Unavailable", "too-many-connections",
                            "the server has as many connections open as it takes; retry shortly")


def app_from_environment():
    """Application factory for uvicorn (``--factory``): settings from the environment."""
    from forcedphot.api.app import create_app
    from forcedphot.serving.allocator import keep_temporaries_on_heap

    keep_temporaries_on_heap()  # each worker is its own process
    if not logging.getLogger().handlers:  # uvicorn configures only its own loggers
        logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    settings = load_settings()
    GuardedHTTPProtocol.header_timeout = settings.header_timeout_seconds
    GuardedHTTPProtocol.write_timeout = settings.write_timeout_seconds
    GuardedHTTPProtocol.max_connections = settings.max_connections
    return create_app(settings)


def _check_port(host: str, port: int) -> None:
    """SettingsError, in one line, when ``host:port`` cannot be listened on (in use, not
    an address of this machine, a privileged port): said before anything is prepared."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a port in TIME_WAIT is free
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise SettingsError(f"cannot listen on {host}:{port}: {exc.strerror or exc} (is another server running? choose --port)") from None


def run_server(*, host: str = "127.0.0.1", port: int = 8000, repository: str | None = None, workers: int = 1,
               butler: str | None = None, collections: str | None = None, apdb: str | None = None) -> int:
    """Serve until interrupted; returns uvicorn's exit code. ``repository`` (a folder) or
    ``butler`` with ``collections`` (comma-separated) override the settings' sources;
    ``apdb`` (an APDB configuration file) the settings' APDB.

    Raises :class:`SettingsError` or :class:`BackendError` before serving when the
    settings cannot be used.
    """
    if repository is not None:
        os.environ[f"{ENV_PREFIX}REPOSITORY_ROOTS"] = os.path.abspath(repository)
    if butler is not None:
        os.environ[f"{ENV_PREFIX}BUTLER_REPOSITORY"] = butler if "://" in butler else os.path.abspath(butler)
    if collections is not None:
        os.environ[f"{ENV_PREFIX}BUTLER_COLLECTIONS"] = collections
    if apdb is not None:
        os.environ[f"{ENV_PREFIX}APDB_CONFIG"] = apdb if "://" in apdb else os.path.abspath(apdb)
    settings = load_settings()
    select_backend(settings.backend)
    if repository is not None and not os.path.isdir(repository):
        raise SettingsError(f"repository {repository} is not a directory")
    if settings.apdb_config and "://" not in settings.apdb_config and not os.path.isfile(settings.apdb_config):
        raise SettingsError(f"APDB configuration {settings.apdb_config}: no such file (apdb-cli create-sql writes one)")
    _check_port(host, port)
    if settings.demo_mode:
        where = f"the embedded demo repository in {settings.demo_repository}"
    elif settings.butler_repository:
        where = f"the Butler repository {settings.butler_repository} (collections {', '.join(settings.butler_collections)})"
    else:
        where = ", ".join(map(str, settings.repository_roots))
    if settings.apdb_config:
        where += f", DiaObjects from the APDB {settings.apdb_config}"
    print(f"forcedphot: serving {where} on http://{host}:{port} (docs at /docs)", file=sys.stderr, flush=True)
    try:
        uvicorn.run("forcedphot.api.server:app_from_environment", factory=True, host=host, port=port, workers=workers,
                    http="forcedphot.api.server:GuardedHTTPProtocol",
                    timeout_keep_alive=settings.keep_alive_seconds, timeout_graceful_shutdown=settings.shutdown_grace_seconds,
                    log_level="info")
    except SystemExit as exc:  # uvicorn exits this way when it cannot start (e.g. port in use)
        return exc.code if isinstance(exc.code, int) else 1
    return 0
