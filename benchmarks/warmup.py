"""How long `LLM.warmup()` takes for the shapes `serve` uses, cold and warm.

Each run is a fresh process: cold = an empty compilation cache directory, warm = the same
directory again (what a restarted server finds). The weight cache is the default one.

    python benchmarks/warmup.py [--max-batch 8] [--max-seq-len 2048]
                                [--mesh data=2,model=4 --host-devices 8]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import MODEL, free_stem, git_revision, machine_info

CHILD = """
import json, sys, time
import shardinfer as si
started = time.perf_counter()
llm = si.LLM({model!r}, mesh={mesh!r}, max_batch={max_batch}, max_seq_len={max_seq_len},
             compilation_cache={cache!r})
loaded = time.perf_counter() - started
report = llm.warmup()
print(json.dumps({{"load_s": loaded, **report}}))
"""


def run_once(args: argparse.Namespace, cache: str) -> dict:
    code = CHILD.format(model=MODEL, mesh=args.mesh, max_batch=args.max_batch,
                        max_seq_len=args.max_seq_len, cache=cache)  # fmt: skip
    env = dict(os.environ)
    if args.host_devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.host_devices}"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--mesh", default=None)
    p.add_argument("--host-devices", type=int, default=None)
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        cold = run_once(args, cache)
        warm = [run_once(args, cache) for _ in range(2)]
    result = {
        "date": datetime.date.today().isoformat(),
        "revision": git_revision(),
        "machine": machine_info(),
        "settings": vars(args) | {"out_dir": str(args.out_dir)},
        "cold": cold,
        "warm": warm,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = free_stem(args.out_dir, "warmup", result["date"])
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    mesh = args.mesh or "1 device"
    lines = [
        f"# LLM.warmup() for serve's shapes ({result['date']})",
        "",
        f"Revision {result['revision']}, {result['machine']['cpu_model']}, "
        f"{result['machine']['cpu_count']} cores; {MODEL} float32, {mesh}, max_batch "
        f"{args.max_batch}, max_seq_len {args.max_seq_len}; each run a fresh process.",
        "",
        "| run | warm-up | programs | load before it |",
        "|---|---|---|---|",
    ]
    for name, row in [("cold (empty compilation cache)", cold)] + [
        (f"warm {i + 1}", w) for i, w in enumerate(warm)
    ]:
        lines.append(f"| {name} | {row['seconds']:.1f} s | {row['programs']} | "
                     f"{row['load_s']:.1f} s |")  # fmt: skip
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
