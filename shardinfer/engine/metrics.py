"""Engine metrics as a plain Python object (the HTTP server exports them as Prometheus text)."""

from __future__ import annotations

import dataclasses
import threading
import time

import jax

from shardinfer.engine.request import Request

_compile_count = 0
_compile_seconds = 0.0
_listener_lock = threading.Lock()
_listening = False


def _on_event(event: str, seconds: float, **_) -> None:
    global _compile_count, _compile_seconds
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":  # every lowering, cached or not
        _compile_count += 1
    elif event == "/jax/core/compile/backend_compile_duration":
        _compile_seconds += seconds


def compilations() -> int:
    """Lowerings of jitted functions in this process so far (each a compile or a cache load)."""
    global _listening
    with _listener_lock:
        if not _listening:
            jax.monitoring.register_event_duration_secs_listener(_on_event)
            _listening = True
    return _compile_count


def compile_seconds() -> float:
    compilations()
    return _compile_seconds


@dataclasses.dataclass
class EngineMetrics:
    slots: int
    requests_finished: int = 0
    tokens_generated: int = 0
    prefill_tokens: int = 0
    decode_steps: int = 0
    live_slots: int = 0
    queue_length: int = 0
    ttft_seconds: list[float] = dataclasses.field(default_factory=list)  # per finished request
    tpot_seconds: list[float] = dataclasses.field(default_factory=list)  # per finished request
    started: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_at: float | None = None  # perf_counter() of this engine's first token (start-up)

    def __post_init__(self) -> None:
        self._compilations_at_start = compilations()

    @property
    def compilations(self) -> int:
        return compilations() - self._compilations_at_start

    @property
    def slot_use(self) -> float:
        return self.live_slots / self.slots

    def tokens_per_second(self) -> float:
        return self.tokens_generated / max(time.perf_counter() - self.started, 1e-9)

    def record_finished(self, request: Request) -> None:
        self.requests_finished += 1
        if request.first_token_at is not None:
            self.ttft_seconds.append(request.first_token_at - request.arrived_at)
            n = len(request.output_ids)
            if n > 1 and request.finished_at is not None:
                self.tpot_seconds.append((request.finished_at - request.first_token_at) / (n - 1))

    def summary(self) -> dict[str, float]:
        def median(xs: list[float]) -> float:
            return sorted(xs)[len(xs) // 2] if xs else 0.0

        return {
            "requests_finished": self.requests_finished,
            "tokens_generated": self.tokens_generated,
            "tokens_per_second": self.tokens_per_second(),
            "ttft_median_s": median(self.ttft_seconds),
            "tpot_median_s": median(self.tpot_seconds),
            "slot_use": self.slot_use,
            "queue_length": self.queue_length,
            "compilations": self.compilations,
        }
