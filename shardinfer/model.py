"""`load_model` and the `Model` handle: a sharded parameter tree plus what it needs to run."""

from __future__ import annotations

import dataclasses
import logging
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from shardinfer.config import ModelConfig
from shardinfer.mesh import MeshSpec, make_mesh, mesh_platform
from shardinfer.models.blocks import BlockWeight
from shardinfer.models.interface import LAYER_LOOPS
from shardinfer.models.layer_forms import convert_layers
from shardinfer.models.registry import Family, family_for, gguf_family, hf_family
from shardinfer.models.weights import BLOCK_MODES, INT8_MODES, QUANTIZE_MODES
from shardinfer.sharding import Sharder, ShardingRules, place
from shardinfer.weights.gguf_file import GGUFFile
from shardinfer.weights.hf import SafetensorsDirectory, read_hf_config
from shardinfer.weights.host_cache import DEFAULT_WEIGHT_CACHE_DIR, WeightCache
from shardinfer.weights.loader import load_params, param_shardings
from shardinfer.weights.orbax_io import (
    is_checkpoint,
    read_block_formats,
    read_checkpoint_config,
    restore_params,
    save_checkpoint,
)
from shardinfer.weights.registry import registry_names, resolve_registry_name
from shardinfer.weights.tokenizer import Tokenizer
from shardinfer.xla_options import step_compiler_options

log = logging.getLogger("shardinfer")

DEFAULT_MODEL = "smollm2-135m-instruct"


def resolve_dtype(dtype: Any, platform: str) -> jnp.dtype:
    """None picks float32 on CPU (fastest for matrix-vector work there), bfloat16 elsewhere."""
    if dtype is None:
        return jnp.dtype(jnp.float32 if platform == "cpu" else jnp.bfloat16)
    try:
        resolved = jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"unknown dtype {dtype!r}; use float32 or bfloat16") from e
    if resolved not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"dtype {resolved} is not a float compute dtype (float32, bfloat16)")
    return resolved


def resolve_layer_loop(layer_loop: str | None, platform: str) -> str:
    """None picks the unrolled loop on CPU (XLA:CPU copies a stacked layer's weights out every
    step), lax.scan elsewhere (flat compile time, and no such copy)."""
    if layer_loop is None:
        return "unrolled" if platform == "cpu" else "scan"
    if layer_loop not in LAYER_LOOPS:
        raise ValueError(f"unknown layer_loop {layer_loop!r}; use one of {LAYER_LOOPS}")
    return layer_loop


def as_mesh(mesh: Mesh | MeshSpec, rules: ShardingRules | None = None) -> Mesh:
    """A Mesh as given, or one built from a spec over the axes `rules` use."""
    return mesh if isinstance(mesh, Mesh) else make_mesh(mesh, rules=rules)


