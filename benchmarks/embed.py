"""Embeddings per second: si.Embedder against sentence-transformers (PyTorch CPU, 2 threads,
the same all-MiniLM-L6-v2 weights) in one run, at batch 64, on one device and on `data=8`
(8 simulated CPU devices in this process).

The texts are a fixed mix of lengths (a few words to past the model's 256-token limit), as a
corpus to index would be; both sides get the same list, batch 64, and sort by length inside
(sentence-transformers does, and so does the Embedder). Each engine is warmed up once (the
Embedder compiles every bucket shape), then timed `--repeats` times; medians. The vectors are
checked against each other (max cosine distance) so a fast wrong answer cannot pass.

    python benchmarks/embed.py [--texts 1024] [--repeats 3]
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch's idle threads must not spin

import argparse
import datetime
import json
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import cpu_flags, cpu_times, free_stem, git_revision, machine_info, other_load, timed

MODEL = "all-minilm-l6-v2"
BATCH = 64
WORDS = [
    "the",
    "model",
    "maps",
    "every",
    "sentence",
    "to",
    "a",
    "vector",
    "so",
    "texts",
    "which",
    "mean",
    "alike",
    "lie",
    "close",
]


def corpus(n: int) -> list[str]:
    """n texts: most of 5-60 words, one in eight of 100-300 (truncated at 256 tokens)."""
    rng = random.Random(0)
    texts = []
    for i in range(n):
        length = rng.randint(100, 300) if i % 8 == 0 else rng.randint(5, 60)
        texts.append(" ".join(rng.choice(WORDS) for _ in range(length)).capitalize() + ".")
    return texts


def _time(fn, repeats: int) -> tuple[float, object, float]:
    start = cpu_times()
    seconds, out = [], None
    for _ in range(repeats):
        s, out = timed(fn)
        seconds.append(s)
    return statistics.median(seconds), out, other_load(start)


def _cosine_distance(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    return float((1 - cosine).max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--texts", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args()

    import jax
    import torch
    from sentence_transformers import SentenceTransformer

    import shardinfer as si
    from shardinfer.weights.registry import resolve_registry_name

    torch.set_num_threads(2)
    texts = corpus(args.texts)
    st = SentenceTransformer(str(resolve_registry_name(MODEL)), device="cpu")
    reference = st.encode(texts[:BATCH], batch_size=BATCH)  # warm-up and the parity reference

    def run_st():
        with torch.inference_mode():
            return st.encode(texts, batch_size=BATCH, convert_to_numpy=True)

    meshes = {"1 device": si.make_mesh("data=1", devices=jax.devices()[:1]), "`data=8`": "data=8"}
    embedders = {}
    for name, mesh in meshes.items():
        embedder = si.Embedder(MODEL, mesh=mesh, max_batch=BATCH)
        embedder.warmup()
        embedders[name] = embedder
    tokens = sum(len(ids) for ids in embedders["1 device"].tokenize(texts))

    results = []
    # The engines alternate, sentence-transformers first and last, so drift in the machine's
    # speed during the run shows as a difference between its two timings.
    order = [("sentence-transformers", run_st)]
    order += [(name, (lambda e=e: e.embed(texts))) for name, e in embedders.items()]
    order += [("sentence-transformers (again)", run_st)]
    for name, fn in order:
        seconds, vectors, load = _time(fn, args.repeats)
        results.append({
            "engine": name if name.startswith("sentence") else f"shardinfer {name}",
            "seconds": seconds,
            "embeddings_s": len(texts) / seconds,
            "tokens_s": tokens / seconds,
            "max_cosine_distance": _cosine_distance(vectors[:BATCH], reference),
            "other_load_cores": load,
        })  # fmt: skip
        print(results[-1], flush=True)
    st_rate = statistics.mean(r["embeddings_s"] for r in results if r["engine"].startswith("sent"))
    for r in results:
        r["vs_sentence_transformers"] = r["embeddings_s"] / st_rate

    result = {
        "date": datetime.date.today().isoformat(),
        "revision": git_revision(),
        "machine": machine_info(),
        "cpu_flags": cpu_flags(),
        "texts": len(texts),
        "tokens": tokens,
        "batch": BATCH,
        "results": results,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = free_stem(args.out_dir, "embed", result["date"])
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [
        f"# Embeddings: shardinfer vs sentence-transformers ({result['date']})",
        "",
        f"Revision {result['revision']}, {result['machine']['cpu_model']}, "
        f"{result['machine']['cpu_count']} cores ({result['cpu_flags']}); {MODEL} float32; "
        f"{len(texts)} texts ({tokens} tokens, 5 to 300 words, one in eight truncated at 256 "
        f"tokens), batch {BATCH}; sentence-transformers on PyTorch CPU with 2 threads, timed "
        "before and after shardinfer (the ratio is against their mean); medians of "
        f"{args.repeats} runs.",
        "",
        "| engine | embeddings/s | tokens/s | vs sentence-transformers | max cosine distance | "
        "other load |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['engine']} | {r['embeddings_s']:.1f} | {r['tokens_s']:.0f} | "
            f"{r['vs_sentence_transformers']:.2f}x | {r['max_cosine_distance']:.1e} | "
            f"{r['other_load_cores']:.2f} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
