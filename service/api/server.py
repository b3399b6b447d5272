"""``forcedphot serve``: run the application under uvicorn.

Settings come from the environment (``FORCEDPHOT_*``) and the config file; the command
line's ``--repository`` overrides the repository roots. With ``--workers N`` uvicorn runs N
processes, each building its application with :func:`app_from_environment`; they share
the data directory (job store, demo repository).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from forcedphot.api.settings import ENV_PREFIX, SettingsError, load_settings
from forcedphot.photometry.backend import select_backend


class NoDelayHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's HTTP protocol with Nagle's algorithm off and a deadline for the first
    request's headers on every connection.

    asyncio turns ``TCP_NODELAY`` on only for sockets it knows to be TCP. With
    ``--workers N > 1`` uvicorn hands its listening socket to the worker processes in a
    form asyncio does not recognise, so a response written in two parts (headers, then
    body) waited for the client's delayed ACK (about 40 ms on Linux; see
    ``bench/RESULTS.md``).

    uvicorn itself has no limit on how long a client may take to send its headers: a
    connection that has not completed its first request's headers within
    :attr:`header_timeout` seconds is closed (idle keep-alive connections are closed by
    uvicorn's ``timeout_keep_alive``).
    """

    header_timeout: float = 10.0  # set from the settings by app_from_environment

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)
        self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_overdue)

    def _headers_overdue(self) -> None:
        if self.cycle is None and not self.transport.is_closing():  # no request has begun
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._header_deadline.cancel()
        super().connection_lost(exc)


def app_from_environment():
    """Application factory for uvicorn (``--factory``): settings from the environment."""
    from forcedphot.api.app import create_app
    from forcedphot.serving.allocator import keep_temporaries_on_heap

    keep_temporaries_on_heap()  # each worker is its own process
    if not logging.getLogger().handlers:  # uvicorn configures only its own loggers
        logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    settings = load_settings()
    NoDelayHTTPProtocol.header_timeout = settings.header_timeout_seconds
    return create_app(settings)


def run_server(*, host: str = "127.0.0.1", port: int = 8000, repository: str | None = None, workers: int = 1) -> int:
    """Serve until interrupted; returns uvicorn's exit code.

    Raises :class:`SettingsError` or :class:`BackendError` before serving when the
    settings cannot be used.
    """
    if repository is not None:
        os.environ[f"{ENV_PREFIX}REPOSITORY_ROOTS"] = os.path.abspath(repository)
    settings = load_settings()
    select_backend(settings.backend)
    if repository is not None and not os.path.isdir(repository):
        raise SettingsError(f"repository {repository} is not a directory")
    where = "the embedded demo repository in " + str(settings.demo_repository) if settings.demo_mode else \
        ", ".join(map(str, settings.repository_roots))
    print(f"forcedphot: serving {where} on http://{host}:{port} (docs at /docs)", file=sys.stderr, flush=True)
    try:
        uvicorn.run("forcedphot.api.server:app_from_environment", factory=True, host=host, port=port, workers=workers,
                    http="forcedphot.api.server:NoDelayHTTPProtocol",
                    timeout_keep_alive=settings.keep_alive_seconds, timeout_graceful_shutdown=settings.shutdown_grace_seconds,
                    log_level="info")
    except SystemExit as exc:  # uvicorn exits this way when it cannot start (e.g. port in use)
        return exc.code if isinstance(exc.code, int) else 1
    return 0
