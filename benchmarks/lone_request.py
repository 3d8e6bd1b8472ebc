"""One request on an 8-slot LLM against the same request on a 1-slot LLM, in one process.

A decode step runs over a power-of-two bucket of the live slots, so a lone client of an
8-slot engine should decode about as fast as on a 1-slot one (before, it paid for all 8 rows
every step). Both engines share one loaded model, are warmed up, then timed in alternation.

    python benchmarks/lone_request.py [--new-tokens 64] [--rounds 5] [--max-batch 8]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import (
    MODEL,
    PROMPT,
    cpu_times,
    free_stem,
    git_revision,
    machine_info,
    other_load,
    timed,
)


def cpu_flags() -> list[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines()
                  if ln.startswith("flags")), [])  # fmt: skip
    return sorted(f for f in flags if f in {"avx2", "avx512f", "avx512_vnni", "amx_tile", "fma"})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args()

    import shardinfer as si

    model = si.load_model(MODEL)
    engines = {
        "1 slot": si.LLM(model, max_batch=1, max_seq_len=1024),
        f"{args.max_batch} slots": si.LLM(model, max_batch=args.max_batch, max_seq_len=1024),
    }
    prompt = model.tokenizer.encode(
        model.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}]),
        add_special_tokens=False,
    )
    warmups = {name: llm.warmup() for name, llm in engines.items()}

    def run(llm, n: int) -> list[int]:
        params = si.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        return llm.generate([prompt], params)[0].token_ids

    times: dict[str, dict[str, list[float]]] = {k: {"one": [], "all": []} for k in engines}
    tokens = {}
    start = cpu_times()
    for _ in range(args.rounds):
        for name, llm in engines.items():  # alternating, so drifts hit both alike
            times[name]["one"].append(timed(lambda llm=llm: run(llm, 1))[0])
            seconds, tokens[name] = timed(lambda llm=llm: run(llm, args.new_tokens))
            times[name]["all"].append(seconds)
    load = other_load(start)
    assert len(set(map(tuple, tokens.values()))) == 1, "the engines disagree on greedy tokens"

    rows = {}
    for name, t in times.items():
        decode = statistics.median(t["all"]) - statistics.median(t["one"])
        rows[name] = {
            "decode_tok_s": (args.new_tokens - 1) / decode,
            "ttft_s": statistics.median(t["one"]),
            "warmup_s": warmups[name]["seconds"],
            "warmup_programs": warmups[name]["programs"],
        }
    one, many = rows["1 slot"], rows[f"{args.max_batch} slots"]
    ratio = many["decode_tok_s"] / one["decode_tok_s"]
    result = {
        "date": datetime.date.today().isoformat(),
        "revision": git_revision(),
        "machine": machine_info(),
        "cpu_flags": cpu_flags(),
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "other_load_cores": load,
        "engines": rows,
        "ratio": ratio,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = free_stem(args.out_dir, "lone-request", result["date"])
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [
        f"# One request: {args.max_batch}-slot LLM vs 1-slot LLM ({result['date']})",
        "",
        f"Revision {result['revision']}, {result['machine']['cpu_model']}, flags "
        f"{' '.join(result['cpu_flags'])}, {result['machine']['cpu_count']} cores; "
        f"{MODEL} float32 on 1 CPU device, {args.new_tokens} new tokens, greedy, median of "
        f"{args.rounds} alternating rounds; foreign CPU load {load:.2f} cores.",
        "",
        "| engine | decode tok/s | time to first token | warm-up (programs) |",
        "|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['decode_tok_s']:.1f} | {row['ttft_s'] * 1000:.0f} ms | "
                     f"{row['warmup_s']:.1f} s ({row['warmup_programs']}) |")  # fmt: skip
    lines += ["", f"Ratio ({args.max_batch} slots / 1 slot): **{ratio:.2f}** (target >= 0.85)."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
