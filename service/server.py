"""``forcedphot serve``: run the application under uvicorn.

Settings come from the environment (``FORCEDPHOT_*``) and the config file; the command
line's ``--repository`` overrides the repository roots. With ``--workers N`` uvicorn runs N
processes, each building its application with :func:`app_from_environment`; they share
the data directory (job store, demo repository).
"""

from __future__ import annotations

import logging
import os
import sys

import uvicorn

from .backend import BackendError, select_backend
from .settings import ENV_PREFIX, SettingsError, load_settings

USAGE_ERROR = 2


def app_from_environment():
    """Application factory for uvicorn (``--factory``): settings from the environment."""
    from .app import create_app

    if not logging.getLogger().handlers:  # uvicorn configures only its own loggers
        logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    return create_app(load_settings())


def run_server(*, host: str = "127.0.0.1", port: int = 8000, repository: str | None = None, workers: int = 1) -> int:
    """Serve until interrupted; returns the process exit code (2 for unusable settings)."""
    if repository is not None:
        os.environ[f"{ENV_PREFIX}REPOSITORY_ROOTS"] = os.path.abspath(repository)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"forcedphot serve: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    try:
        select_backend(settings.backend)
    except BackendError as exc:
        print(f"forcedphot serve: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    if repository is not None and not os.path.isdir(repository):
        print(f"forcedphot serve: error: repository {repository} is not a directory", file=sys.stderr)
        return USAGE_ERROR
    where = "the embedded demo repository in " + str(settings.demo_repository) if settings.demo_mode else \
        ", ".join(map(str, settings.repository_roots))
    print(f"forcedphot: serving {where} on http://{host}:{port} (docs at /docs)", file=sys.stderr, flush=True)
    try:
        uvicorn.run("forcedphot.server:app_from_environment", factory=True, host=host, port=port, workers=workers,
                    timeout_graceful_shutdown=30, log_level="info")
    except SystemExit as exc:  # uvicorn exits this way when it cannot start (e.g. port in use)
        return exc.code if isinstance(exc.code, int) else 1
    return 0
