"""Engine metrics in the Prometheus text format."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge, generate_latest


def render_metrics(engine) -> str:
    """A fresh registry each scrape: the engine's own counters are the source of truth."""
    m = engine.metrics
    registry = CollectorRegistry()

    def gauge(name: str, doc: str, value: float) -> None:
        Gauge(name, doc, registry=registry).set(value)

    gauge("shardinfer_requests_finished", "Requests finished (any reason).", m.requests_finished)
    gauge("shardinfer_tokens_generated", "Tokens generated.", m.tokens_generated)
    gauge("shardinfer_prefill_tokens", "Prompt tokens prefilled.", m.prefill_tokens)
    gauge("shardinfer_live_slots", "Decode slots in use.", m.live_slots)
    gauge("shardinfer_slots", "Decode slots.", m.slots)
    gauge("shardinfer_queue_length", "Requests waiting for a slot.", engine.waiting())
    gauge("shardinfer_compilations", "Jitted programs lowered since start.", m.compilations)
    summary = m.summary()
    gauge("shardinfer_ttft_median_seconds", "Median time to first token.", summary["ttft_median_s"])
    gauge("shardinfer_tpot_median_seconds", "Median time per output token.",
          summary["tpot_median_s"])  # fmt: skip
    return generate_latest(registry).decode()
