"""Load generator for `shardinfer serve`'s HTTP API on loopback, bounded in count and time.

    python benchmarks/serve.py [--host-devices 2] [--out benchmarks/results]

Part 1: one replica, streaming completions at several concurrency levels: requests/s, time to
first token and inter-token gaps (p50/p99) as a client sees them.
Part 2: two replicas (one device each) with skewed request lengths (1 long : 3 short), routed
least-loaded and then round-robin: p50/p99 of whole-request latency, same requests in the
same order.
The server runs in this process (uvicorn on a thread); the clients are httpx streams.
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
from decode import git_revision, machine_info


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--host-devices", type=int, default=2)
    p.add_argument("--concurrency", default="1,4,8")
    p.add_argument("--requests", type=int, default=16, help="per concurrency level")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--skew-requests", type=int, default=24)
    p.add_argument("--time-limit", type=float, default=600, help="seconds for the whole run")
    p.add_argument("--out", default=None, help="directory for the json/md result files")
    return p.parse_args()


async def one_request(client, base: str, model: str, max_tokens: int) -> dict:
    body = {
        "model": model,
        "prompt": "Once upon a time",
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
    }
    start = time.perf_counter()
    stamps = []
    async with client.stream("POST", base + "/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            data = line[6:] if line.startswith("data: ") else "[DONE]"
            if data != "[DONE]" and json.loads(data)["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    end = time.perf_counter()
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return {
        "ttft": stamps[0] - start if stamps else end - start,
        "gaps": gaps,
        "latency": end - start,
    }


async def load(base: str, model: str, lengths: list[int], concurrency: int, deadline: float):
    import httpx

    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=300) as client:

        async def bounded(n: int):
            async with gate:
                if time.time() > deadline:
                    return None
                return await one_request(client, base, model, n)

        start = time.perf_counter()
        results = await asyncio.gather(*(bounded(n) for n in lengths))
        wall = time.perf_counter() - start
    return [r for r in results if r is not None], wall


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")


def main() -> None:
    args = parse_args()
    os.environ["JAX_NUM_CPU_DEVICES"] = str(args.host_devices)
    import jax

    import shardinfer as si
    from shardinfer.serving.async_engine import AsyncEngine
    from shardinfer.serving.http import create_app, serve_in_thread
    from shardinfer.serving.router import Router, split_devices

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

    def replicas(count: int) -> list:
        engines = []
        for devices in split_devices(count, jax.devices()[:count]):
            model = si.load_model(args.model, mesh=si.make_mesh(None, devices=devices))
            engines.append(AsyncEngine(si.LLM(model, max_batch=8, max_seq_len=256)))
        return engines

    engines = replicas(1)
    with serve_in_thread(create_app(engines[0], args.model)) as url:
        base = url + "/v1"
        asyncio.run(load(base, args.model, [args.max_tokens] * 8, 8, deadline))  # warm-up
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
    lengths = [long if i % 4 == 0 else short for i in range(args.skew_requests)]
    engines = replicas(2)
    for policy in ("least_loaded", "round_robin"):
        with serve_in_thread(create_app(Router(engines, policy), args.model)) as url:
            base = url + "/v1"
            asyncio.run(load(base, args.model, [short] * 4, 4, deadline))  # warm-up both
            results, wall = asyncio.run(load(base, args.model, lengths, 8, deadline))
        latencies = [r["latency"] for r in results]
        row = {
            "policy": policy,
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
        out = Path(args.out)
        stem = f"serve-cpu-{report['date'][:10]}"
        (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
        (out / f"{stem}.md").write_text(markdown(report))


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# Serving: {report['model']}, {report['date']}",
        "",
        f"{m.get('cpu', '')}, {m.get('cores', '')} cores; revision {report['revision']}; "
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
        "Two replicas (one device each), skewed lengths (1 long : 3 short), 8 clients:",
        "",
        "| routing | requests | latency p50 ms | latency p99 ms | mean ms | TTFT p99 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["routing"]:
        lines.append(
            f"| {r['policy']} | {r['requests']} | {r['latency_p50_ms']:.0f} | "
            f"{r['latency_p99_ms']:.0f} | {r['latency_mean_ms']:.0f} | "
            f"{r['ttft_p99_ms']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
