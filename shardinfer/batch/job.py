"""`run_batch`: the Python front end of a batch job (the CLI's `batch` calls it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shardinfer.batch.runner import DEFAULT_MAX_TOKENS, BatchSummary, parse_shard, run_cores
from shardinfer.compile_cache import DEFAULT_CACHE_DIR, enable_compilation_cache
from shardinfer.engine.core import EngineCore, slot_length
from shardinfer.engine.llm import LLM
from shardinfer.mesh import MeshSpec, make_mesh, split_devices
from shardinfer.model import DEFAULT_MODEL, Model, load_model

TASKS = ("generate", "embed")
DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"


def run_batch(
    input: str | Path,
    output: str | Path,
    model: str | Model | LLM = DEFAULT_MODEL,
    *,
    errors: str | Path | None = None,
    task: str = "generate",
    mesh: MeshSpec = None,
    replicas: int = 1,
    max_batch: int = 32,
    max_seq_len: int | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    temperature: float = 1.0,
    seed: int = 0,
    shard: str | tuple[int, int] = (0, 1),
    window: int | None = None,
    progress: bool | None = None,
    warmup: bool = False,
    compilation_cache: str | Path | None = DEFAULT_CACHE_DIR,
    vectors: str = "lines",
    **load_options: Any,
) -> BatchSummary:
    """Runs every line of `input` (JSON lines) and appends one line per id to `output`;
    bad lines go to `errors` (default: `<output stem>.errors.jsonl`) with their line number
    and reason. Rerun with the same arguments after any interruption: ids already written
    are skipped and a torn last line is redone, so the output ends with exactly one line per
    valid id. A row's sampling seed, when it brings none, comes from its id and `seed`.

    `task` "embed": `model` is an encoder (default all-minilm-l6-v2) or an Embedder; lines
    carry `input` (or OpenAI /v1/embeddings bodies) and the output their vectors (`vectors`
    "npy": one .npy file per batch in `<output>.vectors/`, the lines saying where).
    `max_seq_len`: default the model's own limit (generation: at most 2048).

    `model`: a registry name or path (loaded over `mesh`, or over `replicas` sub-meshes of
    the devices), a loaded Model, or an LLM (its engine is used as it is). `shard` "K/N"
    takes only the rows whose id hashes to K of N (N jobs split one input). Under several
    processes, every process calls this with the same arguments; process 0 reads and
    writes. `load_options` go to `load_model` (dtype, quantize, layer_loop, weight_cache).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    shard = parse_shard(shard) if isinstance(shard, str) else shard
    if task == "embed":
        from shardinfer.batch.embed import run_embed_batch

        if replicas != 1:
            raise ValueError(
                "replicas is for generation: an embedding job has no slots to balance, and "
                "spreads each batch over the whole data axis (give --mesh data=N instead)"
            )
        if model == DEFAULT_MODEL:
            model = DEFAULT_EMBEDDING_MODEL
        return run_embed_batch(input, output, model, errors=errors, mesh=mesh,
                               max_batch=max_batch, max_seq_len=max_seq_len, shard=shard,
                               window=window, progress=progress, vectors=vectors,
                               compilation_cache=compilation_cache, **load_options)  # fmt: skip
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    enable_compilation_cache(compilation_cache)
    cores = _cores(model, mesh, replicas, max_batch, max_seq_len, load_options)
    if warmup:
        for core in cores:
            core.warmup()
    name = model if isinstance(model, str) else _model_name(cores[0].model)
    return run_cores(cores, Path(input), Path(output), errors, model_name=name,
                     task=None, max_tokens=max_tokens, temperature=temperature, seed=seed,
                     shard=shard, window=window, progress=progress)  # fmt: skip


def _cores(model, mesh, replicas: int, max_batch: int, max_seq_len: int, load_options):
    if isinstance(model, LLM | Model) and replicas != 1:
        raise ValueError("replicas needs a model name or path (each replica loads its own copy)")
    if isinstance(model, LLM):
        return [model.core]
    if isinstance(model, Model):
        return [EngineCore(model, max_batch, slot_length(model, max_seq_len))]
    import jax

    if replicas > 1 and jax.process_count() > 1:
        raise ValueError("replicas with several processes is not supported yet")
    cores = []
    for devices in split_devices(replicas) if replicas > 1 else [None]:
        loaded = load_model(model, make_mesh(mesh, devices=devices) if devices else mesh,
                            **load_options)  # fmt: skip
        cores.append(EngineCore(loaded, max_batch, slot_length(loaded, max_seq_len)))
    return cores


def _model_name(model: Model) -> str:
    return Path(model.source).name if model.source else model.config.architecture
