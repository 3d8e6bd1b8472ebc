"""Sampling settings on the host: SamplingParams (OpenAI names) and their per-row arrays.

numpy only, no JAX: the scheduler builds step plans from these, and a plan must be the same
on every process (seeds are resolved by the scheduler, never drawn here).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0:  # also catches NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop must be non-empty strings, got {stop!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative ints: {self.stop_token_ids!r}")


@dataclasses.dataclass
class SamplingArrays:
    """Per-row sampling settings as host arrays of one fixed batch size."""

    temperature: np.ndarray  # [batch] float32
    top_k: np.ndarray  # [batch] int32
    top_p: np.ndarray  # [batch] float32
    seed: np.ndarray  # [batch] uint32

    @classmethod
    def greedy(cls, rows: int) -> SamplingArrays:
        """Greedy rows (padding, and free slots)."""
        return cls(
            np.zeros(rows, np.float32),
            np.zeros(rows, np.int32),
            np.ones(rows, np.float32),
            np.zeros(rows, np.uint32),
        )

    def take(self, rows) -> SamplingArrays:
        """The settings of `rows` (indices), in that order."""
        return SamplingArrays(*(a[rows] for a in self.as_tuple()))

    def set(self, row: int, params: SamplingParams, seed: int) -> None:
        """Row `row` takes `params`, drawing with `seed` (already resolved by the scheduler)."""
        self.temperature[row] = params.temperature
        self.top_k[row] = params.top_k
        self.top_p[row] = params.top_p
        self.seed[row] = seed % 2**32

    def copy_row(self, row: int, other: SamplingArrays, other_row: int) -> None:
        """Row `row` takes row `other_row` of `other`."""
        for mine, theirs in zip(self.as_tuple(), other.as_tuple(), strict=True):
            mine[row] = theirs[other_row]

    def as_tuple(self):
        return (self.temperature, self.top_k, self.top_p, self.seed)
