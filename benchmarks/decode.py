"""Decode throughput and time to first token: shardinfer vs Hugging Face transformers.

Greedy decoding of --new-tokens tokens from one chat prompt repeated over the batch, for each
batch size, plus the memory-bandwidth ceiling for batch 1 on this host. Writes JSON and a
Markdown table to --out-dir. Run from the repository root:

    python benchmarks/decode.py [--batch-sizes 1,8,32] [--new-tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MODEL = "smollm2-135m-instruct"
PROMPT = "Write a short story about a robot who learns to paint."


def add_common_args(p: argparse.ArgumentParser) -> None:
    """The options every benchmark script here shares."""
    p.add_argument("--batch-sizes", default="1,8,32", help="comma-separated, e.g. 1,8,32")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point; medians")
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--skip-hf", action="store_true", help="skip the transformers reference")
    p.add_argument("--mesh", default=None, help="mesh spec for load_model, e.g. data=2,model=4")
    p.add_argument("--host-devices", type=int, default=None, help="fake CPU devices for --mesh")
    args = p.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (decode rate = N-1 tokens past the first)")
    return args


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def cpu_times() -> tuple[float, float, float]:
    """(wall s, CPU s busy on the whole host, CPU s of this process) for spotting contention."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # less idle, io
    own = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), busy, own.ru_utime + own.ru_stime


def other_load(start: tuple[float, float, float]) -> float:
    """Cores' worth of CPU that other processes (or the hypervisor's steal) used since start."""
    end = cpu_times()
    return ((end[1] - start[1]) - (end[2] - start[2])) / (end[0] - start[0])


def hf_generate(hf: Any, prompt: list[int], batch: int, n: int) -> list[list[int]]:
    """Exactly n greedy tokens for `batch` copies of the prompt with transformers."""
    import torch

    input_ids = torch.tensor([prompt] * batch)
    with torch.inference_mode():
        out = hf.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,  # no early stop at EOS, like ignore_eos
            pad_token_id=hf.config.eos_token_id,
        )
    return out[:, len(prompt) :].tolist()


def measure(run: Callable[[int], list[list[int]]], batch: int, n: int, repeats: int) -> dict:
    """Times run(max_new_tokens) for 1 and n tokens; the first call (compile) is kept apart.

    Subtracting the 1-token time removes prefill and per-call overhead, leaving n-1 decode steps.
    """
    first_call_s, tokens = timed(lambda: run(n))
    start = cpu_times()
    t1 = statistics.median(timed(lambda: run(1))[0] for _ in range(repeats))
    tn = statistics.median(timed(lambda: run(n))[0] for _ in range(repeats))
    assert all(len(row) == n for row in tokens), "expected exactly n new tokens per row"
    return {
        "batch": batch,
        "first_call_s": first_call_s,
        "ttft_s": t1,
        "generate_s": tn,
        "decode_tok_s": batch * (n - 1) / (tn - t1),
        # Identical prompts under greedy decoding must give identical rows.
        "rows_identical": all(row == tokens[0] for row in tokens),
        "tokens_row0": tokens[0],
        # Other processes on this host skew timings; > ~0.1 cores means a noisy measurement.
        "other_load_cores": other_load(start),
    }


def bench_shardinfer(model: Any, ids: list[int], args: argparse.Namespace) -> list[dict]:
    import shardinfer as si

    results = []
    for batch in args.batch_sizes:
        # One KV cache per batch size; no persistent compilation cache, so that first_call_s is
        # a cold compile plus one run whatever earlier runs left on disk.
        llm = si.LLM(model, max_batch=batch, max_seq_len=512, compilation_cache=None)

        def run(n: int, llm: si.LLM = llm, batch: int = batch) -> list[list[int]]:
            params = si.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
            return [o.token_ids for o in llm.generate([ids] * batch, params)]

        results.append(measure(run, batch, args.new_tokens, args.repeats))
        print(f"shardinfer batch {batch}: {results[-1]['decode_tok_s']:.1f} tok/s", flush=True)
    return results


def bench_hf(path: Path, ids: list[int], args: argparse.Namespace) -> tuple[list[dict], int]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)  # same cores as XLA's CPU thread pool
    # The GGUF loader dequantizes Q4_1 to float32, the dtype shardinfer computes in on CPU.
    hf = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    nbytes = sum(p.nbytes for p in hf.parameters())  # parameters() yields a tied weight once
    results = []
    for batch in args.batch_sizes:

        def run(n: int, batch: int = batch) -> list[list[int]]:
            return hf_generate(hf, ids, batch, n)

        results.append(measure(run, batch, args.new_tokens, args.repeats))
        print(f"hf batch {batch}: {results[-1]['decode_tok_s']:.1f} tok/s", flush=True)
    return results, nbytes


def read_bandwidth_gbs() -> dict:
    """Host read bandwidth, by the same XLA-compiled sum as engine.py and `shardinfer bench`
    (numpy's float32 sum, used here before, is partly compute-bound and read ~half)."""
    from shardinfer.serving.bench import read_bandwidth_gbps

    return {"xla_sum": read_bandwidth_gbps()}


def git_revision() -> str:
    """HEAD, plus "-dirty" when shardinfer/ has uncommitted changes (the code that was timed)."""
    root = Path(__file__).resolve().parent.parent
    git = ["git", "-C", str(root)]
    try:
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run([*git, "status", "--porcelain", "shardinfer"], capture_output=True)
    except OSError:
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def machine_info() -> dict:
    import jax

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    cpuinfo = Path("/proc/cpuinfo")  # platform.processor() is often empty on Linux
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    models = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
    return {
        "processor": platform.processor(),
        "cpu_model": models[0] if models else None,
        "uname": " ".join(platform.uname()),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        **{name: version(name) for name in ("jax", "jaxlib", "flax", "torch", "transformers")},
        "devices": [str(d) for d in jax.devices()],
    }


