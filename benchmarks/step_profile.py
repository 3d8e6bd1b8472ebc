"""Where a batch-1 decode step's time goes: each piece of one layer timed on its own, jitted,
against the whole engine step (SmolLM2-135M, one CPU device, float32 / w8a8 / gguf).

Every piece runs 200 times in a jitted loop (`lax.fori_loop`, so Python's dispatch is not in
it) on decode shapes: one token, a cache of 128 positions. Then the engine's own decode step
is timed the way `shardinfer bench` does (64 tokens less 1, over 63 steps). What the pieces
do not add up to is the engine's overhead between programs. Run from the repository root:

    python benchmarks/step_profile.py [--quantize gguf,w8a8,none]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import cpu_flags, cpu_times, git_revision, other_load

LOOPS = 200


def loop_us(fn, *args) -> float:
    """µs per call of `fn(*args)` run LOOPS times inside one jitted loop (min of 3)."""
    import jax

    def body(_, carry):
        out = fn(*carry)
        # Feed a bit of the output back so the loop cannot be hoisted: the pieces stay live.
        first = jax.tree.leaves(out)[0]
        return (carry[0] + 0 * first.reshape(-1)[0].astype(carry[0].dtype), *carry[1:])

    run = jax.jit(lambda *a: jax.lax.fori_loop(0, LOOPS, body, a))
    jax.block_until_ready(run(*args))
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(run(*args))
        best = min(best, time.perf_counter() - start)
    return best / LOOPS * 1e6


def profile(quantize: str | None) -> dict:
    import jax.numpy as jnp
    from flax import nnx

    import shardinfer as si
    from shardinfer.models.interface import LayerKV
    from shardinfer.models.rope import inverse_frequencies, rope_tables
    from shardinfer.models.weights import dense

    model = si.load_model("smollm2-135m-instruct", mesh="data=1", quantize=quantize)
    module = nnx.merge(model.graphdef, model.state)
    cfg = module.cfg
    block = module.layers[0]
    attn, mlp = block.self_attn, block.mlp
    x = jnp.ones((1, 1, cfg.hidden_size), jnp.float32) * 0.1
    positions = jnp.array([[100]], jnp.int32)
    rope = rope_tables(positions, inverse_frequencies(cfg))
    seq = 128
    cache = LayerKV(jnp.zeros((1, cfg.num_kv_heads, cfg.head_dim, seq), jnp.float32),
                    jnp.zeros((1, cfg.num_kv_heads, seq, cfg.head_dim), jnp.float32))  # fmt: skip
    attn_out = jnp.ones((1, 1, cfg.num_heads, cfg.head_dim), jnp.float32) * 0.1
    hidden_mlp = jnp.ones((1, 1, cfg.intermediate_size), jnp.float32) * 0.1
    pieces = {
        "input norm": (lambda h: block.input_layernorm(h), x),
        "q, k, v matmuls": (
            lambda h: (dense(h, attn.q_proj), dense(h, attn.k_proj), dense(h, attn.v_proj)),
            x,
        ),
        "attention (whole, with its matmuls)": (lambda h: attn(h, positions, rope, cache), x),
        "o_proj matmul": (lambda a: dense(a, attn.o_proj, contract=2), attn_out),
        "post-attention norm": (lambda h: block.post_attention_layernorm(h), x),
        "gate, up matmuls": (lambda h: (dense(h, mlp.gate_proj), dense(h, mlp.up_proj)), x),
        "down matmul": (lambda h: dense(h, mlp.down_proj), hidden_mlp),
        "mlp (whole)": (lambda h: mlp(h), x),
        "layer (whole)": (lambda h: block(h, positions, rope, cache), x),
        "lm_head (logits)": (lambda h: module.logits(h), x),
    }
    row: dict = {"quantize": quantize or "none", "weight_bytes": model.weight_bytes(), "us": {}}
    for name, (fn, arg) in pieces.items():
        row["us"][name] = loop_us(fn, arg)
        print(f"{quantize or 'none':>5} {name:<38} {row['us'][name]:8.1f} µs", flush=True)
    llm = si.LLM(model, max_batch=1, max_seq_len=256, compilation_cache=None)
    ids = model.tokenizer.encode("The history of the printing press")
    params = si.SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    llm.generate([ids], params)  # compile
    llm.generate([ids], si.SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
    times = []
    for n in (1, 64, 1, 64):
        p = si.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        start = time.perf_counter()
        llm.generate([ids], p)
        times.append((n, time.perf_counter() - start))
    one = min(t for n, t in times if n == 1)
    many = min(t for n, t in times if n == 64)
    row["engine_step_us"] = (many - one) / 63 * 1e6
    row["engine_parts_us"] = engine_parts(llm, ids)
    layers = cfg.num_layers * row["us"]["layer (whole)"]
    row["layers_us"] = layers
    row["unexplained_us"] = row["engine_step_us"] - layers - row["us"]["lm_head (logits)"]
    print(f"{quantize or 'none':>5} engine step {row['engine_step_us']:.0f} µs; "
          f"{cfg.num_layers} layers {layers:.0f} µs", flush=True)  # fmt: skip
    return row


def engine_parts(llm, ids) -> dict[str, float]:
    """µs per decode step of each part of the engine's step (each waited for, so they add
    up): the host's plan and commit, placing the inputs, the decode program, the cache-write
    program, reading the token back."""
    import collections

    import jax

    import shardinfer as si
    from shardinfer.engine import engine as engine_module

    spent, calls = collections.defaultdict(float), collections.Counter()

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = jax.block_until_ready(fn(*args, **kwargs))
            spent[name] += time.perf_counter() - start
            calls[name] += 1
            return out

        return wrapper

    engine, scheduler = llm.core.engine, llm.core.scheduler
    saved = (engine._decode_inputs, engine._decode, engine._write, scheduler.plan,
             scheduler.commit, engine_module.fetch_replicated)  # fmt: skip
    engine._decode_inputs = timed("place inputs", engine._decode_inputs)
    engine._decode = timed("decode program", engine._decode)
    engine._write = timed("cache-write program", engine._write)
    scheduler.plan = timed("plan (host)", scheduler.plan)
    scheduler.commit = timed("commit (host)", scheduler.commit)
    engine_module.fetch_replicated = timed("read the token", engine_module.fetch_replicated)
    try:
        llm.generate([ids], si.SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
    finally:
        (engine._decode_inputs, engine._decode, engine._write, scheduler.plan,
         scheduler.commit, engine_module.fetch_replicated) = saved  # fmt: skip
    return {name: spent[name] / calls[name] * 1e6 for name in spent}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quantize", default="gguf,w8a8,none")
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args()
    os.environ.setdefault("JAX_NUM_CPU_DEVICES", "1")
    start = cpu_times()
    rows = [profile(None if q == "none" else q) for q in args.quantize.split(",")]
    report = {
        "date": datetime.date.today().isoformat(),
        "revision": git_revision(),
        "cpu_flags": cpu_flags(),
        "cpu_model": next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            "?",
        ),
        "foreign_cores": other_load(start),
        "rows": rows,
    }
    out = args.out_dir / f"step-profile-cpu-{report['date']}"
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    names = list(rows[0]["us"])
    lines = [
        f"# A batch-1 decode step, piece by piece ({report['date']})",
        "",
        f"Revision {report['revision']}, {report['cpu_model']}; CPU flags: "
        f"{report['cpu_flags']}; other load {report['foreign_cores']:.2f} cores. "
        "`python benchmarks/step_profile.py`: each piece of layer 0 in a jitted loop "
        f"({LOOPS} calls; µs per call), the engine's decode step from 64 vs 1 tokens.",
        "",
        "| piece | " + " | ".join(r["quantize"] for r in rows) + " |",
        "|---|" + "---:|" * len(rows),
    ]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{r['us'][name]:.1f}" for r in rows) + " |")
    for key, label in (("layers_us", "30 layers"), ("engine_step_us", "engine decode step"),
                       ("unexplained_us", "step less layers and lm_head")):  # fmt: skip
        lines.append(f"| **{label}** | " + " | ".join(f"{r[key]:.0f}" for r in rows) + " |")
    parts = list(rows[0]["engine_parts_us"])
    lines += ["", "The engine's decode step by parts (µs per step, each part waited for):", "",
              "| part | " + " | ".join(r["quantize"] for r in rows) + " |",
              "|---|" + "---:|" * len(rows)]  # fmt: skip
    for name in parts:
        values = " | ".join(f"{r['engine_parts_us'][name]:.0f}" for r in rows)
        lines.append(f"| {name} | {values} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}.json and .md")


if __name__ == "__main__":
    main()
