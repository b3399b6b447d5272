"""The FastAPI application: routes (one module per resource in :mod:`forcedphot.api.routes`)
over one :class:`~forcedphot.api.runtime.ServiceRuntime`.

``create_app(settings)`` builds one application. Endpoints: ``POST /v1/forced-photometry``
(one exposure, JSON references or multipart uploads, catalog by ``Accept``), batch jobs
under ``/v1/jobs``, ``/healthz``, ``/readyz``, ``/metrics``, ``/v1/info``, docs at ``/docs``.
Every error is problem+json (:mod:`forcedphot.api.problems`).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.openapi.utils import get_openapi
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool

from forcedphot.api.body_limit import BodyLimitMiddleware, BodyLimits
from forcedphot.api.dependencies import ClientGone
from forcedphot.api.metrics import MetricsMiddleware
from forcedphot.api.problems import install_problem_handlers
from forcedphot.api.routes import dashboard, jobs, lightcurves, operations, photometry, stamps
from forcedphot.api.runtime import ServiceRuntime
from forcedphot.api.schemas import JobRequest, LightCurveRequest, MeasureRequest
from forcedphot.api.settings import Settings, load_settings
from forcedphot.api.shutdown import ShutdownAnswerMiddleware
from forcedphot.version import __version__

CLIENT_CLOSED_REQUEST = 499  # nginx's code for a request its client abandoned
DESCRIPTION = """Forced photometry of DiaObjects on LSST-style exposures.

Send one exposure (a repository reference or an uploaded FITS file) and a DiaObject
table; get the DiaForcedSource catalog by `Accept`: parquet (default), CSV (with an ECSV
header), JSON, ECSV, FITS or VOTable.
Larger work goes to batch jobs. Errors are RFC 9457 problem+json."""


def create_app(settings: Settings | None = None) -> FastAPI:
    """The application for ``settings`` (default: from the environment and config file)."""
    settings = settings or load_settings()
    runtime = ServiceRuntime(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runtime.start()
        try:
            yield
        finally:
            await run_in_threadpool(runtime.stop)

    # the docs pages take their scripts and styles from the fastapi-offline package, not a CDN
    app = FastAPIOffline(title="forcedphot", version=__version__, description=DESCRIPTION, lifespan=lifespan,
                         static_url=dashboard.DOCS_STATIC, redoc_url=None)  # /redoc: routes/dashboard.py
    app.state.runtime = runtime
    install_problem_handlers(app)
    app.add_exception_handler(ClientGone, _client_gone)
    app.add_middleware(BodyLimitMiddleware, limits=BodyLimits(settings.max_body_bytes, settings.max_json_body_bytes, settings.json_values_limit))
    app.add_middleware(MetricsMiddleware, metrics=runtime.metrics)
    app.add_middleware(ShutdownAnswerMiddleware, retry_after_seconds=settings.retry_after_seconds)  # outermost
    for module in (operations, photometry, lightcurves, stamps, jobs, dashboard):
        app.include_router(module.router)
    dashboard.mount_static(app)
    _install_openapi(app)
    return app


async def _client_gone(request: Request, exc: ClientGone) -> Response:
    """Nobody reads this answer: the client left and its measurement was stopped."""
    return Response(status_code=CLIENT_CLOSED_REQUEST)


def _install_openapi(app: FastAPI) -> None:
    """The generated schema, plus the forced-photometry body the route parses itself."""

    def build() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        photometry.describe_body(schema, MeasureRequest.model_json_schema(ref_template="#/components/schemas/{model}"))
        components = schema["components"]["schemas"]
        for model in (LightCurveRequest, JobRequest):  # routes that parse their JSON bodies themselves
            model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(model_schema.pop("$defs", {}))
            components[model.__name__] = model_schema
        app.openapi_schema = schema
        return schema

    app.openapi = build  # type: ignore[method-assign]
