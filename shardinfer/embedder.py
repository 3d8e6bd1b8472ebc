"""`Embedder`: text -> one vector per text, with an encoder sharded over the mesh (the embedding
front end, beside `LLM`; the batch runner and the HTTP server's /v1/embeddings call it).

A call sorts its rows by length, cuts them into batches of at most `max_batch` rows, pads each
batch to one of a few bucket shapes (rows: the `data` axis size times a power of four; tokens:
a multiple of max_seq_len / 16) and runs one jitted program per batch: the encoder, then the
pooling and normalization sentence-transformers' modules.json asks for, so only [rows, dim]
floats come back, replicated on every device. No cache, no scheduler: every process of a
multi-process run calls it with the same inputs (SPMD) and gets the whole result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import numpy as np
import tokenizers
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tokenizers import normalizers

from shardinfer.compile_cache import DEFAULT_CACHE_DIR, enable_compilation_cache
from shardinfer.mesh import MeshSpec
from shardinfer.model import Model, check_token_ids, load_encoder
from shardinfer.models.pooling import pool
from shardinfer.sharding import fetch_replicated, place
from shardinfer.weights.registry import resolve_registry_name
from shardinfer.weights.sentence_transformers import EmbeddingPipeline, read_pipeline
from shardinfer.xla_options import step_compiler_options

DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"
# The shortest token bucket: below it, a batch's cost is per-call overhead, not tokens.
MIN_TOKEN_BUCKET = 16

__all__ = ["DEFAULT_EMBEDDING_MODEL", "Embedder"]


class Embedder:
    """An encoder (e.g. sentence-transformers' all-MiniLM-L6-v2) sharded over `mesh`: rows over
    `data`, heads and the MLP over `model`. `embed(texts)` equals SentenceTransformer.encode
    (float32: to ~1e-7 cosine)."""

    def __init__(
        self,
        model: str | Path = DEFAULT_EMBEDDING_MODEL,
        *,
        mesh: Mesh | MeshSpec = None,
        dtype: Any = None,
        max_batch: int = 64,
        max_seq_len: int | None = None,
        compilation_cache: str | Path | None = DEFAULT_CACHE_DIR,
        **load_options: Any,
    ):
        """`model`: a registry name or a sentence-transformers / Hugging Face directory.
        `max_seq_len` (tokens, [CLS] and [SEP] included) defaults to the model's own limit
        (sentence_bert_config.json's max_seq_length, else its position table). `load_options`
        go to `load_encoder` (rules, layer_loop, weight_cache)."""
        if max_batch < 1:  # before anything loads
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        enable_compilation_cache(compilation_cache)
        self.name = str(model)
        path = resolve_registry_name(self.name) or Path(model)
        pipeline = read_pipeline(path) if path.is_dir() else None
        source = pipeline.model_dir if pipeline else model
        self.model: Model = load_encoder(source, mesh, dtype, **load_options)
        self.pipeline = pipeline or EmbeddingPipeline(Path(source))
        cfg = self.model.config
        self.max_seq_len = _max_seq_len(max_seq_len, self.pipeline, cfg.max_position_embeddings)
        self.dim = cfg.hidden_size * len(self.pipeline.pooling)
        data = self.model.data_size
        self.max_batch = -(-max_batch // data) * data  # rows split evenly over `data`
        self.row_buckets = _row_buckets(data, self.max_batch)
        self.token_buckets = _token_buckets(min(MIN_TOKEN_BUCKET, self.max_seq_len),
                                            self.max_seq_len)  # fmt: skip
        self._tokenizer = _tokenizer(self.pipeline, self.max_seq_len)
        self._fn = self._compile_fn()

    @property
    def mesh(self) -> Mesh:
        return self.model.mesh

    def _compile_fn(self):
        model = self.model
        options = step_compiler_options(model.platform, model.dtype, None)
        # Replicated: every process reads the whole result from its own devices.
        replicated = NamedSharding(model.mesh, PartitionSpec())
        pooling = (self.pipeline.pooling, self.pipeline.normalize)
        return jax.jit(partial(_embed, model.graphdef, pooling), out_shardings=replicated,
                       compiler_options=options)  # fmt: skip

    # ---- public API -------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, [CLS] ... [SEP], truncated to max_seq_len tokens."""
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise ValueError("texts must be a list of strings (wrap a single text in a list)")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"text {i} is a {type(text).__name__}, not a string")
        return [e.ids for e in self._tokenizer.encode_batch(list(texts))]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [len(texts), dim], in the order given."""
        return self.embed_tokens(self.tokenize(texts))

    def embed_tokens(self, token_lists: Sequence[Sequence[int]]) -> np.ndarray:
        """float32 [len(token_lists), dim], in the order given. Each list is used as it is (as
        `tokenize` makes them: with [CLS]/[SEP]), at most max_seq_len ids."""
        rows = self.check_tokens(token_lists)
        out = np.zeros((len(rows), self.dim), np.float32)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # longest first
        batches = [order[i : i + self.max_batch] for i in range(0, len(order), self.max_batch)]
        # Every batch is dispatched before the first result is read, so the host pads the next
        # batch while the devices run this one.
        pending = [(batch, self._run([rows[i] for i in batch])) for batch in batches]
        for batch, result in pending:
            out[batch] = fetch_replicated(result)[: len(batch)]
        return out

    def warmup(self) -> int:
        """Compiles (or loads from the persistent cache) the program of every bucket shape, so
        that no later call compiles; returns how many shapes."""
        for rows in self.row_buckets:
            for width in self.token_buckets:
                self._fn.lower(*self._inputs(np.zeros((rows, width), np.int32),
                                             np.ones(rows, np.int32))).compile()  # fmt: skip
        return len(self.row_buckets) * len(self.token_buckets)

    def check_tokens(self, token_lists: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Each row as int32 ids; ValueError names the first row that is not a non-empty list
        of ids in the vocabulary, at most max_seq_len long."""
        if isinstance(token_lists, str) or not isinstance(token_lists, Sequence):
            raise ValueError("token_lists must be a list of lists of token ids")
        rows = []
        for i, ids in enumerate(token_lists):
            if isinstance(ids, str) or not isinstance(ids, Sequence | np.ndarray):
                raise ValueError(f"row {i} is not a list of token ids")
            row = np.asarray(ids)
            if row.ndim != 1 or row.size == 0:
                raise ValueError(f"row {i} must be a non-empty list of token ids")
            if row.size > self.max_seq_len:
                raise ValueError(
                    f"row {i} has {row.size} tokens, over max_seq_len={self.max_seq_len}"
                )
            try:
                check_token_ids(row, self.model.config.vocab_size)
            except ValueError as e:
                raise ValueError(f"row {i}: {e}") from None
            rows.append(row.astype(np.int32))
        return rows

    # ---- internals --------------------------------------------------------------------------

    def _run(self, batch: list[np.ndarray]) -> jax.Array:
        """One padded batch on the devices (asynchronously): the replicated [rows, dim]."""
        rows = next(r for r in self.row_buckets if r >= len(batch))
        width = next(w for w in self.token_buckets if w >= max(len(r) for r in batch))
        tokens = np.full((rows, width), self.model.config.pad_token_id, np.int32)
        lengths = np.ones(rows, np.int32)  # padding rows: one token, so no row is empty
        for i, row in enumerate(batch):
            tokens[i, : len(row)] = row
            lengths[i] = len(row)
        return self._fn(*self._inputs(tokens, lengths))

    def _inputs(self, tokens: np.ndarray, lengths: np.ndarray) -> tuple:
        sharder = self.model.sharder
        return (self.model.state, place(sharder, tokens, ("batch", "seq")),
                place(sharder, lengths, ("batch",)))  # fmt: skip


def _embed(graphdef, pooling, state, tokens, lengths):
    modes, normalize = pooling
    hidden = nnx.merge(graphdef, state)(tokens, lengths)
    return pool(hidden, lengths, modes, normalize)


def _row_buckets(smallest: int, largest: int) -> tuple[int, ...]:
    """smallest, 4x, 16x, ... below largest, then largest: only a call's last batch is short,
    so few row shapes are needed, and each costs a compile per token width (~1 s on CPU)."""
    steps = max(0, math.ceil(math.log(largest / smallest, 4)))
    return tuple(sorted({min(smallest * 4**k, largest) for k in range(steps + 1)}))


def _token_buckets(smallest: int, largest: int) -> tuple[int, ...]:
    """Widths in steps of a sixteenth of the limit (at least `smallest`): a sorted batch's rows
    are within a few tokens of each other, so padding to the next step wastes at most 1/16 of
    the limit. Measured on the mixed corpus of benchmarks/embed.py (1 device): 10-15% faster
    than powers of two or 1.5x steps, for 16 widths to compile instead of 5."""
    step = max(smallest, -(-largest // 16))
    return tuple(sorted({*range(step, largest, step), largest}))


def _max_seq_len(asked: int | None, pipeline: EmbeddingPipeline, positions: int) -> int:
    if asked is None:
        return min(pipeline.max_seq_length or positions, positions)
    if not 2 <= asked <= positions:
        raise ValueError(
            f"max_seq_len must be in 2..{positions} (the model's positions), got {asked}"
        )
    return asked


def _tokenizer(pipeline: EmbeddingPipeline, max_seq_len: int) -> tokenizers.Tokenizer:
    """The model's tokenizer.json, truncating at max_seq_len and never padding (the file may
    carry other settings: all-MiniLM-L6-v2's pads and truncates to 128)."""
    path = pipeline.model_dir / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{pipeline.model_dir} has no tokenizer.json; the Embedder needs one")
    backend = tokenizers.Tokenizer.from_file(str(path))
    backend.no_padding()
    backend.enable_truncation(max_seq_len)
    if pipeline.do_lower_case:  # as sentence-transformers does: lowercase before the rest
        rest = [backend.normalizer] if backend.normalizer is not None else []
        backend.normalizer = normalizers.Sequence([normalizers.Lowercase(), *rest])
    return backend
