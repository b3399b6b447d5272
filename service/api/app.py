"""The FastAPI application: thin routes over :class:`~forcedphot.api.runtime.ServiceRuntime`.

``create_app(settings)`` builds one application. Endpoints: ``POST /v1/forced-photometry``
(one exposure, JSON references or multipart uploads, catalog by ``Accept``), batch jobs
under ``/v1/jobs``, ``/healthz``, ``/readyz``, ``/metrics``, ``/v1/info``, docs at ``/docs``.
Every error is problem+json (:mod:`forcedphot.api.problems`).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path
import time
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request, Response, Security
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse
from fastapi.security import HTTPBearer
import pyarrow.parquet as pq
from starlette.concurrency import run_in_threadpool

from forcedphot.api.body_limit import BodyLimitMiddleware
from forcedphot.api.intake import remove_uploads
from forcedphot.api.metrics import MetricsMiddleware
from forcedphot.api.negotiation import choose_format
from forcedphot.api.problems import PROBLEM_MEDIA_TYPE, Problem, install_problem_handlers
from forcedphot.api.runtime import ServiceRuntime
from forcedphot.api.schemas import Health, JobRequest, JobStatus, MeasureRequest
from forcedphot.api.settings import Settings, load_settings
from forcedphot.photometry.config import MeasurementConfig
from forcedphot.photometry.formats import FORMATS, encode_catalog, read_provenance
from forcedphot.serving.executor import MeasureOutcome
from forcedphot.version import __version__

DESCRIPTION = """Forced photometry of DiaObjects on LSST-style exposures.

