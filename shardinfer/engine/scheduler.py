"""The host side of continuous batching: a queue, the slots, and one `step` that serves all.

Each step either admits waiting requests into free slots (prefill, then insert) or advances
every live slot by one decode step. A step that admits returns at once, so a new request's
first token reaches its caller without waiting for a decode step (in a fresh process that
step also loads the decode program); steps that admit never come twice in a row, so arrivals
cannot starve the running requests. A finished request frees its slot at once and the next
waiting request takes it while the others keep decoding.
"""

from __future__ import annotations

import collections

import numpy as np

from shardinfer.engine.engine import Engine
from shardinfer.engine.metrics import EngineMetrics
from shardinfer.engine.request import Request
from shardinfer.engine.sampling import SamplingArrays, set_row


class Scheduler:
    def __init__(self, engine: Engine):
        self.engine = engine
        slots = engine.slots
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request | None] = [None] * slots
        self.tokens = np.zeros(slots, np.int32)  # the last token of each slot, fed next step
        self.positions = np.zeros(slots, np.int32)  # where that token goes in the cache
        self.sampling = SamplingArrays.for_rows([None] * slots)
        self.metrics = EngineMetrics(slots)
        self._admitted_last_step = False

    def add(self, request: Request) -> None:
        self.waiting.append(request)
        self.metrics.queue_length = len(self.waiting)

    def abort(self, request: Request) -> None:
        """Drops a request (a client that went away); its slot is free for the next step."""
        if request in self.waiting:
            self.waiting.remove(request)
        for i, r in enumerate(self.running):
            if r is request:
                self.running[i] = None
        if request.finish_reason is None:
            request.finish_reason = "abort"
        self._update_gauges()

    def has_work(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.running)

    def step(self) -> list[Request]:
        """Admits what fits (then returns, unless the previous step admitted too), or decodes
        one token for every live slot; returns the touched requests."""
        touched = [] if self._admitted_last_step else self._admit()
        self._admitted_last_step = bool(touched)
        live = [i for i, r in enumerate(self.running) if r is not None]
        if live and not touched:
            new = self.engine.decode(self.tokens, self.positions, self.sampling)
            self.metrics.decode_steps += 1
            for i in live:
                request = self.running[i]
                request.append(int(new[i]))
                self.tokens[i], self.positions[i] = new[i], self.positions[i] + 1
                touched.append(request)
                if request.done:
                    self._finish(request, slot=i)
            self.metrics.tokens_generated += len(live)
        self._update_gauges()
        return touched

    def _admit(self) -> list[Request]:
        """Moves waiting requests into free slots, prefilling those that arrive together in
        one call."""
        admitted: list[Request] = []
        while self.waiting and (slot := self._free_slot()) is not None:
            group: list[tuple[Request, int]] = []
            while self.waiting and slot is not None and len(group) < self.engine.prefill_rows:
                request = self.waiting.popleft()
                self.running[slot] = request  # reserve it, so the next choice sees the load
                group.append((request, slot))
                slot = self._free_slot()
            admitted += self._prefill_group(group)
        return admitted

    def _prefill_group(self, group: list[tuple[Request, int]]) -> list[Request]:
        requests = [r for r, _ in group]
        sampling = SamplingArrays.for_rows([r.params for r in requests])
        first, kv = self.engine.prefill([r.prompt_ids for r in requests], sampling)
        targets: list[int | None] = []  # the cache row of each prefilled row, None: not kept
        for i, ((request, slot), token) in enumerate(zip(group, first, strict=True)):
            self.metrics.prefill_tokens += len(request.prompt_ids)
            self.metrics.tokens_generated += 1
            request.append(token)
            if self.metrics.first_token_at is None:
                self.metrics.first_token_at = request.first_token_at
            if request.done:  # one token was all it needed: the slot is free again
                self._finish(request, slot)
                targets.append(None)
                continue
            targets.append(slot)
            self.tokens[slot], self.positions[slot] = token, len(request.prompt_ids)
            set_row(self.sampling, slot, sampling, i)
        if any(t is not None for t in targets):
            self.engine.insert(kv, targets)
        return requests

    def _free_slot(self) -> int | None:
        """A free slot on the `data` shard with the fewest live slots (ties: lowest shard)."""
        load: dict[int, int] = collections.Counter()
        free: dict[int, int] = {}
        for i, r in enumerate(self.running):
            shard = self.engine.shard_of(i)
            if r is None:
                free.setdefault(shard, i)
            else:
                load[shard] += 1
        if not free:
            return None
        return free[min(free, key=lambda shard: (load[shard], shard))]

    def _finish(self, request: Request, slot: int | None) -> None:
        if slot is not None:
            self.running[slot] = None
            self.tokens[slot] = self.positions[slot] = 0
        self.metrics.record_finished(request)

    def _update_gauges(self) -> None:
        self.metrics.queue_length = len(self.waiting)
        self.metrics.live_slots = sum(r is not None for r in self.running)
