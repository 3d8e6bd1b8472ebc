"""The scheduler alone, against a fake engine (no JAX): plans are data, decided on the host."""

import dataclasses

import numpy as np
import pytest

from shardinfer.engine.params import SamplingParams
from shardinfer.engine.plan import (
    DECODE,
    PREFILL,
    SlotLayout,
    StepPlan,
    StepResult,
    capacities,
    decode_buckets,
    prefill_row_counts,
    prompt_widths,
)
from shardinfer.engine.request import Request
from shardinfer.engine.scheduler import Scheduler

LAYOUT = SlotLayout(slots=8, data_shards=2, prefill_rows=4, max_seq_len=512, min_capacity=128)
EOS = 0


class FakeEngine:
    """Samples token (slot + position) % 7 + 1 for each row: a pure function of the plan, and
    records every plan it executed."""

    def __init__(self):
        self.plans: list[StepPlan] = []

    def execute(self, plan: StepPlan) -> StepResult:
        self.plans.append(plan)
        return StepResult(((plan.slots + plan.lengths) % 7 + 1).astype(np.int32))


def _request(length: int, max_tokens: int, seed=None, temperature=0.0) -> Request:
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
    return Request(list(range(1, length + 1)), params, frozenset({EOS}), None, LAYOUT.max_seq_len)


