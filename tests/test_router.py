"""Replicas and routing: the least-loaded choice (deterministic), and two real replicas."""

import asyncio
import re

import jax
import pytest
from fastapi.testclient import TestClient

import shardinfer as si
from shardinfer.mesh import split_devices
from shardinfer.serving.async_engine import AsyncEngine
from shardinfer.serving.http import create_app
from shardinfer.serving.router import Router


class FakeEngine:
    """Outstanding work grows by each request's max_tokens, like AsyncEngine's."""

    def __init__(self, load: int, waiting: int = 0, free: int = 8):
        self._load, self._waiting, self.replica, self.got = load, waiting, "", []
        self._free = free

    def free_slots(self) -> int:
        return self._free

    def load(self) -> int:
        return self._load

    def waiting(self) -> int:
        return self._waiting

    def submit(self, prompt_ids, params):
        self.got.append(params.max_tokens)
        self._load += params.max_tokens
        self._free -= 1


def test_least_loaded_picks_least_outstanding_work():
    a, b, c = FakeEngine(50), FakeEngine(20, waiting=3), FakeEngine(20, waiting=1)
    router = Router([a, b, c])
    ask = lambda n: router.submit([1], si.SamplingParams(max_tokens=n))  # noqa: E731
    ask(100)  # b and c tie on work; c has fewer waiting
    ask(10)  # now b (20) is least
    ask(25)  # b 30, c 120, a 50 -> b
    ask(5)  # b 55, a 50 -> a
    assert (a.got, b.got, c.got) == ([5], [10, 25], [100])
    assert [e.replica for e in (a, b, c)] == ["0", "1", "2"]


def test_a_free_slot_comes_before_less_work():
    """Replica 0 is full of short requests (little work left, but a newcomer would wait);
    replica 1 has one long request and free slots: the newcomer starts at once there."""
    full, roomy = FakeEngine(6, free=0), FakeEngine(400, free=1)
    router = Router([full, roomy])
    router.submit([1], si.SamplingParams(max_tokens=10))
    assert (full.got, roomy.got) == ([], [10])
    # Now neither has a free slot: least outstanding work again.
    router.submit([1], si.SamplingParams(max_tokens=10))
    assert (full.got, roomy.got) == ([10], [10])


def test_round_robin_ignores_load():
    engines = [FakeEngine(1000), FakeEngine(0)]
    router = Router(engines, policy="round_robin")
    for _ in range(4):
        router.submit([1], si.SamplingParams(max_tokens=1))
    assert [e.got for e in engines] == [[1, 1], [1, 1]]


def test_bad_replica_count_and_policy():
    with pytest.raises(ValueError, match="divide the 8 devices"):
        split_devices(3)
    with pytest.raises(ValueError, match="unknown routing policy"):
        Router([FakeEngine(0)], policy="random")


def test_two_replicas_share_the_work(tiny_llama):
    groups = split_devices(2)
    assert [len(g) for g in groups] == [4, 4] and set(groups[0]).isdisjoint(groups[1])
    engines = []
    for devices in groups:
        model = si.load_model(tiny_llama, mesh=si.make_mesh("data=2,model=2", devices=devices))
        assert set(model.mesh.devices.flat) == set(devices)
        engines.append(AsyncEngine(si.LLM(model, max_batch=2, max_seq_len=64)))
    router = Router(engines)
    app = create_app(router, "tiny")
    lengths = [40, 3, 3, 3, 40, 3]  # skewed: long requests push the short ones elsewhere

    async def run_all():
        handles = [
            router.submit([5, 6, 7], si.SamplingParams(max_tokens=n, ignore_eos=True))
            for n in lengths
        ]
        outs = []
        for handle in handles:
            while (event := await handle.events.get()).finish_reason is None:
                pass
            outs.append((handle.engine.replica, len(event.token_ids), event.finish_reason))
        return outs

    try:
        outs = asyncio.run(run_all())
        assert [n for _, n, _ in outs] == lengths
        assert {replica for replica, _, _ in outs} == {"0", "1"}
        # The first long request went to 0; the next requests went to 1 until it was as loaded.
        assert outs[0][0] == "0" and outs[1][0] == "1"
        assert all(e.load() == 0 for e in engines)
        text = TestClient(app).get("/metrics").text
        for replica in ("0", "1"):
            assert re.search(rf'^shardinfer_ttft_seconds_count{{replica="{replica}"}} [1-9]', text,
                             re.M)  # fmt: skip
            assert f'shardinfer_live_slots{{replica="{replica}"}} 0.0' in text
        done = re.findall(r'^shardinfer_requests_total{outcome="length",replica="\d"} (\S+)$',
                          text, re.M)  # fmt: skip
        assert sum(float(x) for x in done) == len(lengths)
    finally:
        router.stop()
    assert jax.device_count() == 8
