"""Decode tok/s on one mesh of 8 devices: 2 processes x 4 devices against 1 process x 8, in
one run, for `data=2,model=4` (tensor parallel inside each process) and `data=8`; what the
plan broadcast costs per step; and one all-reduce's latency inside a process and across them.

Each configuration runs in fresh processes (joined by jax.distributed over gloo for the
2-process one); process 0 times `decode_rate` (N tokens less 1 token, over N-1 steps), the
plan broadcast alone (median of 50 round trips of the fixed-size buffer) and a jitted psum of
one decode row's activations ([1, 576] float32) over `model` (devices of one process) and over
`data` (one device from each process).

    python benchmarks/multiprocess.py [--meshes data=2,model=4;data=8] [--batch-sizes 1,8]
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

from common import MODEL, free_stem, git_revision, machine_info

CHILD = """
import json, statistics, sys, time
from shardinfer import distributed
distributed.initialize()
import jax, numpy as np
import shardinfer as si
from shardinfer.engine import broadcast
from shardinfer.serving.bench import decode_rate
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
row = NamedSharding(mesh, P("data", "model"))
x = jax.make_array_from_callback((2, 4 * 576), row, lambda i: np.ones((2, 4 * 576), np.float32)[i])
psum_s = {{}}
for axis in ("model", "data"):
    spec = P("data", "model")
    f = jax.jit(jax.shard_map(lambda v: jax.lax.psum(v, axis), mesh=mesh, in_specs=spec,
                              out_specs=spec))
    f(x).block_until_ready()
    times = []
    for _ in range(200):
        start = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - start)
    psum_s[axis] = statistics.median(times)
results = {{}}
for name in {meshes}:
    model = si.load_model({model!r}, mesh=name)
    prompt = model.tokenizer.encode("Write a short story about a robot who learns to paint.")
    rows = []
    for batch in {batches}:
        llm = si.LLM(model, max_batch=batch, max_seq_len=256)
        llm.warmup()
        rows.append(decode_rate(llm, batch, prompt, {new_tokens}, {repeats}))
    results[name] = rows
size = broadcast.buffer_size(llm.core.engine.layout)
seconds = []
if jax.process_count() > 1:
    for _ in range(50):
        start = time.perf_counter()
        broadcast.broadcast_plan(broadcast.IDLE, size)
        seconds.append(time.perf_counter() - start)
if jax.process_index() == 0:
    broadcast_s = statistics.median(seconds) if seconds else 0
    print(json.dumps({{"meshes": results, "psum_s": psum_s, "broadcast_s": broadcast_s,
                      "buffer_bytes": size * 4}}))
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(processes: int, args: argparse.Namespace) -> dict:
    code = CHILD.format(model=MODEL, meshes=args.meshes, batches=args.batch_sizes,
                        new_tokens=args.new_tokens, repeats=args.repeats)  # fmt: skip
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
    p.add_argument("--meshes", default="data=2,model=4;data=8", help="';'-separated")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.meshes = args.meshes.split(";")
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
    stem = free_stem(args.out_dir, "multiprocess", result["date"])
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [
        f"# 2 processes x 4 devices vs 1 process x 8 ({result['date']})",
        "",
        f"Revision {result['revision']}, {result['machine']['cpu_model']}, "
        f"{result['machine']['cpu_count']} cores; {MODEL} float32, {args.new_tokens} new tokens, "
        f"median of {args.repeats}; simulated CPU devices, gloo between the processes.",
        "",
        "| mesh | batch | 1 process tok/s | 2 processes tok/s | ratio |",
        "|---|---|---|---|---|",
    ]
    for mesh in args.meshes:
        for a, b in zip(one["meshes"][mesh], two["meshes"][mesh], strict=True):
            ratio = b["decode_tok_s"] / a["decode_tok_s"]
            lines.append(f"| `{mesh}` | {a['batch']} | {a['decode_tok_s']:.1f} | "
                         f"{b['decode_tok_s']:.1f} | {ratio:.2f} |")  # fmt: skip
    step_s = 1 / two["meshes"][args.meshes[0]][0]["decode_tok_s"]
    ms = lambda s: f"{s * 1000:.2f} ms"  # noqa: E731
    lines += [
        "",
        f"Plan broadcast ({two['buffer_bytes'] // 1024} KiB buffer): {ms(two['broadcast_s'])}, "
        f"{two['broadcast_s'] / step_s:.0%} of a batch-1 step of the 2-process run on "
        f"`{args.meshes[0]}`.",
        "",
        "One all-reduce of a [1, 576] float32 row (median of 200 jitted psums):",
        "",
        "| over | 1 process | 2 processes |",
        "|---|---|---|",
        f"| `model` (4 devices of one process) | {ms(one['psum_s']['model'])} | "
        f"{ms(two['psum_s']['model'])} |",
        f"| `data` (a device of each process) | {ms(one['psum_s']['data'])} | "
        f"{ms(two['psum_s']['data'])} |",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
