"""`shardinfer router`: one OpenAI-compatible front over many servers (shardinfer's or
anything that speaks the API and /health), each request forwarded to one of them.

The router checks what it can without a backend, with the same guards and bodies as `serve`
(the API key, the body limit, JSON, the request schema), so such a request is refused with
the same 4xx and never reaches a backend; what needs the model (a prompt too long, a token out
of range) is the backend's to answer, and its 4xx is passed through. It picks among the
healthy backends that serve the request's model with serving/balance.py's policy and proxies
the answer as it comes (httpx; a stream chunk by chunk). A backend that refuses (429, 5xx) or
fails before the first byte of its answer reached the client is left for another, once. A
stream that breaks after that ends with an OpenAI-style error event and is counted. No read
waits longer than `read_timeout`, no connect longer than `connect_timeout`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from shardinfer.serving.backends import Backend, Pool
from shardinfer.serving.balance import Policy
from shardinfer.serving.http_guards import install_guards
from shardinfer.serving.openai_schema import (
    ChatBody,
    CompletionBody,
    EmbeddingBody,
    SamplingBody,
    error_response,
)

log = logging.getLogger("shardinfer")

# What a backend answers when it cannot take a request now or failed it: another may.
RETRYABLE = {429, 500, 502, 503, 504}
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

__all__ = ["create_router_app"]


class _Metrics:
    def __init__(self, pool: Pool) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "shardinfer_router_requests",
            "Requests by backend and outcome: ok, client_error (its 4xx, passed on), failed "
            "(refused or broken before the answer began), broken_stream; the router's own "
            'refusals have backend="": invalid (4xx), unavailable (no healthy backend).',
            ["backend", "outcome"],
            registry=r,
        )
        self.retries = Counter("shardinfer_router_retries",
                               "Requests sent on to another backend after this one failed.",
                               ["backend"], registry=r)  # fmt: skip
        self.latency = Histogram("shardinfer_router_request_seconds",
                                 "Time from forwarding to the answer's last byte.",
                                 ["backend"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        r.register(_PoolCollector(pool))


class _PoolCollector(Collector):
    def __init__(self, pool: Pool):
        self.pool = pool

    def collect(self):
        gauges = {
            "healthy": ("1 while the backend is in the pool.", lambda b: b.healthy),
            "in_flight": ("Requests the router has open there.", lambda b: b.in_flight),
            "speed_tokens_per_second": ("Generated tokens/s measured (0: not yet).",
                                        lambda b: b.speed or 0.0),
        }  # fmt: skip
        for name, (doc, read) in gauges.items():
            family = GaugeMetricFamily(f"shardinfer_router_backend_{name}", doc, labels=["backend"])
            for b in self.pool.backends:
                family.add_metric([b.url], float(read(b)))
            yield family


class _Failed(Exception):
    """A backend refused or failed the request before anything reached the client."""

    def __init__(self, why: str, response: Response | None = None):
        super().__init__(why)
        self.response = response  # the backend's own answer, if it gave one


class Forwarder:
    def __init__(self, pool: Pool, policy: Policy, metrics: _Metrics, timeout: httpx.Timeout,
                 backend_api_key: str | None, default_max_tokens: int):  # fmt: skip
        self.pool, self.policy, self.metrics, self.timeout = pool, policy, metrics, timeout
        self.backend_api_key, self.default_max_tokens = backend_api_key, default_max_tokens

    def busy(self) -> bool:
        return any(b.in_flight for b in self.pool.backends)

    async def forward(self, request: Request, body, path: str, expected_tokens: int):
        stream = isinstance(body, SamplingBody) and body.stream
        raw = await request.body()
        headers = {"content-type": "application/json"}
        auth = f"Bearer {self.backend_api_key}" if self.backend_api_key else None
        if auth or (auth := request.headers.get("authorization")):
            headers["authorization"] = auth
        tried: list[Backend] = []
        failure: _Failed | None = None
        for _ in range(2):  # the chosen backend, then one other
            choices = [b for b in self.pool.healthy(body.model) if b not in tried]
            if not choices:
                break
            backend = choices[self.policy.pick([b.load() for b in choices])]
            if tried:
                self.metrics.retries.labels(backend=tried[-1].url).inc()
            tried.append(backend)
            try:
                return await self._attempt(backend, path, raw, headers, stream, expected_tokens)
            except _Failed as e:
                self.metrics.requests.labels(backend=backend.url, outcome="failed").inc()
                log.warning("backend %s failed %s: %s", backend.url, path, e)
                failure = e
        if failure is None:
            return self._refuse_unrouted(body.model)
        if failure.response is not None:
            return failure.response  # the last backend's own refusal, as it gave it
        return error_response(502, f"no backend could answer: {failure}", "server_error")

    def _refuse_unrouted(self, model: str) -> JSONResponse:
        if not self.pool.healthy():
            self.metrics.requests.labels(backend="", outcome="unavailable").inc()
            down = "; ".join(f"{b.url}: {b.error or 'not polled yet'}" for b in self.pool.backends)
            return error_response(503, f"no backend is healthy ({down})", "service_unavailable",
                                  {"Retry-After": "1"})  # fmt: skip
        self.metrics.requests.labels(backend="", outcome="invalid").inc()
        return error_response(404, f"model {model!r} does not exist; the backends serve "
                                   f"{self.pool.models()}", "not_found_error")  # fmt: skip

    async def _attempt(self, backend: Backend, path, raw, headers, stream, expected_tokens):
        backend.in_flight += 1
        backend.in_flight_tokens += expected_tokens
        backend.sent_since_poll += 1
        state = {"left": float(expected_tokens), "start": time.perf_counter()}
        handed_over = False
        try:
            request = self.pool.client.build_request(
                "POST", backend.url + path, content=raw, headers=headers, timeout=self.timeout
            )
            try:
                upstream = await self.pool.client.send(request, stream=True)
            except httpx.HTTPError as e:
                if isinstance(e, httpx.ConnectError | httpx.ConnectTimeout):
                    backend.mark_down(f"connect failed: {e}")
                raise _Failed(f"{type(e).__name__}: {e}") from e
            keep_open = False
            try:
                if upstream.status_code in RETRYABLE:
                    raise _Failed(f"answered {upstream.status_code}",
                                  await _copy(upstream))  # fmt: skip
                if not stream or upstream.status_code != 200:
                    answer = await _copy(upstream)
                    self._finish(backend, state, _outcome(upstream.status_code))
                    return answer
                chunks = upstream.aiter_raw()
                first = b""  # held back until it carries a token: until then, retrying is safe
                while not _begun(first):
                    try:
                        first += await anext(chunks)
                    except StopAsyncIteration:
                        raise _Failed("the stream ended before its first token") from None
                keep_open = True
            except httpx.HTTPError as e:
                raise _Failed(f"{type(e).__name__}: {e}") from e
            finally:
                if not keep_open:
                    await upstream.aclose()
            handed_over = True
            relay = self._relay(backend, state, upstream, first, chunks)
            return StreamingResponse(relay, media_type="text/event-stream")
        finally:
            if not handed_over:
                self._release(backend, state)

    async def _relay(self, backend, state, upstream, first, chunks) -> AsyncIterator[bytes]:
        outcome = "ok"
        try:
            yield first
            self._progress(backend, state, first)
            try:
                async for piece in chunks:
                    yield piece
                    self._progress(backend, state, piece)
            except httpx.HTTPError as e:  # mid-stream: the client has had part of the answer
                outcome = "broken_stream"
                log.warning("backend %s broke a stream: %s", backend.url, e)
                message = f"the backend serving this stream failed: {type(e).__name__}"
                event = {"error": {"message": message, "type": "server_error", "code": 502}}
                yield f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n".encode()
        finally:
            await upstream.aclose()
            self._finish(backend, state, outcome)
            self._release(backend, state)

    def _progress(self, backend: Backend, state: dict, piece: bytes) -> None:
        """Each SSE event is about one token: what is still to come shrinks as they pass."""
        done = min(piece.count(b"data:"), state["left"])
        state["left"] -= done
        backend.in_flight_tokens -= done

    def _finish(self, backend: Backend, state: dict, outcome: str) -> None:
        self.metrics.requests.labels(backend=backend.url, outcome=outcome).inc()
        self.metrics.latency.labels(backend=backend.url).observe(
            time.perf_counter() - state["start"]
        )

    def _release(self, backend: Backend, state: dict) -> None:
        backend.in_flight -= 1
        backend.in_flight_tokens = max(0.0, backend.in_flight_tokens - state["left"])
        state["left"] = 0.0


def _begun(head: bytes) -> bool:
    """Whether the SSE events in `head` carry a token (text, or a chat delta's content) or
    end the stream; a chat stream's first event (the role) carries none."""
    for event in head.split(b"\n\n")[:-1]:  # complete events only
        data = event.strip().removeprefix(b"data:").strip()
        if data == b"[DONE]":
            return True
        try:
            choices = json.loads(data).get("choices") or []
        except (ValueError, AttributeError):
            return True  # not ours to read: pass it on as it is
        for choice in choices:
            delta = choice.get("delta") or {}
            if choice.get("text") or delta.get("content") or choice.get("finish_reason"):
                return True
    return False


def _outcome(status: int) -> str:
    return "ok" if status < 400 else "client_error"


async def _copy(upstream: httpx.Response) -> Response:
    """The backend's whole answer, status, body and the headers that matter, as ours."""
    content = await upstream.aread()
    headers = {k: v for k, v in upstream.headers.items() if k.lower() == "retry-after"}
    media = upstream.headers.get("content-type", "application/json")
    return Response(content, status_code=upstream.status_code, headers=headers, media_type=media)


def create_router_app(
    backends: list[str],
    policy: str = "least_loaded",
    api_key: str | None = None,
    backend_api_key: str | None = None,
    connect_timeout: float = 2.0,
    read_timeout: float = 60.0,
    health_interval: float = 1.0,
    default_max_tokens: int = 256,
) -> FastAPI:
    """The router's API over the servers at `backends` (base URLs, without /v1).
    `default_max_tokens` is the backends' default for requests that do not say (what the
    router expects such a request to cost)."""
    policy_ = Policy(policy)
    if connect_timeout <= 0 or read_timeout <= 0 or health_interval <= 0:
        raise ValueError("timeouts and the health interval must be > 0 seconds")
    client = httpx.AsyncClient(limits=httpx.Limits(max_connections=None,
                                                   max_keepalive_connections=64))  # fmt: skip
    poll_headers = {"authorization": f"Bearer {backend_api_key}"} if backend_api_key else {}
    pool = Pool(backends, client, poll_headers, health_interval, timeout=1.0)
    metrics = _Metrics(pool)
    timeout = httpx.Timeout(connect=connect_timeout, read=read_timeout, write=read_timeout,
                            pool=connect_timeout)  # fmt: skip
    forwarder = Forwarder(pool, policy_, metrics, timeout, backend_api_key, default_max_tokens)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        await pool.start()
        try:
            yield
        finally:
            await pool.stop()
            await client.aclose()

    app = FastAPI(title="shardinfer router", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.forwarder = forwarder

    def refused(outcome: str) -> None:
        metrics.requests.labels(backend="", outcome=outcome).inc()

    install_guards(app, api_key, refused)

    @app.get("/health")
    async def health():
        states = {b.url: "healthy" if b.healthy else (b.error or "not polled yet")
                  for b in pool.backends}  # fmt: skip
        ok = bool(pool.healthy())
        return JSONResponse({"status": "ok" if ok else "no healthy backend", "backends": states},
                            status_code=200 if ok else 503)  # fmt: skip

    @app.get("/metrics")
    async def metrics_():
        return PlainTextResponse(generate_latest(metrics.registry).decode(),
                                 media_type="text/plain; version=0.0.4")  # fmt: skip

    @app.get("/v1/models")
    async def models():
        cards = [{"id": m, "object": "model", "created": 0, "owned_by": "shardinfer"}
                 for m in pool.models()]  # fmt: skip
        return {"object": "list", "data": cards}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        work = body.max_tokens or default_max_tokens
        return await forwarder.forward(request, body, "/v1/completions", work)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        work = body.max_completion_tokens or body.max_tokens or default_max_tokens
        return await forwarder.forward(request, body, "/v1/chat/completions", work)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingBody, request: Request):
        return await forwarder.forward(request, body, "/v1/embeddings", 1)

    return app
