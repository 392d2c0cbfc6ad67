"""The request body size limit, as ASGI middleware (413 ``too_large`` above it)."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from captioning.serving.config import MB
from captioning.serving.errors import ApiError, error_response


class BodyTooLarge(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, "too_large", f"request body over the limit of {limit / MB:g} MB")


class BodySizeLimit:
    """Refuse bodies over ``max_bytes``: by Content-Length, else while reading a chunked body."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                await error_response(400, "bad_request", "invalid Content-Length")(
                    scope, receive, send
                )
                return
            if too_big:
                e = BodyTooLarge(self.max_bytes)
                await error_response(e.status, e.code, e.detail)(scope, receive, send)
                return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # a chunked upload without Content-Length
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)
