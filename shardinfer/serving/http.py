"""An OpenAI-compatible HTTP API (FastAPI) over the AsyncEngine (a decoder: completions and
chat) or the AsyncEmbedder (an encoder: /v1/embeddings); each answers the other's endpoints
with a 400 that says what the model is.

Handlers validate (through the engine core, as the Python API and the CLI do), put requests on
the engine's queue and read events back; they never touch the device. Errors use OpenAI's body,
{"error": {"message", "type", "code"}}, with 4xx for the client's faults, and one bad request
never disturbs the others in flight.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import uvicorn
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, StreamingResponse

from shardinfer.engine.sampling import SamplingParams
from shardinfer.serving.async_embedder import AsyncEmbedder
from shardinfer.serving.async_engine import AsyncEngine, EngineDown, Event, Handle, QueueFull
from shardinfer.serving.embeddings import Embeddings
from shardinfer.serving.http_guards import MAX_BODY_BYTES, install_guards
from shardinfer.serving.openai_schema import (
    CHAT,
    COMPLETION,
    ChatBody,
    CompletionBody,
    EmbeddingBody,
    Refused,
    SamplingBody,
    chunk,
    error_response,
    final_body,
    sse,
    usage_chunk,
)
from shardinfer.serving.prometheus import ServingMetrics

__all__ = ["MAX_BODY_BYTES", "DrainingServer", "create_app", "serve_in_thread"]


class _Completions:
    """Turns a validated body into a queued request and its events into a response."""

    def __init__(self, engine: AsyncEngine, model_name: str, default_max_tokens: int,
                 observer: ServingMetrics):  # fmt: skip
        self.engine, self.model_name = engine, model_name
        self.default_max_tokens, self.observer = default_max_tokens, observer
        self.core = engine.llm.core  # validation and tokenizing (the same on every replica)

    def refused(self, outcome: str) -> None:
        self.observer.requests.labels(replica="", outcome=outcome).inc()

    async def respond(self, body: SamplingBody, tokenize: Callable[[], list[int]],
                      max_tokens: int | None, kind: str):  # fmt: skip
        """`tokenize` turns the body's prompt into checked token ids (ValueError if bad)."""
        try:
            handle, prompt_tokens = self._start(body, tokenize, max_tokens)
        except Refused as e:
            self.refused("rejected" if e.status in (429, 503) else "invalid")
            return e.response()
        rid = ("chatcmpl-" if kind == CHAT else "cmpl-") + uuid.uuid4().hex
        if body.stream:
            chunks = self._stream(handle, rid, body.model, kind, prompt_tokens)
            return StreamingResponse(chunks, media_type="text/event-stream")
        text, last = "", None
        try:
            while last is None or last.finish_reason is None:
                last = await handle.events.get()
                text += last.delta
        except BaseException:
            self.engine.abort(handle)
            raise
        return final_body(rid, body.model, kind, text, last.finish_reason, prompt_tokens,
                          len(last.token_ids))  # fmt: skip

    def _start(self, body: SamplingBody, tokenize, max_tokens: int | None) -> tuple[Handle, int]:
        if body.model != self.model_name:
            raise Refused(404, f"model {body.model!r} does not exist; this server has "
                               f"{self.model_name!r}", "not_found_error")  # fmt: skip
        try:
            prompt_ids = tokenize()
        except ValueError as e:
            raise Refused(400, str(e)) from e
        room = self.core.room(prompt_ids)
        if max_tokens is not None and max_tokens > room:
            # As vLLM does: asking for more than fits is an error, not a silent cut.
            raise Refused(400, f"max_tokens={max_tokens} with a {len(prompt_ids)}-token prompt "
                               f"exceeds max_seq_len={self.core.max_seq_len}; ask for at most "
                               f"{room}")  # fmt: skip
        if max_tokens is None:
            max_tokens = min(self.default_max_tokens, room)
        try:
            return self.engine.submit(prompt_ids, _params(body, max_tokens)), len(prompt_ids)
        except QueueFull as e:
            raise Refused(429, str(e), "rate_limit_error", {"Retry-After": "1"}) from e
        except EngineDown as e:
            raise Refused(503, str(e), "service_unavailable") from e
        except ValueError as e:
            raise Refused(400, str(e)) from e

    async def _stream(self, handle: Handle, rid, model, kind, prompt_tokens) -> AsyncIterator[str]:
        created = int(time.time())
        try:
            if kind == CHAT:
                yield sse(chunk(rid, model, kind, created, {"role": "assistant"}, None))
            while True:
                event: Event = await handle.events.get()
                if event.delta or event.finish_reason:
                    piece = {"content": event.delta} if kind == CHAT else event.delta
                    yield sse(chunk(rid, model, kind, created, piece, event.finish_reason))
                if event.finish_reason is not None:
                    yield sse(usage_chunk(rid, model, kind, created, prompt_tokens,
                                          len(event.token_ids)))  # fmt: skip
                    yield "data: [DONE]\n\n"
                    return
        finally:  # also on a client that disconnected mid-stream: free its slot at once
            if not handle.request.done:
                self.engine.abort(handle)


def _params(body: SamplingBody, max_tokens: int) -> SamplingParams:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=tuple(stop),
        ignore_eos=body.ignore_eos,
    )


def create_app(
    engine: AsyncEngine | AsyncEmbedder,
    model_name: str,
    default_max_tokens: int = 256,
    api_key: str | None = None,
) -> FastAPI:
    """The API over a decoder's engine (or a Router of them), or over an encoder's
    AsyncEmbedder."""
    app = FastAPI(title="shardinfer", docs_url=None, redoc_url=None)
    observer = ServingMetrics()
    embeds = isinstance(engine, AsyncEmbedder)

    def count(outcome: str) -> None:
        observer.requests.labels(replica="", outcome=outcome).inc()

    if embeds:
        engine.observer = observer
        api, embeddings = None, Embeddings(engine, model_name, count)
    else:
        for replica in engine.engines:  # an AsyncEngine is its own only replica; a Router has R
            replica.observer = observer
        observer.watch(lambda: engine.engines, model_name)
        api, embeddings = _Completions(engine, model_name, default_max_tokens, observer), None
    install_guards(app, api_key, count)

    def wrong_kind(endpoint: str):
        count("invalid")
        what = (
            "an embedding model: it serves /v1/embeddings only"
            if embeds
            else "a text-generation model: it serves /v1/completions and /v1/chat/completions"
        )
        return error_response(400, f"{endpoint} is not available: model {model_name!r} is {what}")

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

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        if api is None:
            return wrong_kind("/v1/completions")
        tokenize = lambda: api.core.prompt_ids(body.prompt)  # noqa: E731
        return await api.respond(body, tokenize, body.max_tokens, COMPLETION)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody):
        if api is None:
            return wrong_kind("/v1/chat/completions")
        messages = [m.model_dump() for m in body.messages]
        limit = body.max_completion_tokens or body.max_tokens
        return await api.respond(body, lambda: api.core.chat_ids(messages), limit, CHAT)

    @app.post("/v1/embeddings")
    async def embed(body: EmbeddingBody):
        if embeddings is None:
            return wrong_kind("/v1/embeddings")
        return await embeddings.respond(body)

    return app


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
