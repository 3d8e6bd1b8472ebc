"""The device side of generation: execute a step plan over the model's mesh.

Every jitted call has shapes from the small fixed set in plan.py (prompt widths, prefill row
counts, decode buckets, cache capacities), so after `warmup` no workload compiles anything.
The cache is owned here, passed into each program and donated, never hidden in the model.
Inputs are placed one way (`place`); the sampled tokens come back replicated, so every
process can read them.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shardinfer.engine.kv_cache import (
    KVCache,
    cache_spec,
    gather_rows,
    init_cache,
    insert,
    resize,
    write_rows,
)
from shardinfer.engine.params import SamplingArrays
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
from shardinfer.engine.sampling import sample
from shardinfer.model import Model
from shardinfer.sharding import fetch_replicated, place
from shardinfer.xla_options import step_compiler_options

log = logging.getLogger("shardinfer")

# Requests that arrive together are prefilled together, up to this many rows at a time; a
# lone request is prefilled alone. Two row counts keep the set of compiled shapes small.
PREFILL_ROWS = 8
# The cache's smallest length; it grows (and shrinks) in powers of two with the furthest
# position in use, so a decode step attends over the whole array and never slices its
# positions (on XLA:CPU such a slice was a copy per layer, ~30% of a batch-32 step).
DECODE_MIN_CACHE = 128
# Threads that compile (or load from the persistent cache) while warmup lowers the next program.
WARMUP_THREADS = 2


def prefill_logits(graphdef, state, tokens, lengths):
    """tokens [B, T] right-padded, lengths [B] -> logits [B, V] at each last prompt token, and
    every layer's k/v [B, T, ...] (which `insert` copies into the cache)."""
    model = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    hidden, new_kv = model(tokens, positions)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)  # [B, 1, E]
    return model.logits(last)[:, 0], new_kv


def decode_logits(graphdef, state, cache: KVCache, tokens, positions, cache_len: int = 0):
    """tokens [B] at positions [B] -> logits [B, V] for the token after each, and this step's
    k/v (which `write_rows` puts into the cache). With `cache_len`, attention reads only the
    first cache_len positions (all < cache_len)."""
    model = nnx.merge(graphdef, state)
    hidden, new_kv = model(tokens[:, None], positions[:, None], cache, cache_len)
    return model.logits(hidden)[:, 0], new_kv