@dataclasses.dataclass
class Model:
    config: ModelConfig
    mesh: Mesh
    sharder: Sharder
    graphdef: nnx.GraphDef
    state: nnx.State  # parameters, each a jax.Array sharded over `mesh`
    dtype: jnp.dtype
    tokenizer: Tokenizer | None = None
    source: str = ""
    quantize: str | None = None  # None or a QUANTIZE_MODES entry (see models/weights.py)
    layer_loop: str = "scan"  # how the layers run, and the form `state` holds them in

    def __post_init__(self) -> None:
        options = step_compiler_options(self.platform, self.dtype, self.quantize)
        self._logits_fn = jax.jit(partial(_full_logits, self.graphdef), compiler_options=options)

    @property
    def family(self) -> Family:
        """The model family (models/registry.py): its kind says decoder or encoder."""
        return family_for(self.config.architecture)

    @property
    def platform(self) -> str:
        return mesh_platform(self.mesh)

    @property
    def data_size(self) -> int:
        return self.sharder.axis_size("batch")

    def logits(self, token_ids) -> np.ndarray:
        """int [B, T] -> float32 [B, T, vocab]: a plain causal forward pass, no cache."""
        if self.family.kind != "decoder":
            raise ValueError(f"{self.source or self.config.architecture} is an embedding model "
                             "(an encoder): it has no logits; use shardinfer.Embedder")  # fmt: skip
        tokens = np.asarray(token_ids)
        if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise ValueError(
                f"token_ids must be a non-empty [batch, seq] array, got {tokens.shape}"
            )
        check_token_ids(tokens, self.config.vocab_size)
        if tokens.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {tokens.shape[1]} tokens exceeds the model's "
                f"{self.config.max_position_embeddings} positions"
            )
        batch = tokens.shape[0]
        padded = pad_rows(tokens.astype(np.int32), self.data_size)
        out = self._logits_fn(self.state, place(self.sharder, padded, ("batch", "seq")))
        # Gathered to the host (from every process's devices when the mesh spans several),
        # never replicated on the devices: [B, T, vocab] float32 can be gigabytes.
        return np.asarray(multihost_utils.process_allgather(out, tiled=True))[:batch]

    def sharding_table(self) -> list[tuple[str, tuple[int, ...], str]]:
        """(parameter, shape, PartitionSpec) for every parameter, layers folded into one row."""
        rows: dict[str, tuple[tuple[int, ...], str]] = {}
        for path, var in nnx.to_flat_state(self.state):
            name = ".".join("*" if isinstance(p, int) else str(p) for p in path)
            value = var.get_value()
            rows.setdefault(name, (tuple(value.shape), str(value.sharding.spec)))
        return [(name, shape, spec) for name, (shape, spec) in rows.items()]

    def save(self, path: str | Path) -> None:
        """A sharded Orbax checkpoint (+ config and tokenizer); `load_model(path, mesh=...)`
        restores it onto any mesh."""
        if self.family.kind != "decoder":
            # Its pooling (sentence-transformers' modules.json) is not part of a checkpoint.
            raise ValueError("saving an encoder as a shardinfer checkpoint is not supported")
        # quantize="gguf": each weight's format came from the file, so the checkpoint lists them.
        formats = block_formats(self.graphdef, self.state) if self.quantize == "gguf" else None
        # Always the stacked form on disk (models/layer_forms.py).
        graphdef, stacked = abstract_model(self.config, self.sharder, self.dtype, self.quantize,
                                           "scan")  # fmt: skip
        if formats:
            graphdef, stacked = with_block_formats(graphdef, stacked, formats)
        state = convert_layers(self.state, stacked, param_shardings(stacked, self.sharder))
        save_checkpoint(Path(path), self.config, state, self.dtype, self.tokenizer, self.quantize,
                        formats)  # fmt: skip

    def num_params(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.state))

    def weight_bytes(self) -> int:
        """Bytes of all parameters (what one decode step reads at least once)."""
        return sum(x.nbytes for x in jax.tree.leaves(self.state))


def pad_rows(array: np.ndarray, multiple: int) -> np.ndarray:
    """Pads axis 0 up to a multiple (a batch that does not divide the `data` axis)."""
    extra = -array.shape[0] % multiple
    if not extra:
        return array
    return np.concatenate([array, np.zeros((extra, *array.shape[1:]), array.dtype)])


def check_token_ids(tokens: np.ndarray, vocab_size: int) -> None:
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got dtype {tokens.dtype}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(
            f"token ids must lie in [0, {vocab_size}); got {tokens.min()}..{tokens.max()}"
        )


def _full_logits(graphdef, state, tokens):
    model = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    hidden, _ = model(tokens, positions)
    return model.logits(hidden)


def _block_key(path) -> str:
    """A block weight's name with its layer index left out (one format per stacked weight)."""
    return ".".join(str(p) for p in path if not isinstance(p, int))


def block_formats(graphdef, state) -> dict[str, str]:
    """Each block weight's format, by name (layers folded: a checkpoint stacks them, so the
    layers of one weight must share it)."""
    formats: dict[str, set[str]] = {}
    for path, block in nnx.iter_modules(nnx.merge(graphdef, state)):
        if isinstance(block, BlockWeight):
            formats.setdefault(_block_key(path), set()).add(block.fmt)
    mixed = sorted(key for key, found in formats.items() if len(found) > 1)
    if mixed:
        raise ValueError(
            f"cannot save: the layers of {', '.join(mixed)} hold different block formats, "
            "and a checkpoint stacks each weight's layers in one array"
        )
    return {key: found.pop() for key, found in formats.items()}


def with_block_formats(graphdef, abstract, formats: dict[str, str]) -> tuple:
    """The abstract model with each block weight in the format `formats` names for it."""
    module = nnx.merge(graphdef, abstract)
    for path, block in nnx.iter_modules(module):
        if isinstance(block, BlockWeight):
            key = _block_key(path)
            if key not in formats:
                raise ValueError(f"the checkpoint names no block format for {key}")
            block.reformat(formats[key])
    return nnx.split(module)


