"""Step plans from process 0 to every process, in one fixed-size int32 buffer.

`multihost_utils.broadcast_one_to_all` compiles one program per shape; a fixed buffer (sized
for the largest plan the layout allows) keeps that to one, whatever each plan's shapes.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from jax.experimental import multihost_utils

from shardinfer.engine.params import SamplingArrays
from shardinfer.engine.plan import SlotLayout, StepPlan


def is_master() -> bool:
    return jax.process_index() == 0


def multi_process() -> bool:
    return jax.process_count() > 1


# Message kinds besides StepPlan's PREFILL (0) and DECODE (1).
DONE = 2  # the current run is over: workers return from `follow`
IDLE = 3  # nothing to do yet: keeps the followers' collective from waiting forever
_HEADER = 4  # kind, capacity, rows, width


def buffer_size(layout: SlotLayout) -> int:
    """int32 words for the largest plan of this layout."""
    rows = max(layout.prefill_rows, layout.slots)
    tokens = max(layout.prefill_rows * layout.max_seq_len, layout.slots)
    return _HEADER + tokens + rows * 6  # lengths, slots, 4 sampling arrays


def encode(plan: StepPlan | int | None, size: int) -> np.ndarray:
    """A plan (None: DONE; or a message kind) as `size` int32 words; floats as their bits."""
    out = np.zeros(size, np.int32)
    if plan is None or isinstance(plan, int):
        out[0] = DONE if plan is None else plan
        return out
    rows = plan.rows
    width = plan.tokens.shape[1] if plan.tokens.ndim == 2 else 0
    out[:_HEADER] = plan.kind, plan.capacity, rows, width
    s = plan.sampling
    parts = [plan.tokens.ravel(), plan.lengths, plan.slots, s.temperature.view(np.int32),
             s.top_k, s.top_p.view(np.int32), s.seed.view(np.int32)]  # fmt: skip
    flat = np.concatenate([np.asarray(p, np.int32) for p in parts])
    if _HEADER + flat.size > size:
        raise ValueError(f"a plan of {flat.size} words does not fit a {size}-word buffer")
    out[_HEADER : _HEADER + flat.size] = flat
    return out


def decode(buffer: np.ndarray) -> StepPlan | int | None:
    """A plan, None for DONE, or IDLE."""
    kind, capacity, rows, width = (int(v) for v in buffer[:_HEADER])
    if kind == DONE:
        return None
    if kind == IDLE:
        return IDLE
    n_tokens = rows * width if width else rows
    at = _HEADER

    def take(n: int) -> np.ndarray:
        nonlocal at
        part = np.array(buffer[at : at + n])
        at += n
        return part

    tokens = take(n_tokens).reshape((rows, width) if width else (rows,))
    lengths, slots = take(rows), take(rows)
    temperature, top_k = take(rows).view(np.float32), take(rows)
    top_p, seed = take(rows).view(np.float32), take(rows).view(np.uint32)
    sampling = SamplingArrays(temperature, top_k, top_p, seed)
    return StepPlan(kind, tokens, lengths, slots, sampling, capacity)


def broadcast_plan(plan: StepPlan | int | None, size: int) -> StepPlan | int | None:
    """Process 0's plan (None: DONE; or IDLE), on every process."""
    sent = encode(plan if is_master() else None, size)
    return decode(np.asarray(multihost_utils.broadcast_one_to_all(sent)))


def broadcast_value(value: np.ndarray) -> np.ndarray:
    """Process 0's array (any shape the other processes know) on every process."""
    return np.asarray(multihost_utils.broadcast_one_to_all(value))


def share_json(value: object) -> object:
    """Process 0's JSON-able value on every process (for results at the end of a run; each
    call compiles a broadcast for its length, so not for every step)."""
    data = np.frombuffer(json.dumps(value).encode(), np.uint8) if is_master() else None
    size = broadcast_value(np.array([0 if data is None else data.size], np.int64))[0]
    payload = data if data is not None else np.zeros(int(size), np.uint8)
    return json.loads(broadcast_value(payload).tobytes().decode())
