"""Light curves: ``GET /v1/exposures`` (what covers a position), ``POST /v1/lightcurves``
(measure objects on every covering exposure), ``POST /v1/index/refresh``."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from forcedphot.api.dependencies import AUTH, CATALOG_RESPONSE, Caller, OutputFormat, Runtime, json_body, json_request_body, problems, run_measurement
from forcedphot.api.routes.jobs import IdempotencyKey
from forcedphot.api.schemas import LightCurveRequest
from forcedphot.photometry.formats import FORMATS, encode_catalog
from forcedphot.photometry.lightcurve_products import make_products

router = APIRouter(tags=["light curves"], dependencies=AUTH)


@router.get("/v1/exposures", responses=problems(401, 422, 503))
async def exposures(runtime: Runtime,
                    ra: Annotated[float, Query(ge=0, lt=360, allow_inf_nan=False, description="ICRS right ascension, deg")],
                    dec: Annotated[float, Query(ge=-90, le=90, allow_inf_nan=False, description="ICRS declination, deg")],
                    radius: Annotated[float, Query(ge=0, le=10, allow_inf_nan=False, description="search radius, deg")] = 0.0,
                    band: Annotated[list[str] | None, Query(description="only these bands (repeat)")] = None,
                    mjd_min: Annotated[float | None, Query(allow_inf_nan=False, description="earliest midpoint, MJD (TAI)")] = None,
                    mjd_max: Annotated[float | None, Query(allow_inf_nan=False, description="latest midpoint, MJD (TAI)")] = None,
                    ) -> dict[str, Any]:
    """Exposures whose footprint holds (ra, dec), or comes within ``radius``; by time."""
    index = runtime.ready_index()
    found = await run_in_threadpool(index.covering, ra, dec, radius_deg=radius, bands=band, mjd_min=mjd_min, mjd_max=mjd_max)
    return {"count": len(found), "exposures": [e.describe() for e in found]}


@router.post("/v1/index/refresh", responses=problems(401, 503))
async def refresh_index(runtime: Runtime) -> dict[str, Any]:
    """Index new and changed files of the repository now (also done at start)."""
    report = await run_in_threadpool(runtime.refresh_index)
    return {"exposures": runtime.index.count(), "added": report.added, "updated": report.updated, "removed": report.removed,
            "unchanged": report.unchanged, "unreadable": report.unreadable, "seconds": round(report.seconds, 3)}


@router.post("/v1/lightcurves", response_class=Response,
             responses={200: CATALOG_RESPONSE, 202: {"description": "too large to answer at once: accepted as a job (see Location)"},
                        **problems(400, 401, 404, 406, 408, 413, 422, 429, 503, 504)},
             openapi_extra=json_request_body(LightCurveRequest))
async def lightcurves(request: Request, runtime: Runtime, fmt: OutputFormat, caller: Caller, idempotency_key: IdempotencyKey = None) -> Response:
    """Light curves: every (object, covering exposure) pair measured as ``/v1/forced-photometry``
    does (difference image, and the science image for scienceFlux), one table sorted by
    diaObjectId then time. More than ``max_lightcurve_pairs`` pairs becomes a job (202)."""
    start = time.perf_counter()
    query = await json_body(request, runtime, LightCurveRequest)
    intake = runtime.intake()
    task = await run_in_threadpool(runtime.plan_lightcurves, intake, query)
    pairs = sum(len(epoch.rows) for epoch in task.epochs)
    if pairs > runtime.settings.max_lightcurve_pairs:
        job, created = await run_in_threadpool(runtime.submit_lightcurve_job, task, query, idempotency_key, caller)
        return Response(job.status().model_dump_json(), status_code=202 if created else 200, media_type="application/json",
                        headers={"Location": f"/v1/jobs/{job.id}", "X-Pairs": str(pairs)})
    plan_seconds = time.perf_counter() - start
    result = await run_measurement(request, runtime, lambda: runtime.service.measure_lightcurves(task))
    started = time.perf_counter()
    table, products = await run_in_threadpool(make_products, result.table, query.products())
    content = await run_in_threadpool(encode_catalog, table, {"lightcurves": result.provenance, "errors": result.errors,
                                                              "products": products}, fmt)
    timings = {"plan": plan_seconds, **result.timings, "encode": time.perf_counter() - started}
    runtime.metrics.objects.inc(result.table.num_rows)
    headers = {"X-Epochs": str(len(task.epochs)), "X-Pairs": str(pairs), "X-Measurements": str(result.table.num_rows),
               "X-Epochs-Failed": str(len(result.errors)),
               "Server-Timing": ", ".join(f"{name};dur={seconds * 1e3:.2f}" for name, seconds in timings.items())}
    if not task.epochs:
        headers["X-Note"] = NOTHING_COVERS
    return Response(content, media_type=FORMATS[fmt], headers=headers)


NOTHING_COVERS = "no exposure covers these objects (in this time range and these bands): the table is empty"