Send one exposure (a repository reference or an uploaded FITS file) and a DiaObject
table; get the DiaForcedSource catalog as parquet (default), JSON or CSV by `Accept`.
Larger work goes to batch jobs. Errors are RFC 9457 problem+json."""

_bearer = HTTPBearer(auto_error=False, description="an API key (not needed in demo mode)")
_PROBLEM = {"content": {PROBLEM_MEDIA_TYPE: {}}}
_CATALOG = {"content": {media_type: {} for media_type in FORMATS.values()}, "description": "the DiaForcedSource catalog"}
_MULTIPART_SCHEMA = {
    "type": "object",
    "properties": {
        "exposure": {"type": "string", "format": "binary", "description": "science exposure, FITS"},
        "exposure_ref": {"type": "string", "description": "or a JSON reference to it, e.g. {\"uri\": \"...\"}"},
        "difference": {"type": "string", "format": "binary", "description": "difference image, FITS"},
        "difference_ref": {"type": "string", "description": "or a JSON reference to it"},
        "objects": {"type": "string", "format": "binary", "description": "DiaObject table: parquet, CSV or JSON"},
        "objects_ref": {"type": "string", "description": "or a JSON {\"uri\": ...} to a table in the repository"},
        "psf_fwhm": {"type": "number", "description": "Gaussian PSF FWHM, pixels"},
        "apertures": {"type": "string", "description": "aperture radii in pixels, comma-separated"},
        "include_offimage": {"type": "boolean"},
    },
}


def _runtime(request: Request) -> ServiceRuntime:
    return request.app.state.runtime


Runtime = Annotated[ServiceRuntime, Depends(_runtime)]


def _authorised(request: Request, runtime: Runtime, _credentials=Security(_bearer)) -> None:
    runtime.keys.check(request.headers.get("authorization"))


async def _measurement_slot(runtime: Runtime):
    """One of ``max_concurrent_requests`` measurement slots, else 429 with Retry-After."""
    if runtime.in_flight >= runtime.settings.max_concurrent_requests:
        raise Problem(429, "too-many-requests",
                      f"{runtime.settings.max_concurrent_requests} measurements are in flight already; retry shortly",
                      headers={"Retry-After": str(runtime.settings.retry_after_seconds)})
    runtime.in_flight += 1
    try:
        yield
    finally:
        runtime.in_flight -= 1


def _format(request: Request) -> str:
    fmt = choose_format(request.headers.get("accept"))
    if fmt is None:
        raise Problem(406, "not-acceptable", f"cannot answer with {request.headers.get('accept')!r}; "
                                             f"accept one of {', '.join(FORMATS.values())}")
    return fmt


def _measurement_headers(outcome: MeasureOutcome, parse_seconds: float, encode_seconds: float) -> dict[str, str]:
    m = outcome.measurement
    timings = {"parse": parse_seconds, **outcome.timings(), "encode": encode_seconds}
    return {
        "X-Objects-In": str(m.n_input),
        "X-Objects-Measured": str(m.n_on_detector),
        "X-Objects-Off-Detector": str(m.n_off_detector),
        "X-Objects-Invalid-Coordinates": str(m.n_invalid_coords),
        "X-Objects-Flagged": str(m.n_flagged),
        "X-Backend": m.backend,
        "X-Exposure-Cache": outcome.cache,
        "Server-Timing": ", ".join(f"{name};dur={seconds * 1e3:.2f}" for name, seconds in timings.items()),
    }


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

    app = FastAPI(title="forcedphot", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.runtime = runtime
    install_problem_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=runtime.metrics)
    _install_openapi(app)
    auth = [Depends(_authorised)]

    @app.get("/healthz", response_model=Health, tags=["operations"])
    async def healthz() -> Health:
        """The process is alive (answers while measurements run)."""
        return Health(status="ok")

    @app.get("/readyz", response_model=Health, responses={503: _PROBLEM}, tags=["operations"])
    async def readyz(runtime: Runtime) -> Health:
        """Backend initialised, repository readable, job store usable."""
        failing = await run_in_threadpool(runtime.problems)
        if failing:
            raise Problem(503, "not-ready", "; ".join(failing.values()), checks=failing,
                          headers={"Retry-After": str(max(1, runtime.settings.retry_after_seconds))})
        return Health(status="ready", checks={"backend": f"{runtime.backend.name}:{runtime.backend.device}",
                                              "repository": "ok", "jobs": "ok"})

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def metrics(runtime: Runtime) -> Response:
        """Prometheus metrics."""
        body, media_type = await run_in_threadpool(runtime.metrics.render)
        return Response(body, media_type=media_type)

    @app.get("/v1/info", dependencies=auth, responses={401: _PROBLEM}, tags=["operations"])
    async def info(runtime: Runtime) -> dict[str, Any]:
        """Version, backend and device, settings (without secrets), demo data ids."""
        body: dict[str, Any] = {
            "name": "forcedphot",
            "version": __version__,
            "backend": {"name": runtime.backend.name, "device": runtime.backend.device},
            "measure_processes": runtime.service.processes,  # 0: requests are measured in threads
            "settings": settings.public(),
            "measurement_defaults": MeasurementConfig().model_dump(mode="json"),
            "formats": FORMATS,
        }
        if settings.demo_mode:
            body["demo"] = [{"visit": v.visit, "detector": v.detector, "objects": f"{v.visit}/{v.detector}/diaObjects.parquet"}
                            for v in runtime.demo_visits]
        return body

    @app.post("/v1/forced-photometry", dependencies=auth, tags=["measure"], response_class=Response,
              responses={200: _CATALOG, **{code: _PROBLEM for code in (400, 401, 403, 404, 406, 413, 415, 422, 429, 503)}})
    async def forced_photometry(request: Request, runtime: Runtime, _slot: None = Depends(_measurement_slot)) -> Response:
        """Measure DiaObjects on one exposure (JSON with references, or multipart uploads)."""
        fmt = _format(request)
        intake = runtime.intake()
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        start = time.perf_counter()
        uploads = []
        try:
            if media_type == "application/json":
                body = await request.body()
                task = await run_in_threadpool(intake.from_json, body)
            elif media_type == "multipart/form-data":
                async with request.form(max_files=3, max_fields=16) as form:
                    task, uploads = await run_in_threadpool(intake.from_form, form)
            else:
                raise Problem(415, "unsupported-media-type",
                              f"send application/json (references) or multipart/form-data (uploads), not {media_type or 'no Content-Type'!r}")
            parse_seconds = time.perf_counter() - start
            outcome, content, encode_seconds = await runtime.service.measure_encoded(task, fmt)
        finally:
            if uploads:
                await run_in_threadpool(remove_uploads, uploads)
        runtime.metrics.objects.inc(outcome.measurement.n_on_detector)
        for stage, seconds in outcome.timings().items():
            runtime.metrics.measure_seconds.labels(stage).observe(seconds)
        return Response(content, media_type=FORMATS[fmt], headers=_measurement_headers(outcome, parse_seconds, encode_seconds))

    @app.post("/v1/jobs", dependencies=auth, status_code=202, response_model=JobStatus, tags=["jobs"],
              responses={200: {"description": "an earlier job with this Idempotency-Key"},
                         **{code: _PROBLEM for code in (400, 401, 403, 404, 413, 422, 429, 503)}})
    async def submit_job(job: JobRequest, response: Response, runtime: Runtime,
                         idempotency_key: Annotated[str | None, Header(min_length=1, max_length=255, pattern=r"^[\x21-\x7e]+$")] = None) -> JobStatus:
        """Queue a batch job: many exposures, one object table. A repeated Idempotency-Key returns the same job."""
        intake = runtime.intake()
        accepted, created = await run_in_threadpool(runtime.submit_job, intake, job, idempotency_key)
        response.status_code = 202 if created else 200
        response.headers["Location"] = f"/v1/jobs/{accepted.id}"
        return accepted.status()

    @app.get("/v1/jobs/{job_id}", dependencies=auth, response_model=JobStatus, tags=["jobs"], responses={404: _PROBLEM})
    async def job_status(job_id: str, runtime: Runtime) -> JobStatus:
        """State, progress and errors of a job."""
        return (await run_in_threadpool(runtime.job, job_id)).status()

    @app.get("/v1/jobs/{job_id}/result", dependencies=auth, tags=["jobs"], response_class=Response,
             responses={200: _CATALOG, 404: _PROBLEM, 406: _PROBLEM, 409: _PROBLEM})
    async def job_result(job_id: str, request: Request, runtime: Runtime) -> Response:
        """The catalog of a succeeded job (parquet, or JSON/CSV by Accept)."""
        fmt = _format(request)
        job = await run_in_threadpool(runtime.job, job_id)
        if job.state != "succeeded":
            detail = f"job {job_id} is {job.state}" + ("; poll GET /v1/jobs/" + job_id if job.state != "failed" else "")
            raise Problem(409, f"job-{job.state}", detail, errors=job.errors,
                          headers={"Retry-After": str(max(1, runtime.settings.retry_after_seconds))} if job.state != "failed" else None)
        path = runtime.jobs.result_path(job_id)
        if fmt == "parquet":
            return FileResponse(path, media_type=FORMATS[fmt], filename=f"{job_id}.parquet")
        content = await run_in_threadpool(_reencode, path, fmt)
        return Response(content, media_type=FORMATS[fmt])

    @app.delete("/v1/jobs/{job_id}", dependencies=auth, status_code=204, response_class=Response, tags=["jobs"],
                responses={404: _PROBLEM})
    async def delete_job(job_id: str, runtime: Runtime) -> Response:
        """Cancel a job if it is queued or running, and delete it with its result."""
        await run_in_threadpool(runtime.delete_job, job_id)
        return Response(status_code=204)

    return app


def _reencode(path: Path, fmt: str) -> bytes:
    """A stored parquet catalog in another format."""
    return encode_catalog(pq.read_table(path), read_provenance(path), fmt)


def _install_openapi(app: FastAPI) -> None:
    """Describe the forced-photometry body (JSON or multipart), which the route parses itself."""

    def build() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        request_schema = MeasureRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(request_schema.pop("$defs", {}))
        components["MeasureRequest"] = request_schema
        components["MeasureUpload"] = _MULTIPART_SCHEMA
        schema["paths"]["/v1/forced-photometry"]["post"]["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/MeasureRequest"}},
                "multipart/form-data": {"schema": {"$ref": "#/components/schemas/MeasureUpload"}},
            },
        }
        app.openapi_schema = schema
        return schema

    app.openapi = build  # type: ignore[method-assign]

