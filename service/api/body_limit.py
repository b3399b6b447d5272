"""ASGI middleware bounding request bodies: larger than the limit is 413, before or while reading."""

from __future__ import annotations

import json

from forcedphot.api.problems import PROBLEM_MEDIA_TYPE, Problem, problem_body

TOO_LARGE = "content-too-large"  # the one slug of a 413 for a body, announced or streamed


class BodyTooLarge(Problem):
    """Raised from ``receive`` once a streamed body passes the limit (rendered as 413)."""

    def __init__(self, limit: int):
        super().__init__(413, TOO_LARGE, f"the request body is larger than the {limit} bytes allowed")


class BodyLimitMiddleware:
    """Refuse bodies over ``max_bytes``: at once from Content-Length, else while streaming."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            status = 413 if length.isdigit() else 400
            detail = (f"the request body ({int(length)} bytes) is larger than the {self.max_bytes} bytes allowed"
                      if status == 413 else "the Content-Length header is not a number")
            await _send_problem(send, status, TOO_LARGE if status == 413 else "bad-request", detail, scope.get("path", ""))
            return
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)


async def _send_problem(send, status: int, slug: str, detail: str, path: str) -> None:
    body = json.dumps(problem_body(status, slug, detail, path)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", PROBLEM_MEDIA_TYPE.encode()), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
