"""FastAPI dependencies shared by the routes: the runtime, API keys, measurement slots and
the answer's format."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPBearer

from forcedphot.api.negotiation import choose_format
from forcedphot.api.problems import PROBLEM_MEDIA_TYPE, Problem
from forcedphot.api.runtime import ServiceRuntime
from forcedphot.photometry.formats import FORMATS

_bearer = HTTPBearer(auto_error=False, description="an API key (not needed in demo mode)")

#: OpenAPI response descriptions: a problem document, and the catalog in every format
PROBLEM_RESPONSE = {"content": {PROBLEM_MEDIA_TYPE: {}}}
CATALOG_RESPONSE = {"content": {media_type: {} for media_type in FORMATS.values()}, "description": "the DiaForcedSource catalog"}


def problems(*codes: int) -> dict[int, dict]:
    """OpenAPI ``responses`` entries for these status codes, each a problem document."""
    return {code: PROBLEM_RESPONSE for code in codes}


def _runtime(request: Request) -> ServiceRuntime:
    return request.app.state.runtime


Runtime = Annotated[ServiceRuntime, Depends(_runtime)]


def authorised(request: Request, runtime: Runtime, _credentials=Security(_bearer)) -> None:
    """401 unless the request carries an accepted API key (demo mode accepts all)."""
    runtime.keys.check(request.headers.get("authorization"))


AUTH = [Depends(authorised)]


async def measurement_slot(runtime: Runtime):
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


def output_format(request: Request) -> str:
    """The catalog format the ``Accept`` header asks for, else 406."""
    fmt = choose_format(request.headers.get("accept"))
    if fmt is None:
        raise Problem(406, "not-acceptable", f"cannot answer with {request.headers.get('accept')!r}; "
                                             f"accept one of {', '.join(FORMATS.values())}")
    return fmt


OutputFormat = Annotated[str, Depends(output_format)]
