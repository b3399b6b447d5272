"""ASGI middleware: requests cut off by the server's shutdown are answered 503, not 500.

When the graceful-shutdown period ends, uvicorn cancels the requests still running; a
request that had not begun its answer then got uvicorn's own ``text/plain`` 500. Here it
gets a problem+json 503 with Retry-After (another replica, or this one restarted, will
answer it), and the cancellation goes on.
"""

from __future__ import annotations

import asyncio
import contextlib

from forcedphot.api.problems import send_problem


class ShutdownAnswerMiddleware:
    """Answer 503 + Retry-After for a request cancelled before its answer began."""

    def __init__(self, app, retry_after_seconds: int):
        self.app, self.retry_after = app, str(max(1, retry_after_seconds))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except asyncio.CancelledError:
            if not started:
                with contextlib.suppress(Exception):
                    await send_problem(send, 503, "shutting-down", "the server is shutting down and stopped this request; retry it",
                                       scope.get("path", ""), {"Retry-After": self.retry_after})
            raise
