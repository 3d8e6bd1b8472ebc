"""Decode tok/s on one `data=2,model=4` mesh: 2 processes x 4 devices against 1 process x 8,
in one run, and what the plan broadcast costs per step.

Each configuration runs in fresh processes (joined by jax.distributed over gloo for the
2-process one); process 0 times `decode_rate` (N tokens less 1 token, over N-1 steps) and the
plan broadcast alone (median of 50 round trips of the fixed-size buffer).

    python benchmarks/multiprocess.py [--batch-sizes 1,8] [--new-tokens 32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import MODEL, git_revision, machine_info

CHILD = """
import json, statistics, sys, time
from shardinfer import distributed
distributed.initialize()
import jax, numpy as np
import shardinfer as si
from shardinfer.engine import broadcast
from shardinfer.serving.bench import decode_rate
model = si.load_model({model!r}, mesh="data=2,model=4")
prompt = model.tokenizer.encode("Write a short story about a robot who learns to paint.")
rows = []
for batch in {batches}:
    llm = si.LLM(model, max_batch=batch, max_seq_len=256)
    llm.warmup()
    rows.append(decode_rate(llm, batch, prompt, {new_tokens}, {repeats}))
size = broadcast.buffer_size(llm.core.engine.layout)
seconds = []
if jax.process_count() > 1:
    for _ in range(50):
        start = time.perf_counter()
        broadcast.broadcast_plan(broadcast.IDLE, size)
        seconds.append(time.perf_counter() - start)
if jax.process_index() == 0:
    print(json.dumps({{"rows": rows, "broadcast_s": statistics.median(seconds) if seconds else 0,
                      "buffer_bytes": size * 4}}))
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(processes: int, args: argparse.Namespace) -> dict:
    code = CHILD.format(model=MODEL, batches=args.batch_sizes, new_tokens=args.new_tokens,
                        repeats=args.repeats)  # fmt: skip
    port, procs = _port(), []
    for i in range(processes):
        env = dict(os.environ)
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // processes}"
        if processes > 1:
            env["SHARDINFER_COORDINATOR"] = f"127.0.0.1:{port}"
            env["SHARDINFER_NUM_PROCESSES"] = str(processes)
            env["SHARDINFER_PROCESS_ID"] = str(i)
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))  # fmt: skip
    outs = [p.communicate(timeout=3000) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        if p.returncode:
            raise SystemExit(err[-3000:])
    lines = [ln for ln in outs[0][0].splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    one = run(1, args)  # the default compilation cache: the second run loads what it can
    two = run(2, args)
    result = {
        "date": datetime.date.today().isoformat(),
        "revision": git_revision(),
        "machine": machine_info(),
        "new_tokens": args.new_tokens,
        "one_process": one,
        "two_processes": two,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"multiprocess-cpu-{result['date']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [
        f"# 2 processes x 4 devices vs 1 process x 8, mesh data=2,model=4 ({result['date']})",
        "",
        f"Revision {result['revision']}, {result['machine']['cpu_model']}, "
        f"{result['machine']['cpu_count']} cores; {MODEL} float32, {args.new_tokens} new tokens, "
        f"median of {args.repeats}; simulated CPU devices, gloo between the processes.",
        "",
        "| batch | 1 process tok/s | 2 processes tok/s | ratio |",
        "|---|---|---|---|",
    ]
    for a, b in zip(one["rows"], two["rows"], strict=True):
        ratio = b["decode_tok_s"] / a["decode_tok_s"]
        lines.append(f"| {a['batch']} | {a['decode_tok_s']:.1f} | {b['decode_tok_s']:.1f} | "
                     f"{ratio:.2f} |")  # fmt: skip
    step_s = 1 / two["rows"][0]["decode_tok_s"]
    lines += [
        "",
        f"Plan broadcast ({two['buffer_bytes'] // 1024} KiB buffer): "
        f"{two['broadcast_s'] * 1000:.2f} ms, {two['broadcast_s'] / step_s:.0%} of a batch-1 "
        "step of the 2-process run.",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
