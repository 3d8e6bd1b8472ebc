"""Replicas: R engines on R sub-meshes behind one front end, and the router between them.

Each replica is an AsyncEngine with its own slots, cache and engine thread on its own devices.
The router prefers a replica where the request gets a slot at once: a decode step costs the
same however many slots are live, so a free slot means the request runs at full speed now,
while a full replica makes it wait for some other request to end. Among replicas that all
have (or all lack) a free slot it picks the least outstanding work: the tokens still to
generate for everything queued there or in its slots (a request asking for 500 tokens weighs
50 times one asking for 10); then fewer waiting requests, then the lowest index. Round-robin
is kept for comparison (benchmarks/serve.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from shardinfer.engine.sampling import SamplingParams
from shardinfer.serving.async_engine import AsyncEngine, Handle

POLICIES = ("least_loaded", "round_robin")


class Router:
    """Looks like one AsyncEngine to the HTTP layer (submit, abort, waiting, busy, stop)."""

    def __init__(self, engines: Sequence[AsyncEngine], policy: str = "least_loaded"):
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}; use one of {POLICIES}")
        if not engines:
            raise ValueError("a router needs at least one engine")
        self.engines, self.policy = list(engines), policy
        for i, engine in enumerate(self.engines):
            engine.replica = str(i)
        self._turn = itertools.cycle(range(len(self.engines)))

    @property
    def llm(self):
        return self.engines[0].llm  # the tokenizer and limits are the same on every replica

    def pick(self) -> AsyncEngine:
        if self.policy == "round_robin":
            return self.engines[next(self._turn)]
        return min(
            self.engines,
            key=lambda e: (e.free_slots() <= 0, e.load(), e.waiting(), int(e.replica)),
        )

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
