"""What every request passes before a handler sees it: draining, the API key, the body limit
(by Content-Length, and by counting a chunked body's bytes), JSON content type, and
validation errors as OpenAI error bodies."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError

from shardinfer.serving.openai_schema import error_response

MAX_BODY_BYTES = 1 << 20
DRAIN_BYTES = 16 << 20  # a body over the limit but under this is read (and dropped) first,
DRAIN_SECONDS = 1.0  # for this long at most


class _BodyTooLarge(HTTPException):
    def __init__(self) -> None:
        super().__init__(413)


class _BodyLimit:
    """Counts the bytes a request body actually brings, so a chunked upload (which has no
    Content-Length to check up front) cannot get past the limit or fill memory."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge()  # an HTTPException: FastAPI passes it to our handler
            return message

        await self.app(scope, counted, send)


def install_guards(app: FastAPI, api_key: str | None, refused: Callable[[str], None]) -> None:
    """`refused(outcome)` counts the requests turned away as invalid (a body too large or
    malformed); those refused for draining (503), a wrong API key (401) or content type (415)
    are not counted. `app.state.draining` (set on SIGTERM) makes /v1 answer 503."""
    app.state.draining = False

    def too_large():
        refused("invalid")
        return error_response(413, f"request body over {MAX_BODY_BYTES} bytes")

    app.add_middleware(_BodyLimit)  # bodies without a Content-Length (chunked)

    @app.exception_handler(_BodyTooLarge)
    async def _too_large(_: Request, __: _BodyTooLarge):
        return too_large()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        refused("invalid")
        return error_response(400, problems or "invalid request body")

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if app.state.draining and request.url.path.startswith("/v1/"):
            return error_response(503, "the server is shutting down", "service_unavailable")
        authorized = request.headers.get("authorization") == f"Bearer {api_key}"
        if api_key and request.url.path.startswith("/v1/") and not authorized:
            return error_response(401, "missing or wrong API key", "authentication_error")
        length = int(request.headers.get("content-length") or 0)
        if length > MAX_BODY_BYTES:  # refused without keeping a byte of the body
            if length <= DRAIN_BYTES:
                # What arrives within a second is read and dropped: a client still sending
                # would otherwise meet a closed connection (a broken pipe) instead of this
                # answer. One that sends slowly gets the answer anyway, and the connection
                # closes on the rest.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(DRAIN_SECONDS):
                        async for _ in request.stream():
                            pass
            return too_large()
        if request.method == "POST" and not request.headers.get("content-type", "").startswith(
            "application/json"
        ):
            return error_response(415, "content-type must be application/json")
        return await call_next(request)