class Engine:
    """`slots` cache rows over the model's mesh (split evenly over the `data` axis)."""

    def __init__(self, model: Model, slots: int, max_seq_len: int):
        self.model, self.slots, self.max_seq_len = model, slots, max_seq_len
        shards = model.data_size
        self.layout = SlotLayout(
            slots, shards, min(PREFILL_ROWS, slots), max_seq_len,
            min(DECODE_MIN_CACHE, max_seq_len),
        )  # fmt: skip
        graphdef, sharder = model.graphdef, model.sharder
        # The programs take the weights as a flat list: flattening an nnx State costs ~1 ms
        # per call at ~700 arrays (an unrolled model), against ~0.3 ms for a plain list.
        self.weights, treedef = jax.tree.flatten(model.state)
        unflat = partial(jax.tree.unflatten, treedef)

        def prefill(weights, tokens, lengths, sampling):
            logits, kv = prefill_logits(graphdef, unflat(weights), tokens, lengths)
            return sharder.replicate(sample(logits, lengths, *sampling)), kv

        def decode(weights, cache, tokens, lengths, slot_ids, sampling):
            whole = tokens.shape[0] == slots  # the full bucket reads the cache in place
            view = cache if whole else gather_rows(cache, slot_ids, shards)
            logits, new_kv = decode_logits(graphdef, unflat(weights), view, tokens, lengths - 1)
            return sharder.replicate(sample(logits, lengths, *sampling)), new_kv

        options = step_compiler_options(model.platform, model.dtype, model.quantize)
        jit = partial(jax.jit, compiler_options=options)
        # Prefill and insert are two programs: as one, every (width, rows, capacity) would be
        # a compile of the whole model; apart, only the tiny insert depends on the capacity.
        self._prefill = jit(prefill)
        self._insert = jit(insert, donate_argnums=(0,))
        # The step reads the cache and a second call writes the new k/v in place: in one
        # program, XLA:CPU copied the whole (donated) cache twice per step to order the
        # attention's reads before the in-place write.
        self._decode = jit(decode)
        self._write = jit(partial(write_rows, shards=shards), donate_argnums=(0,))
        self._resize = jit(resize, static_argnums=(1,))  # a new shape: nothing to donate
        self.reset_cache()

    def reset_cache(self) -> None:
        """A fresh, empty cache at the smallest capacity (at start, and after a failed step,
        which may have consumed the donated one)."""
        model = self.model
        self.capacity = self.layout.min_capacity
        stacked = model.layer_loop == "scan"
        self.cache = init_cache(model.config, model.sharder, self.slots, self.capacity,
                                model.dtype, stacked)  # fmt: skip

    def execute(self, plan: StepPlan) -> StepResult:
        """Runs one plan: prefill and insert, or one decode step and its cache write."""
        self._fit(plan.capacity)
        if plan.kind == PREFILL:
            tokens, lengths, slots, sampling = self._prefill_inputs(plan)
            first, kv = self._prefill(self.weights, tokens, lengths, sampling)
            self.cache = self._insert(self.cache, kv, slots)
            return StepResult(fetch_replicated(first))
        if plan.kind != DECODE:
            raise ValueError(f"unknown step kind {plan.kind}")
        if plan.rows == self.slots and (plan.slots != np.arange(self.slots)).any():
            # The full bucket reads and writes the cache in place, row r = slot r.
            raise ValueError("a decode plan over every slot must list them in order")
        tokens, lengths, slots, positions, sampling = self._decode_inputs(plan)
        new, new_kv = self._decode(self.weights, self.cache, tokens, lengths, slots, sampling)
        self.cache = self._write(self.cache, new_kv, slots, positions)
        return StepResult(fetch_replicated(new))

    def _prefill_inputs(self, plan: StepPlan) -> tuple:
        """Prefill inputs are placed whole on every device (1 or 8 rows need not divide
        `data`); the model's constraints then split the batch where it divides, and the
        insert moves each row to its slot's shard."""
        rows = lambda a: place(self.model.sharder, a, (None,) * a.ndim)  # noqa: E731
        sampling = tuple(rows(a) for a in plan.sampling.as_tuple())
        return rows(plan.tokens), rows(plan.lengths), rows(plan.slots), sampling

    def _decode_inputs(self, plan: StepPlan) -> tuple:
        rows = lambda a: place(self.model.sharder, a, ("batch",))  # noqa: E731
        sampling = tuple(rows(a) for a in plan.sampling.as_tuple())
        return (rows(plan.tokens), rows(plan.lengths), rows(plan.slots),
                rows(plan.lengths - 1), sampling)  # fmt: skip

    def _fit(self, capacity: int) -> None:
        """Resizes the cache to `capacity` positions (the plan made sure nothing live is cut)."""
        if capacity != self.capacity:
            self.cache = self._resize(self.cache, capacity)
            self.capacity = capacity

    def warmup(self) -> dict[str, float]:
        """Compiles (or loads from the persistent cache) every program a plan can call:
        prefills of each row count and width, inserts and decode buckets at each capacity,
        and every resize between capacities. Nothing runs: `jit(f).lower(...).compile()` fills
        the same cache that `jit(f)(...)` reads, so later calls find the programs ready."""
        layout, model, started = self.layout, self.model, time.perf_counter()
        caps = capacities(layout)
        stacked = model.layer_loop == "scan"
        spec = {c: cache_spec(model.config, model.sharder, self.slots, c, model.dtype, stacked)
                for c in caps}  # fmt: skip
        # Lowering is Python (one thread); XLA compiles, or reads the persistent cache, in
        # worker threads meanwhile. An insert or write is lowered once the program before it
        # in a step is compiled: its input is that program's output, shardings included.
        with concurrent.futures.ThreadPoolExecutor(WARMUP_THREADS) as pool:
            compile_ = lambda lowered: pool.submit(lowered.compile)  # noqa: E731
            followers = []
            for rows, width in itertools.product(prefill_row_counts(layout),
                                                 prompt_widths(layout)):  # fmt: skip
                fits = [c for c in caps if c >= width]
                tokens, lengths, slots, sampling = self._prefill_inputs(
                    _warmup_prefill(layout, rows, width, fits[0])
                )
                prefill = compile_(self._prefill.lower(self.weights, tokens, lengths, sampling))
                inserts = [lambda kv, c=c, s=slots: self._insert.lower(spec[c], kv, s)
                           for c in fits]  # fmt: skip
                followers.append((prefill, inserts))
            for cap, bucket in itertools.product(caps, decode_buckets(layout)):
                tokens, lengths, slots, positions, sampling = self._decode_inputs(
                    _warmup_decode(layout, bucket, cap)
                )
                decode = compile_(self._decode.lower(self.weights, spec[cap], tokens, lengths,
                                                     slots, sampling))  # fmt: skip
                write = lambda kv, c=cap, s=slots, p=positions: self._write.lower(spec[c], kv, s, p)  # noqa: E731
                followers.append((decode, [write]))
            pending = [compile_(self._resize.lower(spec[a], b))
                       for a, b in itertools.permutations(caps, 2)]  # fmt: skip
            for first, nexts in followers:
                kv = _output_spec(first.result())[1]
                pending += [compile_(lower(kv)) for lower in nexts]
            for future in pending:
                future.result()
        seconds = time.perf_counter() - started
        log.info("warm-up: %.1f s", seconds)
        return {"seconds": seconds}


def _output_spec(compiled) -> object:
    """A compiled program's outputs as ShapeDtypeStructs with their shardings (what the next
    program in a step receives)."""
    return jax.tree.map(
        lambda info, sharding: jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=sharding),
        compiled.out_info,
        compiled.output_shardings,
    )


def _warmup_prefill(layout: SlotLayout, rows: int, width: int, capacity: int) -> StepPlan:
    """A prefill of `rows` full-width rows, shaped as the scheduler would plan it."""
    sampling = SamplingArrays.greedy(rows)
    slots = np.arange(rows, dtype=np.int32) % layout.slots
    tokens = np.zeros((rows, width), np.int32)
    lengths = np.full(rows, width, np.int32)
    return StepPlan(PREFILL, tokens, lengths, slots, sampling, capacity)


def _warmup_decode(layout: SlotLayout, bucket: int, capacity: int) -> StepPlan:
    per_shard = layout.slots_per_shard
    slots = np.array(
        [s * per_shard + i for s in range(layout.data_shards) for i in range(bucket)], np.int32
    )
    rows = len(slots)
    return StepPlan(
        DECODE, np.zeros(rows, np.int32), np.ones(rows, np.int32), slots,
        SamplingArrays.greedy(rows), capacity,
    )  # fmt: skip
