"""FastAPI dependencies shared by the routes: the runtime, API keys, measurement slots and
the answer's format."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
import contextlib
from contextlib import asynccontextmanager
from typing import Annotated, TypeVar

from fastapi import Depends, Request, Security
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ValidationError

from forcedphot.api.negotiation import choose_format
from forcedphot.api.problems import PROBLEM_MEDIA_TYPE, Problem, invalid_request
from forcedphot.api.runtime import ServiceRuntime
from forcedphot.photometry.formats import FORMATS

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
_bearer = HTTPBearer(auto_error=False, description="an API key (not needed in demo mode)")

#: OpenAPI response descriptions: a problem document, and the catalog in every format
PROBLEM_RESPONSE = {"content": {PROBLEM_MEDIA_TYPE: {}}}
CATALOG_RESPONSE = {"content": {media_type: {} for media_type in FORMATS.values()}, "description": "the DiaForcedSource catalog"}


def problems(*codes: int) -> dict[int, dict]:
    """OpenAPI ``responses`` entries for these status codes, each a problem document."""
    return {code: PROBLEM_RESPONSE for code in codes}


# The dependencies are coroutines although none awaits anything: FastAPI runs a plain
# function in a worker thread, a hop that cost ~0.15 ms of the server's CPU each.


async def _runtime(request: Request) -> ServiceRuntime:
    return request.app.state.runtime


Runtime = Annotated[ServiceRuntime, Depends(_runtime)]


async def authorised(request: Request, runtime: Runtime, _credentials=Security(_bearer)) -> str:
    """The caller's identity; 401 unless the request carries an accepted API key (demo mode accepts all)."""
    return runtime.keys.check(request.headers.get("authorization"))


AUTH = [Depends(authorised)]
Caller = Annotated[str, Depends(authorised)]


@asynccontextmanager
async def measurement_slot(runtime: ServiceRuntime):
    """Hold one of ``max_concurrent_requests`` measurement slots, else 429 with a
    Retry-After spread over callers (see :meth:`ServiceRuntime.retry_after`). Taken only
    once the request body has been read, so slow senders hold no slot."""
    if runtime.in_flight >= runtime.settings.max_concurrent_requests:
        raise Problem(429, "too-many-requests",
                      f"{runtime.settings.max_concurrent_requests} measurements are in flight already; retry shortly",
                      headers={"Retry-After": runtime.retry_after()})
    runtime.in_flight += 1
    try:
        yield
    finally:
        runtime.in_flight -= 1


async def within_body_timeout(runtime: ServiceRuntime, receiving: Awaitable[T]) -> T:
    """Await the reading of a request body, at most ``body_timeout_seconds``, else 408."""
    limit = runtime.settings.body_timeout_seconds
    try:
        return await asyncio.wait_for(receiving, limit)
    except TimeoutError:
        raise Problem(408, "body-timeout", f"the request body did not arrive within {limit:g} s") from None


async def json_body(request: Request, runtime: ServiceRuntime, model: type[M]) -> M:
    """The request's JSON body as ``model``: read within the body timeout (and the body
    limits of :mod:`forcedphot.api.body_limit`), parsed by pydantic straight from the bytes."""
    body = await within_body_timeout(runtime, request.body())
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise invalid_request(exc.errors(include_url=False), ("body",)) from None


def json_request_body(model: type[BaseModel]) -> dict:
    """``openapi_extra`` for a route that parses ``model`` from its JSON body itself."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


async def run_measurement(request: Request, runtime: ServiceRuntime, work: Callable[[], Awaitable[T]]) -> T:
    """Await ``work()`` holding a measurement slot; if the client leaves first, stop it and
    raise :class:`ClientGone` (answered 499 by the application)."""
    async with measurement_slot(runtime):
        try:
            return await unless_client_leaves(request, work())
        except ClientGone:
            runtime.metrics.abandoned.inc()
            raise


class ClientGone(Exception):
    """The client closed its connection before the answer was ready."""


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it (a measurement process
    running it is terminated) and raise :class:`ClientGone`.

    The body has been read, so the next ASGI message is ``http.disconnect``: the server
    sends it when the connection drops (no polling, which cost CPU with many requests in
    flight)."""
    working = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watching = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({working, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this request itself is cancelled (server shutdown)
        watching.cancel()
        if not working.done():
            working.cancel()
    if working in done:
        return working.result()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await working  # let the cancellation reach the measurement process
    raise ClientGone


async def output_format(request: Request) -> str:
    """The catalog format the ``Accept`` header asks for, else 406."""
    fmt = choose_format(request.headers.get("accept"))
    if fmt is None:
        raise Problem(406, "not-acceptable", f"cannot answer with {request.headers.get('accept')!r}; "
                                             f"accept one of {', '.join(FORMATS.values())}")
    return fmt


OutputFormat = Annotated[str, Depends(output_format)]