def fraction(results: list[dict], limit: float) -> float | None:
    """Batch-1 decode rate as a fraction of the bandwidth limit (None without batch 1)."""
    return next((r["decode_tok_s"] / limit for r in results if r["batch"] == 1), None)


def compare(ours: list[dict], hf: list[dict]) -> dict:
    """Per batch: shardinfer/HF ratios, and how many leading greedy tokens of row 0 agree."""
    theirs = {r["batch"]: r for r in hf}
    out = {}
    for r in ours:
        if h := theirs.get(r["batch"]):
            a, b = r["tokens_row0"], h["tokens_row0"]
            same = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
            out[str(r["batch"])] = {
                "decode_tok_s": r["decode_tok_s"] / h["decode_tok_s"],
                "ttft": r["ttft_s"] / h["ttft_s"],
                "greedy_agreement_prefix": same,
            }
    return out


def markdown(report: dict) -> str:
    hf = {r["batch"]: r for r in report["hf"]}
    m, lim = report["machine"], report["bandwidth_limit"]
    lines = [
        f"# Decode: {report['model']} ({report['gguf']}), {report['date']}",
        "",
        f"{m['cpu_model'] or m['processor']}, {m['cpu_count']} cores, jax devices "
        f"{m['devices']}, {report['dtype']}; prompt {report['prompt_tokens']} tokens, "
        f"{report['new_tokens']} new tokens (greedy), median of {report['repeats']} runs.",
        "",
        "| batch | shardinfer tok/s | HF tok/s | shardinfer/HF | shardinfer TTFT ms | HF TTFT ms "
        "| shardinfer first call s | other load, cores |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["shardinfer"]:
        h = hf.get(r["batch"])
        cells = [r["batch"], f"{r['decode_tok_s']:.1f}"]
        cells += (
            [f"{h['decode_tok_s']:.1f}", f"{r['decode_tok_s'] / h['decode_tok_s']:.2f}"]
            if h
            else ["-", "-"]
        )
        cells += [f"{r['ttft_s'] * 1e3:.0f}", f"{h['ttft_s'] * 1e3:.0f}" if h else "-"]
        cells.append(f"{r['first_call_s']:.1f}")
        cells.append(f"{max(r['other_load_cores'], h['other_load_cores'] if h else 0):.2f}")
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    reached = f"shardinfer {lim['fraction_shardinfer'] or 0:.0%}"
    if lim["fraction_hf"] is not None:
        reached += f", HF {lim['fraction_hf']:.0%}"
    lines += [
        "",
        f"Batch-1 bandwidth limit: {lim['read_gbs']:.1f} GB/s read / "
        f"{lim['weight_bytes'] / 1e6:.0f} MB of weights per token = {lim['tok_s']:.1f} tok/s; "
        f"reached: {reached}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    # libgomp's default spin-then-sleep wait makes every small parallel torch op (softmax of a
    # few elements) cost ~8 ms on a 2-vCPU VM, slowing HF ~4x; PASSIVE is HF's best case here.
    # It is read when torch loads; XLA's CPU runtime does not use OpenMP.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # XLA reads this once, when jax is first imported: set it before any import of jax.
    if args.host_devices:
        flags = os.environ.get("XLA_FLAGS", "")
        n = args.host_devices
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    import jax

    import shardinfer as si
    from shardinfer.weights.registry import resolve_registry_name

    path = resolve_registry_name(MODEL)
    assert path is not None
    revision = git_revision()  # before the run: files may change while it runs
    load_s, model = timed(lambda: si.load_model(MODEL, mesh=args.mesh))
    tok = model.tokenizer
    ids = tok.encode(
        tok.apply_chat_template([{"role": "user", "content": PROMPT}]), add_special_tokens=False
    )
    # Batch 1 reads every weight once per token; the tied embedding is one leaf of the state.
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(model.state))
    print(
        f"{MODEL}: {len(ids)} prompt tokens, {weight_bytes / 1e6:.0f} MB weights, "
        f"load {load_s:.1f} s, devices {jax.devices()}",
        flush=True,
    )

    bandwidth = read_bandwidth_gbs()
    print(f"read bandwidth GB/s: {bandwidth}", flush=True)
    ours = bench_shardinfer(model, ids, args)
    hf, hf_bytes = ([], None) if args.skip_hf else bench_hf(path, ids, args)

    read_gbs = max(bandwidth.values())
    limit = read_gbs * 1e9 / weight_bytes
    report = {
        "model": MODEL,
        "gguf": path.name,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "git_revision": revision,
        "shardinfer_file": si.__file__,
        "machine": machine_info(),
        "mesh": args.mesh,
        "env": {k: os.environ.get(k) for k in ("XLA_FLAGS", "OMP_WAIT_POLICY")},
        "dtype": str(model.dtype),
        "prompt_tokens": len(ids),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "load_s": load_s,
        "read_bandwidth_gbs": bandwidth,
        "bandwidth_limit": {
            "read_gbs": read_gbs,
            "weight_bytes": weight_bytes,
            "hf_weight_bytes": hf_bytes,
            "tok_s": limit,
            "fraction_shardinfer": fraction(ours, limit),
            "fraction_hf": fraction(hf, limit),
        },
        "shardinfer": ours,
        "hf": hf,
        "shardinfer_over_hf": compare(ours, hf),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"decode-{jax.devices()[0].platform}-{report['date'][:10]}"
    (args.out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (args.out_dir / f"{stem}.md").write_text(table)
    print(table)
    print(f"wrote {args.out_dir / stem}.json and .md")


if __name__ == "__main__":
    main()