def file_block_formats(graphdef, abstract, gguf: GGUFFile, config) -> tuple:
    """The abstract model with each block weight in its GGUF tensor's own format; a weight
    stored as floats, or whose layers differ (a stacked weight has one format), is q8_0."""
    module = nnx.merge(graphdef, abstract)
    hf_tensor = family_for(config.architecture).hf_tensor
    for path, block in nnx.iter_modules(module):
        if not isinstance(block, BlockWeight):
            continue
        stacked = path[0] == "layers" and not isinstance(path[1], int)
        paths = [("layers", i, *path[1:]) for i in range(config.num_layers)] if stacked else [path]
        found = {gguf.block_format(hf_tensor(p, config).name) for p in paths}
        fmt = found.pop() if len(found) == 1 else None
        if fmt is None:
            log.info("%s: %s in the file, held as q8_0", ".".join(map(str, path)),
                     "floats" if not found else "mixed formats")  # fmt: skip
        block.reformat(fmt or "q8_0")
    return nnx.split(module)


def abstract_model(
    config: ModelConfig,
    sharder: Sharder,
    dtype,
    quantize: str | None = None,
    layer_loop: str = "scan",
) -> tuple[nnx.GraphDef, nnx.State]:
    """Shapes, dtypes and logical axes of every parameter; no memory is allocated. The module
    is the one the config's family builds (models/registry.py)."""
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantize mode {quantize!r}; supported: "
                         f"{', '.join(m for m in QUANTIZE_MODES if m)}")  # fmt: skip
    build = family_for(config.architecture).build
    abstract = nnx.eval_shape(lambda: build(config, sharder, dtype, None, quantize, layer_loop))
    return nnx.split(abstract)


def init_random_model(
    config: ModelConfig,
    mesh: Mesh | MeshSpec = None,
    dtype=None,
    seed: int = 0,
    quantize: str | None = None,
    layer_loop: str | None = None,
    rules: ShardingRules | None = None,
) -> Model:
    """Random weights created in place on their shards (for benchmarks of untrained configs,
    and a new family's first steps); `rules` as for load_model."""
    if quantize == "gguf":
        raise ValueError("quantize='gguf' keeps a GGUF file's blocks; for random weights in "
                         "block formats use 'q8_0' or 'q4_0'")  # fmt: skip
    mesh = as_mesh(mesh, rules)
    platform = mesh_platform(mesh)
    dtype, loop = resolve_dtype(dtype, platform), resolve_layer_loop(layer_loop, platform)
    sharder = Sharder(mesh, rules or ShardingRules.load())
    graphdef, abstract = abstract_model(config, sharder, dtype, quantize, loop)
    shardings = param_shardings(abstract, sharder)
    build = family_for(config.architecture).build

    @partial(jax.jit, out_shardings=shardings)
    def init():
        return nnx.split(build(config, sharder, dtype, nnx.Rngs(seed), quantize, loop))[1]

    state = init()
    return Model(config, mesh, sharder, graphdef, state, dtype, None, "random", quantize, loop)


def load_model(
    source: str | Path = DEFAULT_MODEL,
    mesh: Mesh | MeshSpec = None,
    dtype: Any = None,
    rules: ShardingRules | None = None,
    quantize: str | None = None,
    layer_loop: str | None = None,
    weight_cache: str | Path | None = DEFAULT_WEIGHT_CACHE_DIR,
) -> Model:
    """Loads a registry name, a shardinfer checkpoint, a Hugging Face directory or a .gguf file
    straight into the shards of `mesh`. `layer_loop` ("scan" or "unrolled") is picked for the
    platform when None. A GGUF file's dequantized weights are kept under `weight_cache` (None:
    not kept) and memory-mapped by the next load (weights/host_cache.py). Decoders only: an
    embedding model (an encoder) is refused, as `shardinfer.Embedder` loads those."""
    return _load(source, "decoder", mesh, dtype, rules, quantize, layer_loop, weight_cache)


def load_encoder(
    source: str | Path,
    mesh: Mesh | MeshSpec = None,
    dtype: Any = None,
    rules: ShardingRules | None = None,
    layer_loop: str | None = None,
    weight_cache: str | Path | None = None,
) -> Model:
    """An encoder (embedding model: a registry name or a Hugging Face directory) straight into
    the shards of `mesh`, as `load_model` loads a decoder; `shardinfer.Embedder` calls it.
    `weight_cache` is accepted for the same options as load_model (it serves GGUF files only,
    which hold no encoders)."""
    return _load(source, "encoder", mesh, dtype, rules, None, layer_loop, weight_cache)


def source_family(source: str | Path) -> Family:
    """The family of what `source` names, from its config alone (no weights are read): a
    front end asks it whether to build an engine or an Embedder."""
    path = resolve_registry_name(str(source)) or Path(source)
    if path.is_dir() and is_checkpoint(path):
        return family_for(read_checkpoint_config(path, family_for)[0].architecture)
    if path.is_dir() and (path / "config.json").is_file():
        return family_for(read_hf_config(path, hf_family).architecture)
    if path.is_file() and path.suffix == ".gguf":
        return GGUFFile(path, gguf_family).family
    raise _cannot_load(source)


