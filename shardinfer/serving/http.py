"""An OpenAI-compatible HTTP API (FastAPI) over the AsyncEngine.

Handlers validate, put requests on the engine's queue and read events back; they never touch
the device. Errors use OpenAI's body, {"error": {"message", "type", "code"}}, with 4xx for the
client's faults, and one bad request never disturbs the others in flight.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from shardinfer.engine.sampling import SamplingParams
from shardinfer.serving.async_engine import AsyncEngine, Event, Handle, QueueFull
from shardinfer.serving.prometheus import ServingMetrics

MAX_BODY_BYTES = 1 << 20


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


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: Literal[1] = 1
    ignore_eos: bool = False  # vLLM's extension: keep going past the end-of-text token


class CompletionBody(_Sampling):
    prompt: str | list[int]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


def _error(status: int, message: str, kind: str = "invalid_request_error", headers=None):
    body = {"error": {"message": message, "type": kind, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(
    engine: AsyncEngine,
    model_name: str,
    default_max_tokens: int = 256,
    api_key: str | None = None,
) -> FastAPI:
    app = FastAPI(title="shardinfer", docs_url=None, redoc_url=None)
    app.state.draining = False  # set on SIGTERM: finish what is in flight, refuse the rest
    core = engine.llm.core  # validation and tokenizing (the same on every replica)
    observer = ServingMetrics()
    for replica in engine.engines:  # an AsyncEngine is its own only replica; a Router has R
        replica.observer = observer
    observer.watch(lambda: engine.engines)

    def refused(outcome: str) -> None:
        observer.requests.labels(replica="", outcome=outcome).inc()

    def too_large() -> JSONResponse:
        refused("invalid")
        return _error(413, f"request body over {MAX_BODY_BYTES} bytes")

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
        return _error(400, problems or "invalid request body")

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if app.state.draining and request.url.path.startswith("/v1/"):
            return _error(503, "the server is shutting down", "service_unavailable")
        authorized = request.headers.get("authorization") == f"Bearer {api_key}"
        if api_key and request.url.path.startswith("/v1/") and not authorized:
            return _error(401, "missing or wrong API key", "authentication_error")
        if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
            return too_large()  # refused before a byte of the body is read
        if request.method == "POST" and not request.headers.get("content-type", "").startswith(
            "application/json"
        ):
            return _error(415, "content-type must be application/json")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(observer.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "shardinfer"}
        return {"object": "list", "data": [card]}

    def _params(body: _Sampling, max_tokens: int | None) -> SamplingParams:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return SamplingParams(
            max_tokens=max_tokens or default_max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            stop=tuple(stop),
            ignore_eos=body.ignore_eos,
        )

    def _start(body: _Sampling, prompt_ids: list[int], max_tokens: int | None) -> Handle:
        room = core.room(prompt_ids)
        if max_tokens is not None and max_tokens > room:
            # As vLLM does: asking for more than fits is an error, not a silent cut.
            raise _Refused(400, f"max_tokens={max_tokens} with a {len(prompt_ids)}-token prompt "
                                f"exceeds max_seq_len={engine.llm.max_seq_len}; ask for at most "
                                f"{room}")  # fmt: skip
        if max_tokens is None:
            max_tokens = min(default_max_tokens, room)
        try:
            return engine.submit(prompt_ids, _params(body, max_tokens))
        except QueueFull as e:
            refused("rejected")
            raise _Refused(429, str(e), "rate_limit_error", {"Retry-After": "1"}) from e
        except ValueError as e:
            raise _Refused(400, str(e)) from e

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        return await _respond(body, lambda: core.prompt_ids(body.prompt), body.max_tokens,
                              "text_completion")  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody):
        messages = [m.model_dump() for m in body.messages]
        limit = body.max_completion_tokens or body.max_tokens
        return await _respond(body, lambda: core.chat_ids(messages), limit, "chat.completion")

    async def _respond(body: _Sampling, tokenize, max_tokens, kind: str):
        """`tokenize` turns the body's prompt into checked token ids (the engine core's
        validation, shared with the Python API and the CLI)."""
        try:
            if body.model != model_name:
                raise _Refused(404, f"model {body.model!r} does not exist; this server has "
                                    f"{model_name!r}", "not_found_error")  # fmt: skip
            try:
                prompt = tokenize()
            except ValueError as e:
                raise _Refused(400, str(e)) from e
            handle = _start(body, prompt, max_tokens)
        except _Refused as e:
            if e.status != 429:
                refused("invalid")
            return _error(e.status, e.message, e.kind, e.headers)
        rid = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex
        if body.stream:
            chunks = _stream(handle, rid, body.model, kind, len(prompt))
            return StreamingResponse(chunks, media_type="text/event-stream")
        text, last = "", None
        try:
            while last is None or last.finish_reason is None:
                last = await handle.events.get()
                text += last.delta
        except BaseException:
            engine.abort(handle)
            raise
        return _final(rid, body.model, kind, text, last, len(prompt))

    async def _stream(handle, rid, model, kind, prompt_tokens) -> AsyncIterator[str]:
        created = int(time.time())
        object_name = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"
        try:
            if kind == "chat.completion":
                yield _sse(_chunk(rid, model, object_name, created, {"role": "assistant"}, None))
            while True:
                event: Event = await handle.events.get()
                if event.delta or event.finish_reason:
                    piece = {"content": event.delta} if kind == "chat.completion" else event.delta
                    yield _sse(_chunk(rid, model, object_name, created, piece,
                                      event.finish_reason))  # fmt: skip
                if event.finish_reason is not None:
                    usage = _usage(prompt_tokens, len(event.token_ids))
                    yield _sse({"id": rid, "object": object_name, "created": created,
                                "model": model, "choices": [], "usage": usage})  # fmt: skip
                    yield "data: [DONE]\n\n"
                    return
        finally:  # also on a client that disconnected mid-stream: free its slot at once
            if not handle.request.done:
                engine.abort(handle)

    return app


class _Refused(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 headers: dict | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _chunk(rid, model, object_name, created, piece, finish_reason) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason}
    if isinstance(piece, dict):
        choice["delta"] = piece
    else:
        choice["text"] = piece
    return {"id": rid, "object": object_name, "created": created, "model": model,
            "choices": [choice]}  # fmt: skip


def _final(rid, model, kind, text, last: Event, prompt_tokens: int) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": last.finish_reason}
    if kind == "chat.completion":
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {
        "id": rid,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": _usage(prompt_tokens, len(last.token_ids)),
    }


class DrainingServer(uvicorn.Server):
    """Drains on SIGTERM/SIGINT: new /v1 requests get 503 while the ones in flight finish, then
    the server shuts down (exit status 0). A second signal stops it at once."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, engine: AsyncEngine):
        super().__init__(config)
        self.app_, self.engine = app, engine

    def handle_exit(self, sig, frame) -> None:
        if self.app_.state.draining:
            super().handle_exit(sig, frame)
            return
        self.app_.state.draining = True
        threading.Thread(target=self._exit_when_idle, args=(sig,), daemon=True).start()

    def _exit_when_idle(self, sig) -> None:
        while self.engine.busy():
            time.sleep(0.05)
        # Not super().handle_exit: uvicorn would re-raise the signal after shutting down, and
        # a drained server should exit 0.
        self.should_exit = True


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1") -> Iterator[str]:
    """Runs an app with uvicorn on a free port of `host`, in a thread (tests, benchmarks,
    notebooks); yields its base URL and stops the server on exit."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://{host}:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
