"""What the benchmark scripts here share: the model and prompt, common options, timing with
a check on foreign CPU load, the transformers reference's greedy loop, and the run's metadata.

benchmarks/ is not a package: the scripts run with this directory on sys.path.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import resource
import statistics
import subprocess
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


def free_stem(out_dir: Path, name: str, date: str) -> Path:
    """out_dir / f"{name}-cpu-{day}", or with b, c, ... after the day where that run's .json is
    already there: a second run on the same day never overwrites the first."""
    day = date[:10]
    for suffix in ["", *"bcdefghijklmnopqrstuvwxyz"]:
        stem = Path(out_dir) / f"{name}-cpu-{day}{suffix}"
        if not stem.with_suffix(".json").exists():
            return stem
    raise FileExistsError(f"26 {name} results for {day} in {out_dir} already")


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
        "cpu_flags": cpu_flags(),
        "kernel_isa": _kernel_isa(),
        "python": platform.python_version(),
        **{name: version(name) for name in ("jax", "jaxlib", "flax", "torch", "transformers")},
        "devices": [str(d) for d in jax.devices()],
    }


def _kernel_isa() -> str | None:
    """The instruction set shardinfer's compiled kernels use here (None: not loaded)."""
    from shardinfer import kernels

    return kernels.isa()


# The CPU features bfloat16 and int8 speed depend on, for every result file.
RESULT_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")


def cpu_flags(wanted: tuple[str, ...] = RESULT_FLAGS) -> str:
    """Those of `wanted` this CPU has, in that order."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return " ".join(f for f in wanted if f in flags) or "no avx2"
