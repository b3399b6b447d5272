"""ASGI middleware bounding request bodies before the application parses them.

Every body is bounded in bytes (413 from Content-Length, or while streaming). A JSON body
is bounded tighter, in bytes and in values: parsed, it costs up to 40 times its size (a
Python object per value), so the values are counted chunk by chunk as the body streams in
(:func:`~forcedphot.photometry.table_limits.json_values`: an upper bound, no parse), and a
body past either bound is refused before any route sees it.
"""

from __future__ import annotations

from dataclasses import dataclass

from forcedphot.api.problems import Problem, send_problem
from forcedphot.photometry.table_limits import json_values

TOO_LARGE = "content-too-large"  # the one slug of a 413 for a body, announced or streamed


class BodyTooLarge(Problem):
    """Raised from ``receive`` once a streamed body passes a limit (rendered as 413)."""

    def __init__(self, detail: str):
        super().__init__(413, TOO_LARGE, detail)


@dataclass(frozen=True)
class BodyLimits:
    """Bytes any body may have; bytes and values (keys included) a JSON body may have."""

    max_bytes: int
    max_json_bytes: int
    max_json_values: int


def _is_json(headers: dict[bytes, bytes]) -> bool:
    media_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
    return media_type == b"application/json" or media_type.endswith(b"+json")


class BodyLimitMiddleware:
    """Refuse bodies over the limits: at once from Content-Length, else while streaming."""

    def __init__(self, app, limits: BodyLimits):
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        is_json = _is_json(headers)
        max_bytes = min(self.limits.max_bytes, self.limits.max_json_bytes) if is_json else self.limits.max_bytes
        what = "a JSON request body" if is_json else "the request body"
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > max_bytes):
            status = 413 if length.isdigit() else 400
            detail = (f"{what} ({int(length)} bytes) is larger than the {max_bytes} bytes allowed"
                      if status == 413 else "the Content-Length header is not a number")
            await send_problem(send, status, TOO_LARGE if status == 413 else "bad-request", detail, scope.get("path", ""))
            return
        received = values = 0

        async def limited_receive():
            nonlocal received, values
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > max_bytes:
                    raise BodyTooLarge(f"{what} is larger than the {max_bytes} bytes allowed")
                if is_json:
                    values += json_values(chunk) - 1
                    if values > self.limits.max_json_values:
                        raise BodyTooLarge(f"the JSON body holds more than the {self.limits.max_json_values} values allowed "
                                           "(keys included); send large object tables as parquet (multipart) or submit a job")
            return message

        await self.app(scope, limited_receive, send)
