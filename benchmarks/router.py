"""`shardinfer router` over three servers on this machine, one of them slower (1 decode slot
against 4), with skewed request lengths (1 long : 3 short), through the official `openai`
client: least-loaded against round-robin, each twice, alternating, the same requests in the
same order. p50/p99 of whole-request latency, throughput, and how many requests each backend
took.

    python benchmarks/router.py [--requests 48] [--long 64] [--short 8] [--out benchmarks/results]

The backends and the router run in this process (uvicorn on threads, one device each), so all
of them share the machine's cores: the 1-slot backend is slower per request than it would be
on its own machine, but not 4x slower.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import cpu_flags, free_stem, git_revision, machine_info
from serve import load, pct

SLOTS = (4, 4, 1)


def _taken(router: str) -> dict[str, float]:
    text = urllib.request.urlopen(router + "/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("shardinfer_router_requests_total{"):
            backend = line.split('backend="', 1)[1].split('"', 1)[0]
            if backend:
                out[backend] = out.get(backend, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--long", type=int, default=64)
    p.add_argument("--short", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--out", default=None, help="directory for the json/md result files")
    args = p.parse_args()
    import jax

    import shardinfer as si
    from shardinfer.serving.async_engine import AsyncEngine
    from shardinfer.serving.http import create_app, serve_in_thread
    from shardinfer.serving.proxy import create_router_app

    engines = []
    for device, slots in zip(jax.devices()[: len(SLOTS)], SLOTS, strict=True):
        llm = si.LLM(args.model, mesh=si.make_mesh(None, devices=[device]), max_batch=slots,
                     max_seq_len=256)  # fmt: skip
        warm = si.SamplingParams(max_tokens=4, ignore_eos=True)
        llm.generate(["Once upon a time"] * slots, warm)  # compile before timing
        engines.append(AsyncEngine(llm))
    lengths = [args.long if i % 4 == 0 else args.short for i in range(args.requests)]
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_info(),
        "cpu_flags": cpu_flags(),
        "revision": git_revision(),
        "model": args.model,
        "slots": SLOTS,
        "long": args.long,
        "short": args.short,
        "concurrency": args.concurrency,
        "rounds": [],
    }
    deadline = time.time() + 3600
    servers = [serve_in_thread(create_app(e, args.model)) for e in engines]
    urls = [s.__enter__() for s in servers]
    try:
        for round_, policy in enumerate(("least_loaded", "round_robin") * 2):
            app = create_router_app(urls, policy, health_interval=0.25)
            with serve_in_thread(app) as router:
                results, wall = asyncio.run(
                    load(router + "/v1", args.model, lengths, args.concurrency, deadline)
                )
                taken = _taken(router)
            latencies = [r["latency"] for r in results]
            row = {
                "policy": policy,
                "round": round_ // 2,
                "requests": len(results),
                "wall_s": wall,
                "tokens_per_s": sum(lengths) / wall,
                "latency_p50_ms": pct(latencies, 0.5),
                "latency_p99_ms": pct(latencies, 0.99),
                "latency_mean_ms": statistics.mean(latencies) * 1000,
                "taken": [int(taken.get(u, 0)) for u in urls],
            }
            report["rounds"].append(row)
            print(row, flush=True)
    finally:
        for server in servers:
            server.__exit__(None, None, None)
        for engine in engines:
            engine.stop()
    text = markdown(report)
    print(text)
    if args.out:
        stem = free_stem(Path(args.out), "router", report["date"])
        stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
        stem.with_suffix(".md").write_text(text)


def markdown(report: dict) -> str:
    m = report["machine"]
    slots = "/".join(str(s) for s in report["slots"])
    lines = [
        f"# Router over three servers: {report['model']}, {report['date']}",
        "",
        f"{m['cpu_model']}, {m['cpu_count']} cores ({report['cpu_flags']}), jax {m['jax']}; "
        f"revision {report['revision']}. Three servers in one process, one device each, with "
        f"{slots} decode slots; `shardinfer router` in front; streaming /v1/completions "
        f"through the openai client, {report['concurrency']} at a time, 1 request in 4 "
        f"{report['long']} tokens long and the rest {report['short']}; each policy twice, "
        "alternating.",
        "",
        f"| policy | round | requests | tok/s | latency p50 ms | p99 ms | mean ms | "
        f"taken ({slots} slots) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["rounds"]:
        lines.append(
            f"| {r['policy']} | {r['round']} | {r['requests']} | {r['tokens_per_s']:.1f} | "
            f"{r['latency_p50_ms']:.0f} | {r['latency_p99_ms']:.0f} | "
            f"{r['latency_mean_ms']:.0f} | {' / '.join(map(str, r['taken']))} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
