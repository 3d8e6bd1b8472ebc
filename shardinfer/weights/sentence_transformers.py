"""sentence-transformers model directories: which modules turn token states into an embedding.

`modules.json` lists the pipeline: a Transformer (the Hugging Face model, in the directory
itself or a subdirectory), a Pooling module (its `config.json` names the modes) and optionally
Normalize. The Transformer's `sentence_bert_config.json` gives the truncation length
(`max_seq_length`) and whether input is lowercased. A plain Hugging Face directory without
`modules.json` gets what sentence-transformers gives one: mean pooling, no normalization.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

# Pooling modes sentence-transformers names (models/pooling.py computes each).
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# Pooling config keys of sentence-transformers < 5, in its concatenation order.
_LEGACY_MODES = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


@dataclasses.dataclass(frozen=True)
class EmbeddingPipeline:
    model_dir: Path  # the Hugging Face model (config.json, safetensors, tokenizer.json)
    pooling: tuple[str, ...] = ("mean",)  # models/pooling.py POOLING_MODES
    normalize: bool = False
    max_seq_length: int | None = None  # None: the model's max_position_embeddings
    do_lower_case: bool = False


def read_pipeline(directory: Path) -> EmbeddingPipeline:
    """The embedding pipeline of a sentence-transformers (or plain Hugging Face) directory;
    a module we do not run (Dense, a second Transformer, ...) is an error naming it."""
    modules_path = directory / "modules.json"
    if not modules_path.is_file():
        return EmbeddingPipeline(directory, **_transformer_options(directory))
    modules = _json(modules_path)
    if not isinstance(modules, list):
        raise ValueError(f"{modules_path}: expected a list of modules")
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    if not kinds or kinds[0] != "Transformer":
        raise ValueError(f"{modules_path}: the first module must be a Transformer, got {kinds}")
    fields: dict[str, Any] = {"model_dir": directory / modules[0].get("path", "")}
    fields.update(_transformer_options(fields["model_dir"]))
    # Pooling, then Normalize, each at most once: what models/pooling.py runs, in that order.
    expected = ["Pooling", "Normalize"]
    for i, (module, kind) in enumerate(zip(modules[1:], kinds[1:], strict=True), 1):
        if kind not in expected:
            raise ValueError(
                f"{modules_path}: module {i} ({module.get('type')!r}) is not supported; "
                "supported: Transformer, then Pooling, then Normalize"
            )
        del expected[: expected.index(kind) + 1]
        if kind == "Pooling":
            fields["pooling"] = _pooling_modes(directory / module.get("path", ""))
        else:
            fields["normalize"] = True
    return EmbeddingPipeline(**fields)


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from e


def _transformer_options(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "sentence_bert_config.json"
    if not path.is_file():
        return {}
    raw = _json(path)
    length = raw.get("max_seq_length")
    if length is not None and (not isinstance(length, int) or length < 2):
        raise ValueError(f"{path}: max_seq_length must be an integer >= 2, got {length!r}")
    return {"max_seq_length": length, "do_lower_case": bool(raw.get("do_lower_case", False))}


def _pooling_modes(module_dir: Path) -> tuple[str, ...]:
    path = module_dir / "config.json"
    raw = _json(path) if path.is_file() else {}
    modes = raw.get("pooling_mode")
    if modes is None:  # the older boolean keys; none set means mean, as there
        modes = [mode for key, mode in _LEGACY_MODES.items() if raw.get(key)] or ["mean"]
    modes = (modes,) if isinstance(modes, str) else tuple(modes)
    unknown = [m for m in modes if m not in POOLING_MODES]
    if unknown or not modes:
        raise ValueError(
            f"{path}: pooling mode(s) {unknown or modes} not supported; supported: "
            f"{', '.join(POOLING_MODES)}"
        )
    # include_prompt=False only matters with prompts prepended to the input, which we never add.
    return modes
