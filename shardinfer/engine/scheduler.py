"""The host side of continuous batching: a queue, the slots, and plan/commit for each step.

`plan()` decides one step: it either admits waiting requests into free slots (one prefill of
1 or `prefill_rows` rows, each row's slot fixed now) or advances every live slot by one decode
step, over the smallest power-of-two bucket of slots per `data` shard that holds them all.
`commit(plan, result)` applies the sampled tokens. A step that admits is followed by a decode
step whenever requests are running, so arrivals cannot starve them; a new request's first
token is handed out by the admitting step itself. A finished request frees its slot at once.

No JAX here: the engine executes plans, and any object with the same `execute` will do.
"""

from __future__ import annotations

import collections
import random
import secrets

import numpy as np

from shardinfer.engine.metrics import EngineMetrics
from shardinfer.engine.params import SamplingArrays
from shardinfer.engine.plan import (
    DECODE,
    MIN_PROMPT_WIDTH,
    PREFILL,
    SlotLayout,
    StepPlan,
    StepResult,
    power_of_two_at_least,
)
from shardinfer.engine.request import Request


class Scheduler:
    def __init__(self, layout: SlotLayout, seed: int | None = None):
        """`seed` feeds the seeds drawn for requests that bring none (default: random)."""
        self.layout = layout
        slots = layout.slots
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request | None] = [None] * slots
        self.tokens = np.zeros(slots, np.int32)  # each slot's next input token
        self.cached = np.zeros(slots, np.int32)  # tokens of each slot in the cache
        self.sampling = SamplingArrays.greedy(slots)
        self.capacity = layout.min_capacity
        self.metrics = EngineMetrics(slots)
        self._rng = random.Random(secrets.randbits(64) if seed is None else seed)
        self._planned: tuple[StepPlan, list[Request | None]] | None = None
        self._admitted_last_step = False

    # ---- requests in and out -----------------------------------------------------------------

    def add(self, request: Request) -> None:
        self.waiting.append(request)
        self._update_gauges()

    def abort(self, request: Request) -> None:
        """Drops a request (a client that went away); its slot is free for the next step."""
        if request in self.waiting:
            self.waiting.remove(request)
        for slot, r in enumerate(self.running):
            if r is request:
                self._free(slot)
        if request.finish_reason is None:
            request.finish_reason = "abort"
        self._update_gauges()

    def has_work(self) -> bool:
        return bool(self.waiting) or self.live_slots() > 0

    def live_slots(self) -> int:
        return sum(r is not None for r in self.running)

    # ---- planning -----------------------------------------------------------------------------

    def plan(self) -> StepPlan | None:
        """The next step, or None when there is nothing to do. Call `commit` before the next
        `plan`."""
        if self._planned is not None:
            raise RuntimeError("the previous plan was not committed")
        live = self.live_slots()
        can_admit = bool(self.waiting) and live < self.layout.slots
        if can_admit and not (self._admitted_last_step and live):
            plan, rows = self._plan_prefill()
        elif live:
            plan, rows = self._plan_decode()
        else:
            return None
        self._planned = (plan, rows)
        self._admitted_last_step = plan.kind == PREFILL
        return plan

    def _plan_prefill(self) -> tuple[StepPlan, list[Request | None]]:
        layout = self.layout
        group: list[tuple[Request, int]] = []
        while self.waiting and len(group) < layout.prefill_rows:
            slot = self._free_slot()
            if slot is None:
                break
            request = self.waiting.popleft()
            self.running[slot] = request  # reserved now, so the next choice sees the load
            group.append((request, slot))
        rows = 1 if len(group) == 1 else layout.prefill_rows
        longest = max(len(r.prompt_ids) for r, _ in group)
        width = power_of_two_at_least(longest, MIN_PROMPT_WIDTH, layout.max_seq_len)
        tokens = np.zeros((rows, width), np.int32)
        lengths = np.ones(rows, np.int32)  # padding rows: one dummy token
        slots = np.full(rows, layout.slots, np.int32)  # out of range: not kept
        sampling = SamplingArrays.greedy(rows)
        for i, (request, slot) in enumerate(group):
            tokens[i, : len(request.prompt_ids)] = request.prompt_ids
            lengths[i], slots[i] = len(request.prompt_ids), slot
            sampling.set(i, request.params, self._seed_of(request))
        # The insert writes `width` positions, so the cache must hold them.
        capacity = max(self.capacity, self._capacity_for(width))
        self._update_gauges()
        plan = StepPlan(PREFILL, tokens, lengths, slots, sampling, capacity)
        return plan, [r for r, _ in group] + [None] * (rows - len(group))

    def _plan_decode(self) -> tuple[StepPlan, list[Request | None]]:
        """Every live slot, in the smallest bucket per `data` shard that holds them all; the
        bucket's other rows are free slots of that shard, fed a dummy token at position 0
        (harmless: a free slot's cache is rewritten when it is next filled)."""
        layout = self.layout
        per_shard = layout.slots_per_shard
        shards = [range(s * per_shard, (s + 1) * per_shard) for s in range(layout.data_shards)]
        live = [[i for i in shard if self.running[i] is not None] for shard in shards]
        bucket = power_of_two_at_least(max(map(len, live)), 1, per_shard)
        if bucket == per_shard:
            slots = np.arange(layout.slots, dtype=np.int32)  # the whole cache, in order
        else:
            rows = []
            for shard, used in zip(shards, live, strict=True):
                free = [i for i in shard if self.running[i] is None]
                rows += used + free[: bucket - len(used)]
            slots = np.array(rows, np.int32)
        is_live = np.array([self.running[s] is not None for s in slots])
        tokens = np.where(is_live, self.tokens[slots], 0).astype(np.int32)
        lengths = np.where(is_live, self.cached[slots] + 1, 1).astype(np.int32)
        sampling = self.sampling.take(slots)
        capacity = self._capacity_for(int(lengths.max()))
        plan = StepPlan(DECODE, tokens, lengths, slots, sampling, capacity)
        return plan, [self.running[s] for s in slots]

    def _capacity_for(self, positions: int) -> int:
        """The cache length holding `positions`: at decode the attention reads all of it, and
        reading all of max_seq_len every step cost more than the weights at batch 32."""
        layout = self.layout
        return power_of_two_at_least(positions, layout.min_capacity, layout.max_seq_len)

    def _seed_of(self, request: Request) -> int:
        seed = request.params.seed
        return self._rng.getrandbits(32) if seed is None else seed % 2**32

    def _free_slot(self) -> int | None:
        """The lowest free slot on the `data` shard with the fewest live slots (ties: lowest
        shard), which keeps the shards' buckets small and even."""
        load: dict[int, int] = collections.Counter()
        free: dict[int, int] = {}
        for i, r in enumerate(self.running):
            shard = self.layout.shard_of(i)
            if r is None:
                free.setdefault(shard, i)
            else:
                load[shard] += 1
        if not free:
            return None
        return free[min(free, key=lambda shard: (load[shard], shard))]

    def fail(self, plan: StepPlan) -> list[Request]:
        """The plan failed to execute. The cache may be lost with it (a program that failed
        after its cache was donated), so every request in a slot ends with "error" and its
        slot is freed; waiting requests stay queued. Returns the failed requests."""
        if self._planned is not None and self._planned[0] is plan:
            self._planned = None
        failed = [r for r in self.running if r is not None]
        for slot, request in enumerate(self.running):
            if request is not None:
                request.finish_reason = request.finish_reason or "error"
                self._free(slot)
        self._admitted_last_step = False
        self._update_gauges()
        return failed

    # ---- committing ---------------------------------------------------------------------------

    def commit(self, plan: StepPlan, result: StepResult) -> list[Request]:
        """Applies a step's sampled tokens; returns the requests that got one."""
        if self._planned is None or self._planned[0] is not plan:
            raise RuntimeError("commit() must get the plan that plan() returned last")
        _, rows = self._planned
        self._planned = None
        self.capacity = plan.capacity
        touched = []
        for row, request in enumerate(rows):
            slot = int(plan.slots[row])
            if request is None or request.done or self.running[slot] is not request:
                continue  # padding, or aborted since the plan was made
            token = int(result.tokens[row])
            request.append(token)
            touched.append(request)
            self.metrics.tokens_generated += 1
            if plan.kind == PREFILL:
                self.metrics.prefill_tokens += len(request.prompt_ids)
                if self.metrics.first_token_at is None:
                    self.metrics.first_token_at = request.first_token_at
                self.sampling.copy_row(slot, plan.sampling, row)
            self.tokens[slot], self.cached[slot] = token, plan.lengths[row]
            if request.done:
                self.metrics.record_finished(request)
                self._free(slot)
        if plan.kind == DECODE:
            self.metrics.decode_steps += 1
        self._update_gauges()
        return touched

    def _free(self, slot: int) -> None:
        self.running[slot] = None
        self.tokens[slot] = self.cached[slot] = 0
        self.sampling.copy_row(slot, SamplingArrays.greedy(1), 0)

    def _update_gauges(self) -> None:
        self.metrics.queue_length = len(self.waiting)
        self.metrics.live_slots = self.live_slots()
