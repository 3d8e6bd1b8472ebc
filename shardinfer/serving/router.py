"""Replicas: R engines on R sub-meshes behind one front end, and the router between them.

Each replica is an AsyncEngine with its own slots, cache and engine thread on its own devices.
The choice is serving/balance.py's policy, the one the HTTP router over servers uses: a free
slot first, then the least outstanding work (tokens still to generate for everything queued
there or in its slots: a request asking for 500 tokens weighs 50 times one asking for 10).
Replicas are equal sub-meshes, so they are not told apart by speed.
"""

from __future__ import annotations

from collections.abc import Sequence

from shardinfer.engine.sampling import SamplingParams
from shardinfer.serving.async_engine import AsyncEngine, Handle
from shardinfer.serving.balance import POLICIES, Load, Policy

__all__ = ["POLICIES", "Router"]


class Router:
    """Looks like one AsyncEngine to the HTTP layer (submit, abort, waiting, busy, stop)."""

    def __init__(self, engines: Sequence[AsyncEngine], policy: str = "least_loaded"):
        if not engines:
            raise ValueError("a router needs at least one engine")
        self.engines, self.policy = list(engines), Policy(policy)
        for i, engine in enumerate(self.engines):
            engine.replica = str(i)

    @property
    def llm(self):
        return self.engines[0].llm  # the tokenizer and limits are the same on every replica

    def pick(self) -> AsyncEngine:
        loads = [Load(e.free_slots(), e.load(), e.waiting()) for e in self.engines]
        return self.engines[self.policy.pick(loads)]

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Handle:
        return self.pick().submit(prompt_ids, params)

    def abort(self, handle: Handle) -> None:
        handle.engine.abort(handle)

    def waiting(self) -> int:
        return sum(e.waiting() for e in self.engines)

    def load(self) -> int:
        return sum(e.load() for e in self.engines)

    def busy(self) -> bool:
        return any(e.busy() for e in self.engines)

    def stop(self) -> None:
        for engine in self.engines:
            engine.stop()
