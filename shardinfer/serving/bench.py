"""`shardinfer bench`: decode throughput, time to first token and the bandwidth ceiling.

Measures shardinfer alone on whatever mesh, dtype and quantization it is given; the scripts in
benchmarks/ add the reference implementations in the same run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np

from shardinfer.engine.llm import LLM
from shardinfer.engine.sampling import SamplingParams
from shardinfer.model import Model


def read_bandwidth_gbps(size_mb: int = 512, repeats: int = 5) -> float:
    """The host's read GB/s: the best of `repeats` XLA-compiled sums (vectorized, every core)
    over a buffer far larger than the caches.

    A numpy sum is partly compute-bound (pairwise summation, one thread): on the 2-core dev VM
    it read 11-13 GB/s where this reads 27-36, which overstated the fraction of the limit."""
    import jax
    import jax.numpy as jnp

    # This process's own device: under `launch`, jax.devices()[0] may be another process's.
    buffer = jax.device_put(np.ones(size_mb * 2**20 // 4, np.float32), jax.local_devices()[0])
    total = jax.jit(jnp.sum)
    total(buffer).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        total(buffer).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return buffer.nbytes / best / 1e9


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_rate(llm: LLM, batch: int, prompt: list[int], new_tokens: int, repeats: int) -> dict:
    """Aggregate decode tok/s at `batch` rows: (time for N tokens - time for 1) / (N - 1) steps,
    which leaves out prefill and the first token. The first call (compilation) is kept apart."""

    def run(n: int):
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        return llm.generate([prompt] * batch, params)

    start = time.perf_counter()
    run(new_tokens)
    first_call = time.perf_counter() - start
    one = _median_seconds(lambda: run(1), repeats)
    many = _median_seconds(lambda: run(new_tokens), repeats)
    return {
        "batch": batch,
        "decode_tok_s": batch * (new_tokens - 1) / max(many - one, 1e-9),
        "first_call_s": first_call,
    }


def time_to_first_token(llm: LLM, prompt: list[int], repeats: int) -> float:
    params = SamplingParams(max_tokens=1, temperature=0.0)
    llm.generate([prompt], params)  # compile this prompt's bucket
    return _median_seconds(lambda: llm.generate([prompt], params), repeats)


def run_bench(
    model: Model,
    batch_sizes: list[int],
    new_tokens: int = 128,
    repeats: int = 3,
    prompt_lengths: tuple[int, ...] = (32, 512),
) -> dict:
    """Every number `shardinfer bench` prints, as one dict."""
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    prompt = rng.integers(0, vocab, 33).tolist()
    max_seq = max(max(prompt_lengths) + 2, len(prompt) + new_tokens + 1)
    rows = []
    for batch in batch_sizes:
        llm = LLM(model, max_batch=batch, max_seq_len=max_seq)
        rows.append(decode_rate(llm, batch, prompt, new_tokens, repeats))
    llm = LLM(model, max_batch=1, max_seq_len=max_seq)
    ttft = {n: time_to_first_token(llm, rng.integers(0, vocab, n).tolist(), repeats)
            for n in prompt_lengths}  # fmt: skip
    bandwidth = read_bandwidth_gbps()
    ceiling = bandwidth * 1e9 / model.weight_bytes()
    for row in rows:
        if row["batch"] == 1:
            row["fraction_of_bandwidth_limit"] = row["decode_tok_s"] / ceiling
    return {
        "decode": rows,
        "ttft_s": ttft,
        "read_bandwidth_gbps": bandwidth,
        "weight_bytes": model.weight_bytes(),
        "batch1_limit_tok_s": ceiling,
    }


def format_report(result: dict) -> str:
    lines = ["batch  decode tok/s  first call s"]
    for row in result["decode"]:
        lines.append(
            f"{row['batch']:>5}  {row['decode_tok_s']:>12.1f}  {row['first_call_s']:>12.1f}"
        )
    for n, seconds in result["ttft_s"].items():
        lines.append(f"time to first token, {n}-token prompt: {seconds * 1000:.0f} ms")
    limit = result["batch1_limit_tok_s"]
    lines.append(
        f"read bandwidth {result['read_bandwidth_gbps']:.1f} GB/s over "
        f"{result['weight_bytes'] / 1e6:.0f} MB of weights: batch-1 limit {limit:.1f} tok/s"
    )
    for row in result["decode"]:
        if "fraction_of_bandwidth_limit" in row:
            lines.append(f"batch 1 reaches {row['fraction_of_bandwidth_limit']:.0%} of it")
    return "\n".join(lines)
