"""The OpenAI-compatible server, driven by the official `openai` client over loopback."""

import json
import re
import threading
import time
import urllib.error
import urllib.request

import jax
import openai
import pytest

import shardinfer as si
from shardinfer.serving.async_engine import AsyncEngine, QueueFull
from shardinfer.serving.http import create_app, serve_in_thread

MODEL = "smollm2-135m-instruct"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server():
    mesh = si.make_mesh("data=1", devices=jax.devices()[:1])
    llm = si.LLM(MODEL, mesh=mesh, max_batch=4, max_seq_len=256)
    # The reference, before the engine thread takes the LLM over (one owner at a time).
    expected_chat = llm.chat(CHAT, si.SamplingParams(max_tokens=24, temperature=0.0))[0]
    engine = AsyncEngine(llm, max_waiting=64)
    with serve_in_thread(create_app(engine, MODEL)) as base:
        yield llm, engine, base, expected_chat
    engine.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[2] + "/v1", api_key="unused", max_retries=0)


def test_chat_completion_equals_llm_chat(server, client):
    expected = server[3]  # llm.chat's greedy answer, taken before the engine thread started
    reply = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24,
                                           temperature=0)  # fmt: skip
    assert reply.choices[0].message.content == expected.text
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 20


def test_streaming_chat_and_completion(client):
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24,
                                           temperature=0).choices[0].message.content  # fmt: skip
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=24, temperature=0, stream=True
        )
        if c.choices
    ]
    assert "".join(pieces) == whole and len(pieces) > 3
    done = client.completions.create(model=MODEL, prompt="The sea is", max_tokens=8, temperature=0)
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt="The sea is", max_tokens=8, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == done.choices[0].text and done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 8


def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list()] == [MODEL]
    base = server[2]
    assert json.loads(urllib.request.urlopen(base + "/health").read()) == {"status": "ok"}
    text = urllib.request.urlopen(base + "/metrics").read().decode()
    assert (
        "shardinfer_generated_tokens_total" in text
        and 'shardinfer_live_slots{replica="0"} 0.0' in text
    )
    # vLLM's names, which Kubernetes inference routers balance on.
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert f'vllm:{gauge}{{model_name="{MODEL}"}} 0.0' in text, gauge
    assert re.search(r'vllm:generation_tokens_total\{model_name="[^"]+"\} [1-9]', text)
    assert "shardinfer_ttft_seconds_bucket" in text and "shardinfer_inter_token_seconds" in text


def _metric(base: str, name: str, **labels: str) -> float:
    """One sample from /metrics (0 when the labelled series does not exist yet)."""
    text = urllib.request.urlopen(base + "/metrics").read().decode()
    for found in re.finditer(rf"^{name}{{(.*)}} (\S+)$", text, re.M):
        if dict(re.findall(r'(\w+)="([^"]*)"', found.group(1))) == labels:
            return float(found.group(2))
    return 0.0


def _post(base, path, body: bytes, content_type="application/json"):
    request = urllib.request.Request(base + path, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b"{not json", 400, "json"),
        (json.dumps({"model": "nope", "prompt": "hi"}).encode(), 404, "does not exist"),
        (json.dumps({"model": MODEL, "prompt": ""}).encode(), 400, "prompt is empty"),
        (json.dumps({"model": MODEL, "prompt": "hi", "top_p": 0}).encode(), 400, "top_p"),
        (json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": -1}).encode(), 400,
         "max_tokens"),
        (json.dumps({"model": MODEL, "prompt": "hi", "temperature": -1}).encode(), 400,
         "temperature"),
        (json.dumps({"model": MODEL, "prompt": "word " * 300}).encode(), 400, "max_seq_len"),
        (json.dumps({"model": MODEL}).encode(), 400, "prompt"),
        (json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 100_000}).encode(), 400,
         "max_seq_len"),
    ],
)  # fmt: skip
def test_bad_requests_get_openai_errors(server, body, status, words):
    code, reply = _post(server[2], "/v1/completions", body)
    assert code == status
    assert words in reply["error"]["message"].lower() and reply["error"]["code"] == status


def _connection(base: str):
    import http.client

    host, port = base.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=30)


