"""Batch jobs under ``/v1/jobs``: submit (idempotent), poll, fetch the result, delete."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from forcedphot.api.dependencies import (AUTH, CATALOG_RESPONSE, Caller, OutputFormat, Runtime, json_body, json_request_body, problems,
                                        run_measurement)
from forcedphot.api.problems import Problem
from forcedphot.api.schemas import JobList, JobRequest, JobStatus
from forcedphot.api.runtime import ServiceRuntime
from forcedphot.photometry.catalog_files import STREAMED_FORMATS, convert
from forcedphot.photometry.formats import FORMATS
from forcedphot.serving.job_store import Job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=AUTH)
IdempotencyKey = Annotated[str | None, Header(min_length=1, max_length=255, pattern=r"^[\x21-\x7e]+$")]


@router.post("", status_code=202, response_model=JobStatus,
             responses={200: {"description": "an earlier job with this Idempotency-Key"},
                        **problems(400, 401, 403, 404, 408, 413, 422, 429, 503)},
             openapi_extra=json_request_body(JobRequest))
async def submit_job(request: Request, response: Response, runtime: Runtime, caller: Caller,
                     idempotency_key: IdempotencyKey = None) -> JobStatus:
    """Queue a batch job: many exposures, one object table. A repeated Idempotency-Key returns the same job."""
    job = await json_body(request, runtime, JobRequest)
    intake = runtime.intake()
    accepted, created = await run_in_threadpool(runtime.submit_job, intake, job, idempotency_key, caller)
    response.status_code = 202 if created else 200
    response.headers["Location"] = f"/v1/jobs/{accepted.id}"
    return accepted.status()


@router.get("", response_model=JobList, responses=problems(401, 422))
async def list_jobs(runtime: Runtime, caller: Caller, request: Request,
                    limit: Annotated[int, Query(ge=1, le=100, description="jobs per page")] = 20,
                    page: Annotated[int, Query(ge=1, le=10_000, description="page, from 1")] = 1) -> JobList:
    """The caller's jobs (those its API key submitted), newest first, a page at a time."""
    jobs = await run_in_threadpool(runtime.jobs.of_client, caller, limit=limit + 1, offset=(page - 1) * limit)
    following = f"{request.url.path}?limit={limit}&page={page + 1}" if len(jobs) > limit else None
    return JobList(jobs=[job.status() for job in jobs[:limit]], next=following)


@router.get("/{job_id}", response_model=JobStatus, responses=problems(401, 404))
async def job_status(job_id: str, runtime: Runtime, caller: Caller) -> JobStatus:
    """State, progress and errors of one of the caller's jobs."""
    return (await run_in_threadpool(runtime.job, job_id, caller)).status()


@router.get("/{job_id}/result", response_class=Response, responses={200: CATALOG_RESPONSE, **problems(401, 404, 406, 409, 413, 429, 503, 504)})
async def job_result(job_id: str, request: Request, runtime: Runtime, caller: Caller, fmt: OutputFormat) -> Response:
    """The catalog of one of the caller's succeeded jobs (parquet, or another format by
    Accept: encoded once, at the first fetch, then served from disk)."""
    job = await run_in_threadpool(runtime.job, job_id, caller)
    if job.state != "succeeded":
        detail = f"job {job_id} is {job.state}" + ("; poll GET /v1/jobs/" + job_id if job.state != "failed" else "")
        raise Problem(409, f"job-{job.state}", detail, errors=job.errors,
                      headers={"Retry-After": runtime.retry_after()} if job.state != "failed" else None)
    path = runtime.jobs.result_path(job.id, job.attempts, fmt)
    if not path.exists():
        await _encode(request, runtime, job, fmt, path)
    return FileResponse(path, media_type=FORMATS[fmt], filename=f"{job_id}.{fmt}")


_ENCODING: dict[Path, asyncio.Lock] = {}  # one encoding of a result per format at a time; later fetches wait for it


async def _encode(request: Request, runtime: ServiceRuntime, job: Job, fmt: str, path: Path) -> None:
    """Write the job's result in ``fmt`` beside its parquet catalog, once: as a measurement
    (a slot, the time budget, a measurement process where there are some)."""
    if fmt not in STREAMED_FORMATS and (job.rows or 0) > runtime.settings.max_table_encode_rows:
        raise Problem(413, "result-too-large", f"job {job.id} has {job.rows} rows; {fmt} is written from the whole table, "
                      f"at most {runtime.settings.max_table_encode_rows} rows: ask for parquet, CSV, ECSV or JSON")
    lock = _ENCODING.setdefault(path, asyncio.Lock())
    try:
        async with lock:
            if path.exists():
                return
            await run_measurement(request, runtime, lambda: runtime.service.call(
                convert, runtime.jobs.result_path(job.id, job.attempts), fmt, path,
                what=f"encoding the result as {fmt}", advice="fetch it as parquet",
                time_limit=runtime.settings.result_encode_seconds))
    finally:
        if not lock.locked():
            _ENCODING.pop(path, None)


@router.delete("/{job_id}", status_code=204, response_class=Response, responses=problems(401, 404))
async def delete_job(job_id: str, runtime: Runtime, caller: Caller) -> Response:
    """Cancel one of the caller's jobs if it is queued or running, and delete it with its result."""
    await run_in_threadpool(runtime.delete_job, job_id, caller)
    return Response(status_code=204)


