"""Serving metrics in the Prometheus text format, per replica.

Latencies are histograms and outcomes counters, observed by each engine thread as tokens go
out (prometheus_client is thread-safe); slot use, queue length and compilations are read from
the engines at scrape time by a collector.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# Seconds; CPU first tokens take 0.05-2 s, accelerator inter-token gaps ~5-50 ms.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
INTER_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class ServingMetrics:
    """One registry for a server: histograms and counters that live as long as it does."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("shardinfer_ttft_seconds", "Time from request to first token.",
                              ["replica"], buckets=TTFT_BUCKETS, registry=r)  # fmt: skip
        self.inter_token = Histogram(
            "shardinfer_inter_token_seconds",
            "Time between a request's consecutive tokens.",
            ["replica"],
            buckets=INTER_TOKEN_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "shardinfer_requests",
            "Requests by outcome: stop, length, abort (client left), error, rejected (429), "
            "invalid (4xx); an embedding server's answered requests: embedded.",
            ["replica", "outcome"],
            registry=r,
        )
        self.tokens = Counter("shardinfer_generated_tokens", "Tokens generated.", ["replica"],
                              registry=r)  # fmt: skip
        # An embedding server's work (serving/async_embedder.py).
        self.embedded_inputs = Counter("shardinfer_embedded_inputs",
                                       "Inputs embedded (texts or token lists).", ["replica"],
                                       registry=r)  # fmt: skip
        self.embedded_tokens = Counter("shardinfer_embedded_tokens", "Tokens of inputs embedded.",
                                       ["replica"], registry=r)  # fmt: skip

    def watch(self, engines: Callable[[], list], model_name: str = "") -> None:
        """Reports the live state of `engines()` (AsyncEngines) at every scrape, in our names
        and in vLLM's (labelled with `model_name`, as vLLM labels them)."""
        self.registry.register(_EngineCollector(engines))
        self.registry.register(_VllmCollector(engines, model_name))

    def render(self) -> str:
        return generate_latest(self.registry).decode()


class _EngineCollector(Collector):
    def __init__(self, engines: Callable[[], list]):
        self.engines = engines

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        gauges = {
            "live_slots": ("Decode slots in use.", lambda e: e.metrics.live_slots),
            "slots": ("Decode slots.", lambda e: e.metrics.slots),
            "queue_length": ("Requests waiting for a slot.", lambda e: e.waiting()),
            "outstanding_tokens": ("Tokens still to generate for requests queued or in slots "
                                   "(what routing balances).", lambda e: e.load()),
        }  # fmt: skip
        # Running totals kept by the engines themselves (requests and generated tokens are the
        # server's own counters above, so they are not repeated here).
        counters = {
            "prefill_tokens": ("Prompt tokens prefilled.", lambda e: e.metrics.prefill_tokens),
            "compilations": ("Jitted programs lowered since start.",
                             lambda e: e.metrics.compilations),
        }  # fmt: skip
        engines = self.engines()
        for kind, table in ((GaugeMetricFamily, gauges), (CounterMetricFamily, counters)):
            for name, (doc, read) in table.items():
                family = kind(f"shardinfer_{name}", doc, labels=["replica"])
                for engine in engines:
                    family.add_metric([engine.replica], float(read(engine)))
                yield family


class _VllmCollector(Collector):
    """The gauges (and token counters) that routers made for vLLM balance on: Kubernetes'
    Gateway API Inference Extension reads running and waiting requests and KV-cache use;
    vLLM's production-stack router reads the same. Totals over the replicas. KV use is the
    share of cache rows held by live requests: the cache is allocated per slot, so a live
    request holds its whole row."""

    def __init__(self, engines: Callable[[], list], model_name: str):
        self.engines, self.model_name = engines, model_name

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        engines = self.engines()
        live = sum(e.metrics.live_slots for e in engines)
        slots = sum(e.metrics.slots for e in engines)
        values = [
            (GaugeMetricFamily, "num_requests_running", "Requests in decode slots.", live),
            (GaugeMetricFamily, "num_requests_waiting", "Requests waiting for a slot.",
             sum(e.waiting() for e in engines)),
            (GaugeMetricFamily, "kv_cache_usage_perc",
             "KV cache in use, as a fraction (1 = full).", live / max(slots, 1)),
            (CounterMetricFamily, "generation_tokens", "Tokens generated.",
             sum(e.metrics.tokens_generated for e in engines)),
            (CounterMetricFamily, "prompt_tokens", "Prompt tokens prefilled.",
             sum(e.metrics.prefill_tokens for e in engines)),
        ]  # fmt: skip
        for kind, name, doc, value in values:
            family = kind(f"vllm:{name}", doc, labels=["model_name"])
            family.add_metric([self.model_name], float(value))
            yield family