def test_body_over_the_limit_is_refused_unread(server):
    """Refused on its Content-Length, the body never kept: a client that sends only a few
    bytes of it still gets the answer, after the server's short wait for the rest (a client
    that sends it all reads the answer too, not a broken pipe: test_http_router.py)."""
    started = time.monotonic()
    connection = _connection(server[2])
    connection.putrequest("POST", "/v1/completions")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(2 << 20))
    connection.endheaders(b'{"model": "')
    response = connection.getresponse()
    assert response.status == 413 and "bytes" in json.loads(response.read())["error"]["message"]
    assert time.monotonic() - started < 10


def test_body_limit_holds_without_content_length(server):
    """A chunked upload has no Content-Length to check up front; the limit must hold anyway.
    (Just past the limit, so that what the server leaves unread fits the socket buffers.)"""

    def chunks():
        yield b'{"model": "%s", "prompt": "' % MODEL.encode()
        for _ in range(18):  # 1.125 MiB
            yield b"x" * 65536
        yield b'"}'

    connection = _connection(server[2])
    headers = {"Content-Type": "application/json"}
    connection.request("POST", "/v1/completions", chunks(), headers, encode_chunked=True)
    response = connection.getresponse()
    assert response.status == 413 and "bytes" in json.loads(response.read())["error"]["message"]


def test_wrong_content_type(server):
    code, reply = _post(server[2], "/v1/completions", b"prompt=hi", "text/plain")
    assert code == 415 and "content-type" in reply["error"]["message"]


