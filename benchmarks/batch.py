"""Batch jobs: does the runner keep the engine busy? Generation tokens/s and rows/s of
`run_batch` against the engine bench's decode rate at the same batch size, in one run, on
`data=8`, `data=2,model=4` and two replicas of `data=4` (8 simulated CPU devices).

The bench's rate is decode alone ((N tokens - 1 token) / (N - 1) steps); the job's is every
generated token over the job's wall time, prefill, admission, tokenizing and writing
included, so the ratio is what the runner and the prefills cost. Rows are the same prompt
with `ignore_eos`, 3 waves of `--batch` rows, each `--new-tokens` long. For two replicas the
bench reference is one engine over all 8 devices with as many slots as the two together.
Embeddings are measured by benchmarks/embed.py.

    python benchmarks/batch.py [--batch 16] [--new-tokens 64] [--waves 3]
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import (
    MODEL,
    PROMPT,
    cpu_flags,
    cpu_times,
    free_stem,
    git_revision,
    machine_info,
    other_load,
)

import shardinfer as si
from shardinfer.serving.bench import decode_rate


def _input(path: Path, rows: int, new_tokens: int) -> Path:
    with open(path, "w") as f:
        for i in range(rows):
            row = {"id": i, "prompt": PROMPT, "max_tokens": new_tokens, "temperature": 0.0,
                   "ignore_eos": True}  # fmt: skip
            f.write(json.dumps(row) + "\n")
    return path


def _job(work: Path, model, args, slots: int, **options) -> dict:
    source = _input(work / "in.jsonl", args.waves * slots, args.new_tokens)
    out = work / f"out-{len(list(work.iterdir()))}.jsonl"
    start = cpu_times()
    summary = si.run_batch(source, out, model, progress=False, **options)
    assert summary.rows == args.waves * slots and summary.errors == 0, summary
    return {
        "rows": summary.rows,
        "seconds": summary.seconds,
        "rows_s": summary.rows / summary.seconds,
        "tok_s": summary.completion_tokens / summary.seconds,
        "other_load_cores": other_load(start),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=16, help="slots of each engine")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--waves", type=int, default=3, help="rows = waves x slots")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args()
    seq = 256
    work = Path(tempfile.mkdtemp(prefix="shardinfer-batch-bench-"))
    results = []
    for mesh in ("data=8", "data=2,model=4"):
        model = si.load_model(MODEL, mesh=mesh)
        llm = si.LLM(model, max_batch=args.batch, max_seq_len=seq)
        llm.warmup()
        prompt = model.tokenizer.encode(PROMPT)
        bench = decode_rate(llm, args.batch, prompt, args.new_tokens, args.repeats)
        job = _job(work, llm, args, args.batch)
        results.append({"config": f"`{mesh}`", "slots": args.batch,
                        "bench_tok_s": bench["decode_tok_s"], **job})  # fmt: skip
        print(results[-1], flush=True)
        if mesh == "data=8":  # the reference for two replicas: the same 8 devices, 2x slots
            llm = si.LLM(model, max_batch=2 * args.batch, max_seq_len=seq)
            llm.warmup()
            wide = decode_rate(llm, 2 * args.batch, prompt, args.new_tokens, args.repeats)
        del llm, model
    job = _job(work, MODEL, args, 2 * args.batch, mesh="data=4", replicas=2,
               max_batch=args.batch, max_seq_len=seq, warmup=True)  # fmt: skip
    results.append({"config": "2 replicas of `data=4`", "slots": 2 * args.batch,
                    "bench_tok_s": wide["decode_tok_s"], **job})  # fmt: skip
    print(results[-1], flush=True)
    result = {
        "date": datetime.date.today().isoformat(),
        "revision": git_revision(),
        "machine": machine_info(),
        "cpu_flags": cpu_flags(),
        "new_tokens": args.new_tokens,
        "waves": args.waves,
        "results": results,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = free_stem(args.out_dir, "batch", result["date"])
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [
        f"# Batch job vs engine bench ({result['date']})",
        "",
        f"Revision {result['revision']}, {result['machine']['cpu_model']}, "
        f"{result['machine']['cpu_count']} cores ({result['cpu_flags']}); {MODEL} float32, "
        f"8 simulated CPU devices; {args.waves} waves of rows, {args.new_tokens} new tokens "
        "each (ignore_eos). Job: generated tokens / wall time (prefill included); bench: "
        "decode only, at the same number of slots.",
        "",
        "| mesh | slots | rows | job rows/s | job tok/s | bench tok/s | ratio | other load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['config']} | {r['slots']} | {r['rows']} | {r['rows_s']:.2f} | "
            f"{r['tok_s']:.1f} | {r['bench_tok_s']:.1f} | {r['tok_s'] / r['bench_tok_s']:.2f} | "
            f"{r['other_load_cores']:.2f} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
