"""Load generator for `shardinfer serve`'s HTTP API on loopback, bounded in count and time.

    python benchmarks/serve.py [--host-devices 2] [--out benchmarks/results]

Part 1: one replica, streaming completions at several concurrency levels: requests/s, time to
first token and inter-token gaps (p50/p99) as a client sees them.
Part 2: two replicas (one device each) with skewed request lengths (1 long : 3 short), routed
least-loaded and then round-robin: p50/p99 of whole-request latency, same requests in the
same order.
The server runs in this process (uvicorn on a thread); the clients are the official `openai`
client's streams.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import free_stem, git_revision, machine_info


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--host-devices", type=int, default=2)
    p.add_argument("--concurrency", default="1,4,8")
    p.add_argument("--requests", type=int, default=16, help="per concurrency level")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--skew-requests", type=int, default=48)
    p.add_argument(
        "--skew-slots",
        type=int,
        default=2,
        help="decode slots per replica in part 2: fewer than the clients, so a "
        "replica given too much work makes requests wait",
    )
    p.add_argument("--time-limit", type=float, default=600, help="seconds for the whole run")
    p.add_argument("--out", default=None, help="directory for the json/md result files")
    return p.parse_args()


async def one_request(client, model: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    stamps = []
    stream = await client.completions.create(
        model=model,
        prompt="Once upon a time",
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
    end = time.perf_counter()
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return {
        "ttft": stamps[0] - start if stamps else end - start,
        "gaps": gaps,
        "latency": end - start,
    }


async def load(base: str, model: str, lengths: list[int], concurrency: int, deadline: float):
    """Every length in `lengths` as one streaming request, `concurrency` at a time (the
    official openai client), until `deadline`."""
    import openai

    gate = asyncio.Semaphore(concurrency)
    client = openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0, timeout=300)

    async def bounded(n: int):
        async with gate:
            if time.time() > deadline:
                return None
            return await one_request(client, model, n)

    start = time.perf_counter()
    results = await asyncio.gather(*(bounded(n) for n in lengths))
    wall = time.perf_counter() - start
    await client.close()
    return [r for r in results if r is not None], wall


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")


def main() -> None:
    args = parse_args()
    os.environ["JAX_NUM_CPU_DEVICES"] = str(args.host_devices)
    import jax

    import shardinfer as si
    from shardinfer.mesh import split_devices
    from shardinfer.serving.async_engine import AsyncEngine
    from shardinfer.serving.http import create_app, serve_in_thread
    from shardinfer.serving.router import Router

    deadline = time.time() + args.time_limit
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "revision": git_revision(),
        "model": args.model,
        "max_tokens": args.max_tokens,
        "levels": [],
        "routing": [],
    }

    def replicas(count: int, slots: int) -> list:
        engines = []
        for devices in split_devices(count, jax.devices()[:count]):
            model = si.load_model(args.model, mesh=si.make_mesh(None, devices=devices))
            llm = si.LLM(model, max_batch=slots, max_seq_len=256)
            # Compile every step shape the runs below use (a lone prefill, a group of 8, and
            # decode) before timing, so no request pays for a compilation.
            warm = si.SamplingParams(max_tokens=4, ignore_eos=True)
            llm.generate(["Once upon a time"], warm)
            llm.generate(["Once upon a time"] * 8, warm)
            engines.append(AsyncEngine(llm))
        return engines

    engines = replicas(1, 8)
    with serve_in_thread(create_app(engines[0], args.model)) as url:
        base = url + "/v1"
        for c in (int(x) for x in args.concurrency.split(",")):
            lengths = [args.max_tokens] * args.requests
            results, wall = asyncio.run(load(base, args.model, lengths, c, deadline))
            gaps = [g for r in results for g in r["gaps"]]
            row = {
                "concurrency": c,
                "requests": len(results),
                "wall_s": wall,
                "requests_per_s": len(results) / wall,
                "tokens_per_s": len(results) * args.max_tokens / wall,
                "ttft_p50_ms": pct([r["ttft"] for r in results], 0.5),
                "ttft_p99_ms": pct([r["ttft"] for r in results], 0.99),
                "inter_token_p50_ms": pct(gaps, 0.5),
                "inter_token_p99_ms": pct(gaps, 0.99),
            }
            report["levels"].append(row)
            print(row, flush=True)
    engines[0].stop()

    # Skewed lengths over two replicas: 1 long request in 4.
    long, short = 4 * args.max_tokens, args.max_tokens // 4 or 1
    report.update(long=long, short=short, skew_slots=args.skew_slots)
    lengths = [long if i % 4 == 0 else short for i in range(args.skew_requests)]
    engines = replicas(2, args.skew_slots)
    # Each policy twice, alternating, so neither always runs first.
    for round_, policy in enumerate(("least_loaded", "round_robin") * 2):
        with serve_in_thread(create_app(Router(engines, policy), args.model)) as url:
            base = url + "/v1"
            results, wall = asyncio.run(load(base, args.model, lengths, 8, deadline))
        latencies = [r["latency"] for r in results]
        row = {
            "policy": policy,
            "round": round_ // 2,
            "requests": len(results),
            "wall_s": wall,
            "latency_p50_ms": pct(latencies, 0.5),
            "latency_p99_ms": pct(latencies, 0.99),
            "latency_mean_ms": statistics.mean(latencies) * 1000,
            "ttft_p99_ms": pct([r["ttft"] for r in results], 0.99),
        }
        report["routing"].append(row)
        print(row, flush=True)
    for engine in engines:
        engine.stop()

    if args.out:
        stem = free_stem(Path(args.out), "serve", report["date"])
        stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
        stem.with_suffix(".md").write_text(markdown(report))


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# Serving: {report['model']}, {report['date']}",
        "",
        f"{m['cpu_model']}, {m['cpu_count']} cores, jax {m['jax']}; revision {report['revision']}; "
        f"streaming /v1/completions on loopback, {report['max_tokens']} tokens each.",
        "",
        "| concurrency | requests | req/s | tok/s | TTFT p50 ms | TTFT p99 ms | "
        "inter-token p50 ms | inter-token p99 ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["levels"]:
        lines.append(
            f"| {r['concurrency']} | {r['requests']} | {r['requests_per_s']:.2f} | "
            f"{r['tokens_per_s']:.1f} | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | "
            f"{r['inter_token_p50_ms']:.0f} | {r['inter_token_p99_ms']:.0f} |"
        )
    lines += [
        "",
        f"Two replicas (one device each, {report['skew_slots']} slots each), skewed lengths "
        f"({report['long']} tokens for 1 request in 4, {report['short']} for the others), "
        "8 clients; each policy twice, alternating:",
        "",
        "| routing | round | requests | latency p50 ms | latency p99 ms | mean ms | TTFT p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["routing"]:
        lines.append(
            f"| {r['policy']} | {r['round']} | {r['requests']} | {r['latency_p50_ms']:.0f} | "
            f"{r['latency_p99_ms']:.0f} | {r['latency_mean_ms']:.0f} | "
            f"{r['ttft_p99_ms']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
