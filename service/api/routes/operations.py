"""Operations: liveness, readiness, Prometheus metrics and a description of the service."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from starlette.concurrency import run_in_threadpool

from forcedphot.api.dependencies import AUTH, Runtime, problems
from forcedphot.api.problems import Problem
from forcedphot.api.schemas import Health
from forcedphot.photometry.config import MeasurementConfig
from forcedphot.photometry.formats import FORMATS
from forcedphot.photometry.lightcurve_products import EPOCH_STATUS
from forcedphot.version import __version__

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is alive (answers while measurements run)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses=problems(503))
async def readyz(runtime: Runtime) -> Health:
    """Backend initialised, repository readable, job store usable (200 "degraded" when it
    cannot be written: new jobs are refused, everything else works)."""
    failing = await run_in_threadpool(runtime.problems)
    if failing:
        raise Problem(503, "not-ready", "; ".join(failing.values()), checks=failing,
                      headers={"Retry-After": runtime.retry_after()})
    degraded = await run_in_threadpool(runtime.degraded)
    return Health(status="degraded" if degraded else "ready",
                  checks={"backend": f"{runtime.backend.name}:{runtime.backend.device}", "repository": "ok", "jobs": "ok", **degraded})


# HEAD answers as GET without the body (load balancers probe with it)
router.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)
router.add_api_route("/readyz", readyz, methods=["HEAD"], include_in_schema=False)


@router.get("/metrics", response_class=Response)
async def metrics(runtime: Runtime) -> Response:
    """Prometheus metrics."""
    body, media_type = await run_in_threadpool(runtime.metrics.render)
    return Response(body, media_type=media_type)


@router.get("/v1/info", dependencies=AUTH, responses=problems(401))
async def info(runtime: Runtime) -> dict[str, Any]:
    """Version, backend and device, settings (without secrets), demo data ids."""
    settings = runtime.settings
    body: dict[str, Any] = {
        "name": "forcedphot",
        "version": __version__,
        "backend": {"name": runtime.backend.name, "device": runtime.backend.device},
        "measure_processes": runtime.service.processes,  # 0: requests are measured in threads
        "settings": settings.public(),
        "measurement_defaults": MeasurementConfig().model_dump(mode="json"),
        "formats": FORMATS,
        "index": {"exposures": runtime.index.count()},
        "epoch_status": {str(code): text for code, text in EPOCH_STATUS.items()},  # light curves' epochStatus codes
    }
    if settings.demo_mode:
        body["demo_repository"] = runtime.demo_state()
        body["demo"] = [{"visit": v.visit, "detector": v.detector, "objects": f"{v.visit}/{v.detector}/diaObjects.parquet"}
                        for v in runtime.demo_visits]
    return body