def _arrivals():
    """(step at which it arrives, request)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(14):
        seed = None if i % 3 else i
        temperature = 0.0 if i % 2 else 0.8
        out.append((int(rng.integers(0, 20)), _request(int(rng.integers(1, 200)),
                    int(rng.integers(1, 30)), seed, temperature)))  # fmt: skip
    return out


def _drive(scheduler: Scheduler, engine: FakeEngine, arrivals, limit: int = 500) -> None:
    arrivals = sorted(arrivals, key=lambda a: a[0])
    step = 0
    while (arrivals or scheduler.has_work()) and step < limit:
        while arrivals and arrivals[0][0] <= step:
            scheduler.add(arrivals.pop(0)[1])
        plan = scheduler.plan()
        if plan is not None:
            scheduler.commit(plan, engine.execute(plan))
        step += 1
    assert not arrivals and not scheduler.has_work()


def _plan_key(plan: StepPlan):
    return tuple((k, v.tobytes(), v.shape) for k, v in sorted(plan.arrays().items()))


def test_the_same_arrivals_give_the_same_plans():
    runs = []
    for _ in range(2):
        engine = FakeEngine()
        _drive(Scheduler(LAYOUT, seed=5), engine, _arrivals())
        runs.append([_plan_key(p) for p in engine.plans])
    assert runs[0] == runs[1] and len(runs[0]) > 20


def test_every_plan_is_set_and_its_shapes_come_from_the_fixed_set():
    engine = FakeEngine()
    _drive(Scheduler(LAYOUT, seed=1), engine, _arrivals())
    rows_per_kind = {PREFILL: set(), DECODE: set()}
    for plan in engine.plans:
        arrays = plan.arrays()
        for name, value in arrays.items():
            assert value.dtype != object, name
            if value.ndim:
                assert value.shape[0] == plan.rows, name  # every row has every field
        assert plan.capacity in capacities(LAYOUT)
        assert (plan.lengths >= 1).all() and (plan.lengths <= plan.capacity).all()
        if plan.kind == PREFILL:
            assert plan.rows in prefill_row_counts(LAYOUT)
            assert plan.tokens.shape[1] in prompt_widths(LAYOUT)
            assert plan.tokens.shape[1] <= plan.capacity
            kept = plan.slots[plan.slots < LAYOUT.slots]
            assert len(set(kept.tolist())) == len(kept)  # no two rows share a slot
        else:
            bucket = plan.rows // LAYOUT.data_shards
            assert bucket in decode_buckets(LAYOUT)
            # Row r lies in shard r // bucket: each shard's rows stay on their own device.
            shards = [LAYOUT.shard_of(int(s)) for s in plan.slots]
            assert shards == sorted(shards) and shards == [r // bucket for r in range(plan.rows)]
            assert len(set(plan.slots.tolist())) == plan.rows
        rows_per_kind[plan.kind].add(plan.rows)
    assert rows_per_kind[PREFILL] == {1, 4}
    assert len(rows_per_kind[DECODE]) >= 2  # the bucket followed the live slots
    back = StepPlan.from_arrays(engine.plans[0].arrays())
    assert _plan_key(back) == _plan_key(engine.plans[0])


def test_a_request_done_on_its_first_token_leaves_its_slot_free():
    scheduler, engine = Scheduler(LAYOUT, seed=0), FakeEngine()
    one = _request(5, max_tokens=1)
    scheduler.add(one)
    plan = scheduler.plan()
    assert plan.kind == PREFILL and plan.slots[0] < LAYOUT.slots  # the slot is fixed up front
    scheduler.commit(plan, engine.execute(plan))
    assert one.done and len(one.output_ids) == 1
    assert scheduler.live_slots() == 0 and not scheduler.has_work()
    assert scheduler.plan() is None


def test_decode_runs_over_a_bucket_of_the_live_slots():
    scheduler, engine = Scheduler(LAYOUT, seed=0), FakeEngine()
    lone = _request(3, max_tokens=6)
    _drive(scheduler, engine, [(0, lone)])
    decodes = [p for p in engine.plans if p.kind == DECODE]
    # One request on 8 slots over 2 shards: one row per shard, not all 8.
    assert decodes and all(p.rows == 2 for p in decodes)
    assert len(lone.output_ids) == 6


def test_new_requests_go_to_the_least_loaded_data_shard():
    scheduler = Scheduler(LAYOUT, seed=0)
    for _ in range(3):
        scheduler.add(_request(4, max_tokens=50))
    plan = scheduler.plan()
    assert plan.kind == PREFILL and plan.slots[:3].tolist() == [0, 4, 1]


def test_sampled_rows_get_seeds_and_arrivals_do_not_starve_running_requests():
    scheduler, engine = Scheduler(LAYOUT, seed=3), FakeEngine()
    scheduler.add(_request(4, max_tokens=20, temperature=1.0, seed=None))
    scheduler.add(_request(4, max_tokens=20, temperature=1.0, seed=42))
    plan = scheduler.plan()
    assert plan.sampling.seed[1] == 42 and plan.sampling.temperature[0] == 1.0
    scheduler.commit(plan, engine.execute(plan))
    kinds = []
    for _ in range(6):
        scheduler.add(_request(4, max_tokens=20))
        plan = scheduler.plan()
        kinds.append(plan.kind)
        scheduler.commit(plan, engine.execute(plan))
    assert kinds == [DECODE, PREFILL] * 3


def test_commit_needs_the_plan_just_made():
    scheduler, engine = Scheduler(LAYOUT, seed=0), FakeEngine()
    scheduler.add(_request(4, max_tokens=3))
    plan = scheduler.plan()
    with pytest.raises(RuntimeError, match="not committed"):
        scheduler.plan()
    other = dataclasses.replace(plan)
    with pytest.raises(RuntimeError, match="plan\\(\\) returned last"):
        scheduler.commit(other, engine.execute(other))


def test_a_failed_step_fails_what_ran_and_keeps_the_queue():
    scheduler, engine = Scheduler(LAYOUT, seed=0), FakeEngine()
    running = _request(4, max_tokens=10)
    scheduler.add(running)
    plan = scheduler.plan()
    scheduler.commit(plan, engine.execute(plan))
    admitted, queued = _request(4, max_tokens=10), _request(5, max_tokens=10)
    scheduler.add(admitted)
    plan = scheduler.plan()  # decodes `running`
    scheduler.fail(plan)
    assert running.finish_reason == "error" and scheduler.live_slots() == 0
    scheduler.add(queued)
    plan = scheduler.plan()  # the queue survived: both are admitted now
    assert plan.kind == PREFILL and plan.rows == 4
    scheduler.commit(plan, engine.execute(plan))
    assert len(admitted.output_ids) == 1 and len(queued.output_ids) == 1
