"""The routing policy, one for both routers: the in-process one over replicas
(serving/router.py) and the HTTP one over servers (serving/proxy.py).

Least-loaded prefers a target where the request gets a decode slot at once: a decode step costs
about the same however many slots are live, so a free slot means the request runs at full
speed now, while a full target makes it wait for some other request to end. Among targets that
all have (or all lack) a free slot it picks the one that will work off what it already holds
soonest: outstanding tokens (still to generate, for everything queued or running there)
divided by the tokens per second it has been measured to generate, so a target twice as fast
takes about twice the work; then fewer waiting requests, then the lowest index. Round-robin is
kept for comparison (benchmarks/serve.py, benchmarks/router.py).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

POLICIES = ("least_loaded", "round_robin")


@dataclasses.dataclass(frozen=True)
class Load:
    """What a router knows of one target when it picks."""

    free_slots: int | None  # None: the target does not say (e.g. a vLLM server)
    outstanding_tokens: float
    waiting: int = 0
    speed: float | None = None  # generated tokens/s, measured; None: not measured yet


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"unknown routing policy {policy!r}; use one of {POLICIES}")
    return policy


class Policy:
    """`pick(loads)` -> the index of the target to send the next request to."""

    def __init__(self, policy: str = "least_loaded"):
        self.name = check_policy(policy)
        self._turn = itertools.count()

    def pick(self, loads: Sequence[Load]) -> int:
        if not loads:
            raise ValueError("no target to pick from")
        if self.name == "round_robin":
            return next(self._turn) % len(loads)
        known = [x.speed for x in loads if x.speed]
        # Targets not measured yet count as the mean of those that are (all alike at first).
        default = sum(known) / len(known) if known else 1.0

        def key(i: int) -> tuple:
            x = loads[i]
            full = x.free_slots is not None and x.free_slots <= 0
            return (full, x.outstanding_tokens / (x.speed or default), x.waiting, i)

        return min(range(len(loads)), key=key)


def ewma(old: float | None, sample: float, weight: float = 0.3) -> float:
    """A speed estimate that follows the target within a few samples but not one noisy one."""
    return sample if old is None else (1 - weight) * old + weight * sample
