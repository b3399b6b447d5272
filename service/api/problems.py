"""RFC 9457 problem details (``application/problem+json``) for every error the service returns.

A :class:`Problem` raised anywhere in a request becomes a response with ``type``,
``title``, ``status``, ``detail`` (naming what is wrong) and ``instance`` (the request
path). The engine's input errors (:class:`~forcedphot.photometry.objects.InputError`,
:class:`~forcedphot.photometry.exposure.ExposureError`, :class:`~forcedphot.photometry.psf_models.PsfError`)
and the repository's reference errors are mapped to 4xx problems here, in one place; a
measurement process that died mid-request is a 503 with ``Retry-After``.
"""

from __future__ import annotations

import errno
from http import HTTPStatus
import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from forcedphot.api.schemas import UNION_FIELDS, UNION_TAGS
from forcedphot.photometry.exposure import ExposureChanged, ExposureError
from forcedphot.photometry.objects import InputError
from forcedphot.photometry.psf_models import PsfError
from forcedphot.photometry.table_limits import TableTooLarge
from forcedphot.serving.apdb import ApdbUnavailable
from forcedphot.serving.executor import MeasurementProcessDied, MeasurementTimedOut
from forcedphot.serving.index import IndexUnavailable
from forcedphot.serving.job_store import DATABASE_ERRORS, StoreUnavailable, store_error_reason
from forcedphot.serving.repository import RepositoryError

PROBLEM_MEDIA_TYPE = "application/problem+json"
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)  # the server's disk, not the request
STORE_RETRY_SECONDS = 5
TYPE_PREFIX = "urn:forcedphot:problem:"
log = logging.getLogger("forcedphot.service")


class Problem(Exception):
    """An error answered as problem+json: ``slug`` names its type, ``detail`` the problem."""

    def __init__(self, status: int, slug: str, detail: str, *, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(detail)
        self.status, self.slug, self.detail = status, slug, detail
        self.headers = headers or {}
        self.extra = extra


def problem_body(status: int, slug: str, detail: str, instance: str | None = None, **extra: Any) -> dict[str, Any]:
    """The problem document as a dict."""
    body: dict[str, Any] = {
        "type": TYPE_PREFIX + slug,
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    if instance:
        body["instance"] = instance
    body.update(extra)
    return body


async def send_problem(send, status: int, slug: str, detail: str, path: str, headers: dict[str, str] | None = None) -> None:
    """Answer with a problem document straight through ASGI ``send`` (from middleware, where
    there is no response object), closing the connection."""
    body = json.dumps(problem_body(status, slug, detail, path)).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", PROBLEM_MEDIA_TYPE.encode()), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *extra]})
    await send({"type": "http.response.body", "body": body})


def problem_response(request: Request, problem: Problem) -> JSONResponse:
    """Render ``problem`` for ``request``."""
    body = problem_body(problem.status, problem.slug, problem.detail, request.url.path, **problem.extra)
    return JSONResponse(body, status_code=problem.status, headers=problem.headers, media_type=PROBLEM_MEDIA_TYPE)


def validation_errors(errors: list[dict[str, Any]], prefix: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Pydantic errors without the echoed input (it may be huge or not JSON-encodable), and
    without the tag pydantic puts in the location of a union's chosen form."""
    return [
        {"loc": [*prefix, *_without_tags([str(part) for part in error.get("loc", ())])], "msg": str(error.get("msg", "")),
         "type": str(error.get("type", ""))}
        for error in errors
    ]


def _without_tags(loc: list[str]) -> list[str]:
    """``objects.position.ra`` -> ``objects.ra`` (the forms of :data:`~forcedphot.api.schemas.UNION_FIELDS`)."""
    return [part for i, part in enumerate(loc) if not (0 < i < len(loc) - 1 and part in UNION_TAGS and loc[i - 1] in UNION_FIELDS)]


def invalid_request(errors: list[dict[str, Any]], prefix: tuple[str, ...] = ()) -> Problem:
    """422 for a request that does not match its schema; ``detail`` lists the first errors."""
    cleaned = validation_errors(errors, prefix)
    summary = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in cleaned[:5])
    more = f" ({len(cleaned)} errors in all)" if len(cleaned) > 5 else ""
    return Problem(422, "invalid-request", f"the request does not match its schema: {summary}{more}", errors=cleaned)


def from_exception(exc: Exception) -> Problem | None:
    """The problem for a known caller-side exception, else None."""
    if isinstance(exc, Problem):
        return exc
    if isinstance(exc, RepositoryError):
        return Problem(exc.status, exc.slug, str(exc))
    if isinstance(exc, TableTooLarge):
        return Problem(413, "table-too-large", str(exc))
    if isinstance(exc, InputError):
        return Problem(422, "invalid-objects", str(exc))
    if isinstance(exc, ExposureChanged):
        return Problem(409, "exposure-changed", str(exc), headers={"Retry-After": "1"})
    if isinstance(exc, ExposureError):
        return Problem(422, "unreadable-exposure", str(exc))
    if isinstance(exc, PsfError):
        return Problem(422, "invalid-psf", str(exc))
    if isinstance(exc, ValidationError):
        return invalid_request(exc.errors(include_url=False))
    if isinstance(exc, StoreUnavailable):
        return _unavailable("store-unavailable", f"the job store cannot take this now ({exc})")
    if isinstance(exc, ApdbUnavailable):
        return _unavailable("apdb-unavailable", str(exc))
    if isinstance(exc, IndexUnavailable):
        return _unavailable("index-unavailable", f"the exposure index cannot be read now ({exc})")
    if isinstance(exc, DATABASE_ERRORS):
        return _unavailable("store-unavailable", f"a database of the server cannot take this now ({store_error_reason(exc)})")
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        return _unavailable("storage-unavailable", f"the server's storage cannot take this now ({exc.strerror})")
    if isinstance(exc, MeasurementTimedOut):
        return Problem(504, "measurement-timed-out", str(exc))
    if isinstance(exc, MeasurementProcessDied):
        return Problem(503, "measurement-process-died", str(exc), headers={"Retry-After": "1"})
    return None


def _unavailable(slug: str, detail: str) -> Problem:
    """503 for a fault of the server's storage or databases: retry later."""
    return Problem(503, slug, f"{detail}; retry later", headers={"Retry-After": str(STORE_RETRY_SECONDS)})


def install_problem_handlers(app: FastAPI) -> None:
    """Answer every error with problem+json; unknown exceptions are logged and become 500."""

    async def on_problem(request: Request, exc: Exception) -> JSONResponse:
        problem = from_exception(exc)
        if problem is None:
            log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
            problem = Problem(500, "internal-error", "the server failed on this request; it has been logged")
        return problem_response(request, problem)

    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return problem_response(request, invalid_request(list(exc.errors())))

    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).description
        slug = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "-").replace("'", "")
        return problem_response(request, Problem(exc.status_code, slug, detail, headers=dict(exc.headers or {})))

    for kind in (Problem, RepositoryError, TableTooLarge, InputError, ExposureError, PsfError, ValidationError, MeasurementProcessDied, MeasurementTimedOut,
                 StoreUnavailable, IndexUnavailable, ApdbUnavailable, *DATABASE_ERRORS, OSError, Exception):
        app.add_exception_handler(kind, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
