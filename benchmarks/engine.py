"""Engines side by side: shardinfer (float32, bfloat16, int8, w8a8) vs HF transformers vs
llama.cpp.

One run measures, on one chat prompt and the same GGUF file: greedy decode tok/s per batch size
and time to first token (TTFT) for a 32- and a 512-token prompt per engine and dtype; the
batch-1 memory-bandwidth limit; shardinfer float32 on simulated meshes of 8 CPU devices; and the
startup of a fresh `shardinfer generate` process, cold and warm. Writes JSON, Markdown and a PNG
plot to --out-dir. Needs `pip install llama-cpp-python matplotlib`. Run from the repository root:

    python benchmarks/engine.py [--batch-sizes 1,8,32] [--new-tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# benchmarks/ is not a package; run as a script, this file's directory is on sys.path.
from common import (
    MODEL,
    PROMPT,
    add_common_args,
    free_stem,
    git_revision,
    hf_generate,
    machine_info,
    measure,
    timed,
)

# int8: int8 weights, float32 activations; w8a8: int8 weights and activations (int8 dots);
# gguf: the GGUF file's own blocks (Q4_1 layers, a Q8_0 table) through the block kernels.
SHARDINFER_DTYPES = ("float32", "bfloat16", "int8", "w8a8", "gguf")
QUANTIZED = ("int8", "w8a8", "gguf")
HF_DTYPES = ("float32", "bfloat16")
TTFT_LENGTHS = (32, 512)
MESHES = ("1 device", "data=8", "model=8", "data=2,model=4")
MESH_BATCHES = (1, 8)
Row = dict[str, Any]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--render", type=Path, help="only rewrite .md and .png from this JSON")
    p.add_argument("--only", default="",
                   help="comma-separated section names to run (e.g. 'shardinfer gguf,llama.cpp'); "
                        "default: every section")  # fmt: skip
    p.add_argument("--worker", help=argparse.SUPPRESS)  # "llama.cpp" or a mesh, in a subprocess
    args = p.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    return args


def cpu_snapshot() -> tuple[float, float, float]:
    """(wall s, busy CPU s of the host, CPU s of this process and its finished children)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    own = sum(
        r.ru_utime + r.ru_stime
        for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    )
    return time.perf_counter(), busy, own


