"""Batch jobs under ``/v1/jobs``: submit (idempotent), poll, fetch the result, delete."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import FileResponse
import pyarrow.parquet as pq
from starlette.concurrency import run_in_threadpool

from forcedphot.api.dependencies import AUTH, CATALOG_RESPONSE, Caller, OutputFormat, Runtime, json_body, json_request_body, problems
from forcedphot.api.problems import Problem
from forcedphot.api.schemas import JobList, JobRequest, JobStatus
from forcedphot.photometry.formats import FORMATS, encode_catalog, read_provenance

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
async def job_status(job_id: str, runtime: Runtime) -> JobStatus:
    """State, progress and errors of a job."""
    return (await run_in_threadpool(runtime.job, job_id)).status()


@router.get("/{job_id}/result", response_class=Response, responses={200: CATALOG_RESPONSE, **problems(401, 404, 406, 409)})
async def job_result(job_id: str, runtime: Runtime, fmt: OutputFormat) -> Response:
    """The catalog of a succeeded job (parquet, or JSON/CSV by Accept)."""
    job = await run_in_threadpool(runtime.job, job_id)
    if job.state != "succeeded":
        detail = f"job {job_id} is {job.state}" + ("; poll GET /v1/jobs/" + job_id if job.state != "failed" else "")
        raise Problem(409, f"job-{job.state}", detail, errors=job.errors,
                      headers={"Retry-After": runtime.retry_after()} if job.state != "failed" else None)
    path = runtime.jobs.result_path(job_id)
    if fmt == "parquet":
        return FileResponse(path, media_type=FORMATS[fmt], filename=f"{job_id}.parquet")
    content = await run_in_threadpool(_reencode, path, fmt)
    return Response(content, media_type=FORMATS[fmt])


@router.delete("/{job_id}", status_code=204, response_class=Response, responses=problems(401, 404))
async def delete_job(job_id: str, runtime: Runtime) -> Response:
    """Cancel a job if it is queued or running, and delete it with its result."""
    await run_in_threadpool(runtime.delete_job, job_id)
    return Response(status_code=204)


def _reencode(path: Path, fmt: str) -> bytes:
    """A stored parquet catalog in another format."""
    return encode_catalog(pq.read_table(path), read_provenance(path), fmt)