def test_disconnect_frees_the_slot(server):
    llm, engine, base, _ = server
    aborted = _metric(base, "shardinfer_requests_total", outcome="abort", replica="0")
    tokens_before = llm.metrics.tokens_generated
    body = json.dumps({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 200,
                       "stream": True, "temperature": 0}).encode()  # fmt: skip
    request = urllib.request.Request(base + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    response = urllib.request.urlopen(request)
    response.readline()  # the first event: the request holds a slot now
    assert _metric(base, "shardinfer_live_slots", replica="0") == 1
    response.close()  # the client goes away mid-stream
    deadline = time.time() + 20
    while _metric(base, "shardinfer_live_slots", replica="0") and time.time() < deadline:
        time.sleep(0.1)
    # Seen from outside: the slot is free and the request counted as aborted, long before the
    # 200 tokens it asked for could have been generated.
    assert _metric(base, "shardinfer_live_slots", replica="0") == 0 and not engine.busy()
    assert _metric(base, "shardinfer_requests_total", outcome="abort", replica="0") == aborted + 1
    assert llm.metrics.tokens_generated < 200 + tokens_before


def test_a_new_request_does_not_wait_for_a_long_one(server, client):
    """Continuous batching seen from outside: while one request streams 200 tokens, a short
    one is admitted, answered in full, and the long one is still going when it is."""
    _, engine, base, _ = server
    body = json.dumps({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 200,
                       "stream": True, "temperature": 0, "ignore_eos": True}).encode()  # fmt: skip
    request = urllib.request.Request(base + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    long_stream = urllib.request.urlopen(request)
    try:
        long_stream.readline()  # its first token is out: it holds a slot
        short = client.completions.create(model=MODEL, prompt="The sea is", max_tokens=4,
                                          temperature=0)  # fmt: skip
        assert short.usage.completion_tokens == 4
        assert _metric(base, "shardinfer_live_slots", replica="0") == 1  # the long one, still
    finally:
        long_stream.close()
    deadline = time.time() + 20
    while engine.busy() and time.time() < deadline:
        time.sleep(0.1)


def test_48_concurrent_streams_all_complete(server):
    import asyncio

    llm, engine, base, _ = server
    before = llm.metrics.requests_finished

    def served() -> dict[str, float]:
        return {
            outcome: _metric(base, "shardinfer_requests_total", outcome=outcome, replica="0")
            for outcome in ("stop", "length", "abort", "error")
        } | {"tokens": _metric(base, "shardinfer_generated_tokens_total", replica="0")}

    served_before = served()
    prompts = [f"Count to {i}:" for i in range(48)]

    async def one(client: openai.AsyncOpenAI, prompt: str) -> tuple[str, str | None, int]:
        text, reason, usage = "", None, 0
        stream = await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=6, temperature=0, stream=True
        )
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                reason = chunk.choices[0].finish_reason or reason
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        return text, reason, usage

    async def all_of_them():
        client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        return await asyncio.gather(*(one(client, p) for p in prompts))

    results = asyncio.run(all_of_them())
    assert all(reason in ("stop", "length") for _, reason, _ in results)
    assert all(0 < usage <= 6 for _, _, usage in results)
    assert llm.metrics.requests_finished == before + 48 and not engine.busy()
    # /metrics agrees with what the clients saw: outcomes one by one, and the token count.
    delta = {k: v - served_before[k] for k, v in served().items()}
    reasons = [reason for _, reason, _ in results]
    assert delta["stop"] == reasons.count("stop") and delta["length"] == reasons.count("length")
    assert delta["abort"] == delta["error"] == 0
    assert delta["tokens"] == sum(usage for _, _, usage in results)


class _FullEngine:
    """Stands in for an AsyncEngine whose queue is full."""

    def __init__(self, llm):
        self.llm, self.metrics, self.replica, self.observer = llm, llm.metrics, "0", None
        self.engines = [self]

    def submit(self, prompt_ids, params):
        raise QueueFull("256 requests are already waiting")

    def waiting(self) -> int:
        return 256

    def load(self) -> int:
        return 0


def test_full_queue_answers_429_with_retry_after(server):
    with serve_in_thread(create_app(_FullEngine(server[0]), MODEL)) as base:
        request = urllib.request.Request(
            base + "/v1/completions",
            data=json.dumps({"model": MODEL, "prompt": "hi"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request)
        assert refused.value.code == 429 and refused.value.headers["Retry-After"] == "1"
        assert json.loads(refused.value.read())["error"]["type"] == "rate_limit_error"


def test_api_key_is_required_when_set(server):
    with serve_in_thread(create_app(_FullEngine(server[0]), MODEL, api_key="sekret")) as base:
        wrong = openai.OpenAI(base_url=base + "/v1", api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        right = openai.OpenAI(base_url=base + "/v1", api_key="sekret", max_retries=0)
        assert [m.id for m in right.models.list()] == [MODEL]
        assert json.loads(urllib.request.urlopen(base + "/health").read())["status"] == "ok"


def test_sigterm_drains_then_exits_zero(tiny_llama):
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "shardinfer.cli", "serve", "--model", str(tiny_llama),
         "--port", str(port), "--max-seq-len", "512", "--max-batch", "1",
         "--compilation-cache", "none"],
        env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(base + "/health")
                break
            except OSError:
                assert time.time() < deadline and proc.poll() is None, "server did not start"
                time.sleep(0.2)
        # One slot and three long requests: the server is warmed up, so one would finish
        # in a fraction of a second; queued behind each other they are still in flight
        # (accepted, not yet done) when the signal comes.
        body = {"model": str(tiny_llama), "prompt": [1, 2, 3], "max_tokens": 500,
                "temperature": 0, "stream": True, "ignore_eos": True}  # fmt: skip
        results: list = []

        def stream() -> None:
            reply = urllib.request.urlopen(urllib.request.Request(
                base + "/v1/completions", data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            ))  # fmt: skip
            results.append(reply.read().decode().strip().split("\n\n"))

        streams = [threading.Thread(target=stream) for _ in range(3)]
        for s in streams:
            s.start()
        time.sleep(0.3)  # all three accepted
        proc.send_signal(signal.SIGTERM)  # while they are in flight
        time.sleep(0.2)
        code, reply = _post(base, "/v1/completions", json.dumps(body).encode())
        assert code == 503 and "shutting down" in reply["error"]["message"]
        for s in streams:
            s.join(timeout=120)
        assert len(results) == 3
        for events in results:  # every request in flight finished
            assert events[-1] == "data: [DONE]"
            final = json.loads(events[-2][len("data: ") :])
            assert final["usage"]["completion_tokens"] == 500
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize(
    "messages, words",
    [
        ([{"role": "user", "content": ""}], "no non-empty message"),
        ([{"role": "system", "content": " "}, {"role": "user", "content": "\n"}],
         "no non-empty message"),
        ([], "messages"),
    ],
)  # fmt: skip
def test_empty_conversations_are_refused_on_every_front_end(server, messages, words):
    """HTTP and the Python API refuse the same input with the same message (one validation,
    in the engine core), and the server stays usable."""
    body = json.dumps({"model": MODEL, "messages": messages}).encode()
    code, reply = _post(server[2], "/v1/chat/completions", body)
    assert code == 400 and words in reply["error"]["message"]
    llm = server[0]  # validation refuses before anything reaches the engine thread's scheduler
    with pytest.raises(ValueError, match=words):
        llm.chat(messages)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        llm.generate([""])
    code, _ = _post(server[2], "/v1/chat/completions", json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    ).encode())  # fmt: skip
    assert code == 200