def foreign_cores(start: tuple[float, float, float]) -> float:
    """Cores' worth of CPU used by anything but us (and our subprocesses) since start.

    common.other_load counts our own subprocesses as foreign; the mesh and startup sections
    run in subprocesses."""
    end = cpu_snapshot()
    return ((end[1] - start[1]) - (end[2] - start[2])) / (end[0] - start[0])


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of fn after one untimed call (compilation, allocator warm-up)."""
    fn()
    return statistics.median(timed(fn)[0] for _ in range(repeats))


def prompt_ids() -> list[int]:
    import shardinfer as si

    tok = si.load_model(MODEL, dtype="float32").tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}])
    return tok.encode(text, add_special_tokens=False)


def long_prompt(ids: list[int], n: int) -> list[int]:
    """The chat prompt repeated to exactly n tokens: every engine prefills the same ids."""
    return (ids * (n // len(ids) + 1))[:n]


def gguf_path() -> Path:
    from shardinfer.weights.registry import resolve_registry_name

    path = resolve_registry_name(MODEL)
    assert path is not None, f"{MODEL} is not in the registry"
    return Path(path)


def bench_shardinfer(
    dtype: str, ids: list[int], args: argparse.Namespace, mesh: str | None = None
) -> Row:
    """Decode per batch size, and TTFT unless on a mesh (there only decode is compared)."""
    import jax

    import shardinfer as si
    from shardinfer.serving.bench import time_to_first_token

    # "1 device" among 8 simulated ones: the same process setup as the sharded meshes.
    spec = si.make_mesh(None, devices=jax.devices()[:1]) if mesh == "1 device" else mesh
    quantize = dtype if dtype in QUANTIZED else None
    load_s, model = timed(
        lambda: si.load_model(
            MODEL, mesh=spec, dtype="float32" if quantize else dtype, quantize=quantize
        )
    )
    max_seq = max(TTFT_LENGTHS) + len(ids) + args.new_tokens
    row: Row = {"engine": "shardinfer", "dtype": dtype, "mesh": mesh, "load_s": load_s}
    row["weight_bytes"] = model.weight_bytes()
    row["decode"] = []
    for batch in MESH_BATCHES if mesh else args.batch_sizes:
        # No persistent compilation cache: first_call_s is a cold compile plus one run.
        llm = si.LLM(model, max_batch=batch, max_seq_len=max_seq, compilation_cache=None)

        def run(n: int, llm: si.LLM = llm, batch: int = batch) -> list[list[int]]:
            params = si.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
            return [o.token_ids for o in llm.generate([ids] * batch, params)]

        row["decode"].append(measure(run, batch, args.new_tokens, args.repeats))
        log(f"shardinfer {dtype} {mesh or ''} batch {batch}", row["decode"][-1])
    if not mesh:
        llm = si.LLM(model, max_batch=1, max_seq_len=max_seq, compilation_cache=None)
        row["ttft_s"] = {
            n: time_to_first_token(llm, long_prompt(ids, n), args.repeats) for n in TTFT_LENGTHS
        }
    return row


def bench_hf(dtype: str, ids: list[int], args: argparse.Namespace) -> Row:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)  # the host's 2 cores, as XLA and llama.cpp use
    path = gguf_path()
    load_s, hf = timed(
        lambda: AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=getattr(torch, dtype)
        ).eval()
    )

    def generate(prompt: list[int], batch: int, n: int) -> list[list[int]]:
        return hf_generate(hf, prompt, batch, n)

    row: Row = {"engine": "hf", "dtype": dtype, "load_s": load_s, "decode": []}
    row["weight_bytes"] = sum(p.nbytes for p in hf.parameters())  # a tied weight counts once
    for batch in args.batch_sizes:
        run = lambda n, b=batch: generate(ids, b, n)  # noqa: E731
        row["decode"].append(measure(run, batch, args.new_tokens, args.repeats))
        log(f"hf {dtype} batch {batch}", row["decode"][-1])
    row["ttft_s"] = {
        n: median_seconds(lambda n=n: generate(long_prompt(ids, n), 1, 1), args.repeats)
        for n in TTFT_LENGTHS
    }
    return row


def bench_llama_cpp(ids: list[int], args: argparse.Namespace) -> Row:
    """llama.cpp through llama-cpp-python's low-level API: all sequences of a batch go through
    one llama_decode per step (real batched decoding), greedy by argmax over the logits."""
    import llama_cpp as lc
    import numpy as np

    lc.llama_backend_init()
    mparams = lc.llama_model_default_params()
    # The AMX extra buffer type crashes on this CPU (llama.cpp issue 20824).
    mparams.use_extra_bufts = False
    path = gguf_path()
    load_s, model = timed(lambda: lc.llama_model_load_from_file(str(path).encode(), mparams))
    assert model, f"llama.cpp could not load {path}"
    n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))

    def run_on(ctx: Any, prompts: list[list[int]], n: int) -> list[list[int]]:
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        batch = lc.llama_batch_init(sum(map(len, prompts)), 0, len(prompts))
        try:
            out: list[list[int]] = [[] for _ in prompts]
            # Prefill every prompt in one batch (llama.cpp splits it into micro-batches),
            # then one token per sequence per step; only last positions produce logits.
            step = [(s, pos, tok) for s, p in enumerate(prompts) for pos, tok in enumerate(p)]
            for i in range(n):
                batch.n_tokens = len(step)
                last = {}
                for j, (s, pos, tok) in enumerate(step):
                    batch.token[j], batch.pos[j], batch.n_seq_id[j] = tok, pos, 1
                    batch.seq_id[j][0] = s
                    batch.logits[j] = pos == (len(prompts[s]) + i - 1)
                    if batch.logits[j]:
                        last[s] = j
                assert lc.llama_decode(ctx, batch) == 0, "llama_decode failed"
                for s, j in last.items():
                    logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, j), (n_vocab,))
                    out[s].append(int(logits.argmax()))
                step = [(s, len(prompts[s]) + i, out[s][-1]) for s in range(len(prompts))]
        finally:
            lc.llama_batch_free(batch)
        return out

    def context(n_seq: int, n_ctx_seq: int) -> Any:
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = n_seq * n_ctx_seq
        cparams.n_batch = max(512, n_seq * max(TTFT_LENGTHS))
        cparams.n_seq_max = n_seq
        cparams.n_threads = cparams.n_threads_batch = 2
        ctx = lc.llama_init_from_model(model, cparams)
        assert ctx, "llama.cpp could not create a context"
        return ctx

    n_ctx_seq = max(TTFT_LENGTHS) + len(ids) + args.new_tokens + 64
    row: Row = {"engine": "llama.cpp", "dtype": path.name.split(".")[-2], "load_s": load_s}
    row["weight_bytes"] = lc.llama_model_size(model)
    row["llama_cpp_python"] = lc.__version__
    row["decode"] = []
    for b in args.batch_sizes:
        ctx = context(b, n_ctx_seq)
        run = lambda n, ctx=ctx, b=b: run_on(ctx, [ids] * b, n)  # noqa: E731
        row["decode"].append(measure(run, b, args.new_tokens, args.repeats))
        log(f"llama.cpp batch {b}", row["decode"][-1])
        lc.llama_free(ctx)
    ctx = context(1, n_ctx_seq)
    row["ttft_s"] = {
        n: median_seconds(lambda n=n: run_on(ctx, [long_prompt(ids, n)], 1), args.repeats)
        for n in TTFT_LENGTHS
    }
    lc.llama_free(ctx)
    lc.llama_model_free(model)
    return row


def in_subprocess(worker: str, args: argparse.Namespace, env: dict[str, str | None]) -> Row:
    """Runs this script's --worker in a fresh process; its last stdout line is the JSON row."""
    cmd = [sys.executable, __file__, "--worker", worker, "--new-tokens", str(args.new_tokens)]
    cmd += ["--repeats", str(args.repeats), "--batch-sizes", ",".join(map(str, args.batch_sizes))]
    full_env = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True)
    sys.stderr.write(proc.stderr[-2000:])
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        return {"worker": worker, "error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}
    return json.loads(lines[-1])


def startup(cold: bool, cache: Path) -> Row:
    """A fresh `shardinfer generate --max-tokens 1` process: its wall time (exit included) and
    what its stderr says about load, compilation, TTFT and the first token's time since the
    process started. Cold: empty compilation and weight caches (both under `cache`)."""
    exe = Path(sys.executable).parent / "shardinfer"
    cmd = [str(exe), "generate", "--prompt", PROMPT, "--max-tokens", "1"]
    caches = ["--compilation-cache", str(cache / "jax"), "--weight-cache", str(cache / "weights")]
    wall, proc = timed(lambda: subprocess.run([*cmd, *caches], capture_output=True, text=True))
    row: Row = {"cache": "cold" if cold else "warm", "process_wall_s": wall, "rc": proc.returncode}
    patterns = {
        "load_s": r"loaded \S+ in ([\d.]+)s",
        "generate_s": r"tokens? in ([\d.]+)s",
        "compile_s": r"including ([\d.]+)s of compilation",
        "cli_ttft_s": r"time to first token ([\d.]+)s",
        "first_token_after_start_s": r"([\d.]+)s after the process started",
    }
    for key, pattern in patterns.items():
        m = re.search(pattern, proc.stderr)
        row[key] = float(m.group(1)) if m else None
    if proc.returncode:
        row["error"] = proc.stderr[-1500:]
    return row


def log(what: str, point: Row) -> None:
    print(
        f"{what}: {point['decode_tok_s']:.1f} tok/s, other load {point['other_load_cores']:.2f}",
        file=sys.stderr,
        flush=True,
    )


def worker(args: argparse.Namespace) -> None:
    ids = json.loads(os.environ["ENGINE_BENCH_IDS"])
    if args.worker == "llama.cpp":
        row = bench_llama_cpp(ids, args)
    else:
        row = bench_shardinfer("float32", ids, args, mesh=args.worker)
    print(json.dumps(row))


def main() -> None:
    args = parse_args()
    if args.worker:
        return worker(args)
    if args.render:
        return render(json.loads(args.render.read_text()), args.render.with_suffix(""))
    # Read by torch's libgomp at import: its default wait policy spins, which made torch several
    # times slower on small VMs (flattering us). llama.cpp runs in a subprocess with the default
    # policy, which its OpenMP threadpool expects.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from shardinfer.serving.bench import read_bandwidth_gbps

    revision = git_revision()  # before the run: files may change while it runs
    ids = prompt_ids()
    report: Row = {
        "model": MODEL,
        "gguf": gguf_path().name,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "git_revision": revision,
        "machine": machine_info(),
        "env": {k: os.environ.get(k) for k in ("XLA_FLAGS", "OMP_WAIT_POLICY")},
        "prompt_tokens": len(ids),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "read_bandwidth_gbps": read_bandwidth_gbps(),
        "engines": [],
        "meshes": [],
        "startup": [],
        "section_foreign_cores": {},
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = free_stem(args.out_dir, "engine", report["date"])

    chosen = {name.strip() for name in args.only.split(",") if name.strip()}

    def section(name: str, fn: Callable[[], Row], into: str) -> None:
        if chosen and not any(name.startswith(c) for c in chosen):
            return
        start = cpu_snapshot()
        try:
            report[into].append(fn())
        except Exception as e:  # record it, and measure the other engines
            report[into].append({"section": name, "error": f"{type(e).__name__}: {e}"})
        report["section_foreign_cores"][name] = foreign_cores(start)
        out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")  # partial

    ids_env: dict[str, str | None] = {"ENGINE_BENCH_IDS": json.dumps(ids)}
    for dtype in SHARDINFER_DTYPES:
        section(f"shardinfer {dtype}", lambda d=dtype: bench_shardinfer(d, ids, args), "engines")
    for dtype in HF_DTYPES:
        section(f"hf {dtype}", lambda d=dtype: bench_hf(d, ids, args), "engines")
    llama_env: dict[str, str | None] = {**ids_env, "OMP_WAIT_POLICY": None}
    section("llama.cpp", lambda: in_subprocess("llama.cpp", args, llama_env), "engines")
    with tempfile.TemporaryDirectory() as cache:
        for i, cold in enumerate((True, False, False, False)):
            section(f"startup {i} {cold=}", lambda c=cold: startup(c, Path(cache)), "startup")
    # XLA reads the device count once, at jax's import: every mesh gets a fresh process.
    mesh_env: dict[str, str | None] = {
        **ids_env,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    }
    for mesh in MESHES:
        section(f"mesh {mesh}", lambda m=mesh: in_subprocess(m, args, mesh_env), "meshes")
    render(report, out)


def agreement(row: Row, ref: Row | None) -> str:
    """Leading greedy tokens of row 0 at the first batch size that match the reference's."""
    if ref is None:
        return "-"
    a, b = row["decode"][0]["tokens_row0"], ref["decode"][0]["tokens_row0"]
    same = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
    return f"{same}/{len(a)}"


def fmt_ratio(values: list[float | None]) -> str:
    return " / ".join("-" if v is None else f"{v:.2f}" for v in values)


def render(report: Row, out: Path) -> None:
    """Markdown tables (ratios per batch size) and the tok/s-vs-batch plot, from the JSON."""
    engines = [r for r in report["engines"] if "decode" in r]
    rate = {
        (r["engine"], r["dtype"], p["batch"]): p["decode_tok_s"]
        for r in engines
        for p in r["decode"]
    }
    batches = sorted({b for _, _, b in rate})
    limit_of = {id(r): report["read_bandwidth_gbps"] * 1e9 / r["weight_bytes"] for r in engines}
    m = report["machine"]
    lines = [
        f"# Engines: {report['model']} ({report['gguf']}), {report['date']}",
        "",
        f"{m['cpu_model']}, {m['cpu_count']} cores (flags: {m.get('cpu_flags', '?')}; "
        f"shardinfer kernels: {m.get('kernel_isa', '?')}); jax {m['jax']}, torch {m['torch']}, "
        f"transformers {m['transformers']}; prompt {report['prompt_tokens']} tokens, "
        f"{report['new_tokens']} new tokens (greedy), median of {report['repeats']} runs; "
        f"read bandwidth {report['read_bandwidth_gbps']:.1f} GB/s.",
        "",
        f"Decode tok/s at batch {' / '.join(map(str, batches))}; ratios against HF float32 and "
        "against the fastest other engine at the same batch size.",
        "",
        "| engine | dtype | tok/s | x HF f32 | x best peer | TTFT 32 ms | TTFT 512 ms "
        "| batch-1 limit tok/s | reached | greedy = HF f32 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    hf_row = next((r for r in engines if (r["engine"], r["dtype"]) == ("hf", "float32")), None)
    for r in engines:
        own = [rate.get((r["engine"], r["dtype"], b)) for b in batches]
        hf = [rate.get(("hf", "float32", b)) for b in batches]
        peers = [
            max((v for (e, _, bb), v in rate.items() if bb == b and e != r["engine"]), default=None)
            for b in batches
        ]
        ttft = {int(k): v for k, v in r.get("ttft_s", {}).items()}
        limit = limit_of[id(r)]
        cells = [
            r["engine"],
            r["dtype"],
            " / ".join("-" if v is None else f"{v:.1f}" for v in own),
            fmt_ratio([o / h if o and h else None for o, h in zip(own, hf, strict=True)]),
            fmt_ratio([o / p if o and p else None for o, p in zip(own, peers, strict=True)]),
            *(f"{ttft[n] * 1e3:.0f}" if n in ttft else "-" for n in TTFT_LENGTHS),
            f"{limit:.1f}",
            f"{own[0] / limit:.0%}" if own[0] and batches[0] == 1 else "-",
            agreement(r, hf_row),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "shardinfer float32 on 8 simulated CPU devices (one process per mesh):", ""]
    lines += ["| mesh | " + " | ".join(f"batch {b} tok/s" for b in MESH_BATCHES) + " |"]
    lines += ["|---|" + "---:|" * len(MESH_BATCHES)]
    for r in report["meshes"]:
        got = {p["batch"]: p["decode_tok_s"] for p in r.get("decode", [])}
        cells = [f"{got[b]:.1f}" if b in got else "-" for b in MESH_BATCHES]
        lines.append(f"| {r.get('mesh', r.get('worker'))} | " + " | ".join(cells) + " |")
    lines += ["", "Fresh `shardinfer generate --max-tokens 1` process, one device:", ""]
    lines += ["| caches | first token after process start s | process wall s (exit included) "
              "| load s | compile s | CLI TTFT s |"]  # fmt: skip
    lines += ["|---|---:|---:|---:|---:|---:|"]
    keys = ("first_token_after_start_s", "process_wall_s", "load_s", "compile_s", "cli_ttft_s")
    for r in report["startup"]:
        vals = [r.get(k) for k in keys]
        cells = ["-" if v is None else f"{v:.1f}" for v in vals]
        lines.append(f"| {r.get('cache')} | " + " | ".join(cells) + " |")
    errors = [r for key in ("engines", "meshes", "startup") for r in report[key] if "error" in r]
    lines += ["", "Failures:" if errors else "No failures."]
    lines += [f"- {r.get('section') or r.get('worker')}: {r['error'][-300:]!r}" for r in errors]
    load = report["section_foreign_cores"]
    lines += [
        "",
        "Foreign CPU load per section (cores; > ~0.1 means noisy): "
        + ", ".join(f"{k} {v:.2f}" for k, v in load.items()),
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")  # no display on a benchmark host
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in engines:
        points = sorted((p["batch"], p["decode_tok_s"]) for p in r["decode"])
        ax.plot(*zip(*points, strict=True), marker="o", label=f"{r['engine']} {r['dtype']}")
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="decode tok/s (all rows)")
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_title(f"{report['model']} on {m['cpu_count']} CPU cores, {report['date'][:10]}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out}.json, .md and .png")


if __name__ == "__main__":
    main()
