"""One engine step as data: what the scheduler decided (StepPlan) and what came back (StepResult).

A plan is a handful of numpy arrays whose shapes come from a small fixed set, plus two ints. It
holds everything the devices need and nothing that differs between processes (no clock, no
random ids, no Python objects), so process 0 can decide it and every process execute it.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from shardinfer.engine.params import SamplingArrays

PREFILL, DECODE = 0, 1


class SlotLayout(NamedTuple):
    """What the scheduler must know of the engine to plan for it."""

    slots: int  # cache rows, split in contiguous blocks over the `data` shards
    data_shards: int
    prefill_rows: int  # the wider of the two prefill row counts (the other is 1)
    max_seq_len: int
    min_capacity: int  # the cache's smallest length

    @property
    def slots_per_shard(self) -> int:
        return self.slots // self.data_shards

    def shard_of(self, slot: int) -> int:
        return slot // self.slots_per_shard


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """One step. Rows are prefill rows (1 or `prefill_rows`) or decode rows (a power-of-two
    bucket of slots per `data` shard, shard after shard: row r belongs to shard r // bucket).

    The token a row samples goes to position `lengths[r]`; its random key is folded from the
    row's seed and that position, so a seeded request draws the same tokens in any slot."""

    kind: int  # PREFILL or DECODE
    # prefill: [rows, width] prompts, right-padded to a power-of-two width; decode: [rows], the
    # input token of each row (the last one sampled for its slot).
    tokens: np.ndarray
    # [rows] int32: tokens of each row in the cache after this step (prefill: the prompt
    # length, 1 for a padding row; decode: the input token's position + 1).
    lengths: np.ndarray
    # [rows] int32: the cache row each row writes (decode: and reads). Prefill rows that are
    # not kept (padding) hold `slots`, which the insert drops. Fixed before the result is
    # known: a request done on its first token has its k/v written, then its slot freed.
    slots: np.ndarray
    sampling: SamplingArrays  # [rows] each, seeds resolved
    capacity: int  # the cache length this step runs at (a power of two >= min_capacity)

    @property
    def rows(self) -> int:
        return int(self.lengths.shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        """Every field as a numpy array (for a broadcast to other processes)."""
        out = {
            "kind": np.array(self.kind, np.int32),
            "capacity": np.array(self.capacity, np.int32),
            "tokens": self.tokens,
            "lengths": self.lengths,
            "slots": self.slots,
        }
        for name, value in zip(("temperature", "top_k", "top_p", "seed"),
                               self.sampling.as_tuple(), strict=True):  # fmt: skip
            out[name] = value
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> StepPlan:
        sampling = SamplingArrays(
            arrays["temperature"], arrays["top_k"], arrays["top_p"], arrays["seed"]
        )
        return cls(
            int(arrays["kind"]),
            arrays["tokens"],
            arrays["lengths"],
            arrays["slots"],
            sampling,
            int(arrays["capacity"]),
        )


@dataclasses.dataclass(frozen=True)
class StepResult:
    tokens: np.ndarray  # [rows] int32: the token each row sampled (on the host, every process)


# The shortest prompt width: prompts are right-padded to a power of two from here up.
MIN_PROMPT_WIDTH = 16


def power_of_two_at_least(n: int, smallest: int, limit: int) -> int:
    """The next power of two >= n (at least `smallest`), capped at `limit`."""
    size = smallest
    while size < n:
        size *= 2
    return min(size, limit)


def _ladder(smallest: int, limit: int) -> list[int]:
    sizes = [min(smallest, limit)]
    while sizes[-1] < limit:
        sizes.append(min(sizes[-1] * 2, limit))
    return sizes


# The fixed set of shapes a plan can have (what `warmup` compiles).
def prompt_widths(layout: SlotLayout) -> list[int]:
    return _ladder(MIN_PROMPT_WIDTH, layout.max_seq_len)


def capacities(layout: SlotLayout) -> list[int]:
    return _ladder(layout.min_capacity, layout.max_seq_len)


def decode_buckets(layout: SlotLayout) -> list[int]:
    """Decode rows per `data` shard: powers of two below the shard's slot count, and it."""
    return _ladder(1, layout.slots_per_shard)


def prefill_row_counts(layout: SlotLayout) -> list[int]:
    return sorted({1, layout.prefill_rows})