def _cannot_load(source) -> ValueError:
    return ValueError(
        f"cannot load {str(source)!r}: not a registry name ({', '.join(registry_names())}), "
        "a shardinfer checkpoint, a Hugging Face directory with config.json, or a .gguf file"
    )


def _require_kind(config, kind: str, source) -> None:
    """Decoders go to load_model/LLM, encoders to Embedder: the other way round, say which."""
    family = family_for(config.architecture)
    if family.kind == kind:
        return
    if family.kind == "encoder":
        raise ValueError(
            f"{str(source)!r} is an embedding model (the {family.name!r} encoder family): it "
            "cannot generate text; load it with shardinfer.Embedder (and `shardinfer serve` "
            "serves it at /v1/embeddings)"
        )
    raise ValueError(
        f"{str(source)!r} is a text-generation model (the {family.name!r} decoder family), "
        "not an embedding model; use shardinfer.LLM or load_model for it"
    )


def _load(source, kind, mesh, dtype, rules, quantize, layer_loop, weight_cache) -> Model:
    mesh = as_mesh(mesh, rules)
    platform = mesh_platform(mesh)
    dtype, loop = resolve_dtype(dtype, platform), resolve_layer_loop(layer_loop, platform)
    sharder = Sharder(mesh, rules or ShardingRules.load())
    path = resolve_registry_name(str(source)) or Path(source)
    if path.is_dir() and is_checkpoint(path):
        config, stored = read_checkpoint_config(path, family_for)
        _require_kind(config, kind, source)
        same_arrays = stored in INT8_MODES and quantize in INT8_MODES  # only the matmul differs
        if quantize is not None and quantize != stored and not same_arrays:
            raise ValueError(
                f"{path} stores quantize={stored!r} weights; load it without quantize=, or "
                f"convert the original checkpoint with quantize={quantize!r}"
            )
        mode = quantize or stored
        formats = read_block_formats(path) if mode == "gguf" else None
        disk_graphdef, on_disk = abstract_model(config, sharder, dtype, mode, "scan")
        graphdef, abstract = abstract_model(config, sharder, dtype, mode, loop)
        if formats is not None:  # a quantize="gguf" model: its weights' formats from the file
            _, on_disk = with_block_formats(disk_graphdef, on_disk, formats)
            graphdef, abstract = with_block_formats(graphdef, abstract, formats)
        state = restore_params(path, on_disk, param_shardings(on_disk, sharder))
        state = convert_layers(state, abstract, param_shardings(abstract, sharder))
        tokenizer = Tokenizer.from_hf_dir(path)
        src = str(source)
        return Model(config, mesh, sharder, graphdef, state, dtype, tokenizer, src, mode, loop)
    if path.is_dir() and (path / "config.json").is_file():
        config = read_hf_config(path, hf_family)
        _require_kind(config, kind, source)
        prefixes = family_for(config.architecture).hf_prefixes
        tensors, tokenizer = SafetensorsDirectory(path, prefixes), Tokenizer.from_hf_dir(path)
    elif path.is_file() and path.suffix == ".gguf":
        gguf = GGUFFile(path, gguf_family)
        config, tensors, tokenizer = gguf.config, gguf, Tokenizer.from_gguf(gguf)
        _require_kind(config, kind, source)
    else:
        raise _cannot_load(source)
    if quantize == "gguf" and not isinstance(tensors, GGUFFile):
        raise ValueError(f"quantize='gguf' keeps a GGUF file's blocks, and {source} is not a "
                         "GGUF file; use quantize='q8_0' or 'q4_0'")  # fmt: skip
    graphdef, abstract = abstract_model(config, sharder, dtype, quantize, loop)
    if quantize == "gguf":
        graphdef, abstract = file_block_formats(graphdef, abstract, tensors, config)
    # Block weights are read as stored (nothing to dequantize), so they skip the cache.
    cached = weight_cache and isinstance(tensors, GGUFFile) and quantize not in BLOCK_MODES
    cache = WeightCache(weight_cache) if cached else None
    state = cache.load(path, abstract, sharder) if cache else None
    if state is None:
        hf_tensor = family_for(config.architecture).hf_tensor
        state = load_params(abstract, sharder, tensors, config, dtype, hf_tensor)
        if cache:
            cache.store(path, abstract, state)
    log.info("loaded %s: %s, %s, quantize=%s, %s layers", source, config.architecture, dtype,
             quantize, loop)  # fmt: skip
    src = str(source)
    return Model(config, mesh, sharder, graphdef, state, dtype, tokenizer, src, quantize, loop)
