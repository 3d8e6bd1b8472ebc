"""Model families: which module, config and checkpoint name maps serve an architecture.

model.py looks a family up by `config.architecture` (and, while loading, by a config.json's
`model_type` or a GGUF file's `general.architecture`) and never names a family itself; the
weights/ readers get the family's pieces passed in. Adding a family is one module (its config
dataclass, its NNX module following models/interface.py, its checkpoint maps) and one
`register(Family(...))` entry at the bottom of this file. (Registry *names* of downloadable
checkpoints are another thing: weights/registry.py.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection
from typing import Any, Literal

import numpy as np

from shardinfer.config import ModelConfig
from shardinfer.models import bert_checkpoints, llama_checkpoints
from shardinfer.models.bert import Bert, BertConfig
from shardinfer.models.llama import Llama
from shardinfer.weights.loader import TensorRef

Source = Literal["config", "hf", "gguf"]


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    kind: Literal["decoder", "encoder"]  # models/interface.py: Decoder or Encoder
    # `config.architecture` values, which are also the HF model_type values it reads.
    architectures: tuple[str, ...]
    # (cfg, sharder, dtype, rngs | None, quantize, layer_loop) -> the NNX module
    build: Callable[..., Any]
    config_type: type  # frozen dataclass with to_dict() and from_dict() (checkpoints)
    # Hugging Face directories (both or neither; without them the family still builds random
    # weights and reads and writes shardinfer checkpoints):
    # config.json (and generation_config.json, or None) -> config
    config_from_hf: Callable[[dict[str, Any], dict[str, Any] | None], Any] | None = None
    # (nnx state path, config) -> the HF tensor behind that parameter, and how to lay it out
    hf_tensor: Callable[[tuple, Any], TensorRef] | None = None
    # What a checkpoint may put before every name hf_tensor gives, tried in order (BERT's
    # "bert." when saved from a task model; sentence-transformers saves none).
    hf_prefixes: tuple[str, ...] = ("",)
    # GGUF: general.architecture values read; empty when the family reads no GGUF files.
    gguf_architectures: tuple[str, ...] = ()
    # (GGUF metadata fields, the file's GGUF tensor names) -> config
    config_from_gguf: Callable[[dict[str, Any], Collection[str]], Any] | None = None
    # GGUF tensor name -> HF tensor name (None: a tensor the family does not use)
    gguf_to_hf: Callable[[str], str | None] | None = None
    # (HF name, dequantized GGUF tensor, config) -> the tensor as an HF checkpoint holds it
    gguf_tensor: Callable[[str, np.ndarray, Any], np.ndarray] = lambda name, w, cfg: w

    def __post_init__(self) -> None:
        if self.kind not in ("decoder", "encoder"):
            raise ValueError(f"family {self.name!r}: kind must be decoder or encoder")
        if (self.config_from_hf is None) != (self.hf_tensor is None):
            raise ValueError(f"family {self.name!r}: give both config_from_hf and hf_tensor, or "
                             "neither")  # fmt: skip
        if self.gguf_architectures and not (self.config_from_gguf and self.gguf_to_hf):
            raise ValueError(f"family {self.name!r} reads GGUF but lacks a config or name map")
        if self.gguf_architectures and self.hf_tensor is None:
            raise ValueError(f"family {self.name!r} reads GGUF, which needs hf_tensor")


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Adds a family; an architecture already served by another family is refused."""
    for other in _FAMILIES.values():
        for attr in ("architectures", "gguf_architectures"):
            taken = set(getattr(family, attr)) & set(getattr(other, attr))
            if taken and other.name != family.name:
                raise ValueError(f"{sorted(taken)} already belong to family {other.name!r}")
    _FAMILIES[family.name] = family
    return family


def unregister(name: str) -> None:
    """Removes a family (tests that register a toy one)."""
    del _FAMILIES[name]


def families() -> tuple[Family, ...]:
    return tuple(_FAMILIES.values())


def supported_architectures(source: Source = "config") -> tuple[str, ...]:
    attr = "gguf_architectures" if source == "gguf" else "architectures"
    return tuple(a for f in _FAMILIES.values() for a in getattr(f, attr))


_WHAT = {"config": "architecture", "hf": "model_type", "gguf": "GGUF architecture"}


def family_for(architecture: str | None, source: Source = "config") -> Family:
    """The family serving `architecture`: a config's architecture, a config.json's model_type
    ("hf") or a GGUF file's general.architecture ("gguf")."""
    attr = "gguf_architectures" if source == "gguf" else "architectures"
    for family in _FAMILIES.values():
        if architecture in getattr(family, attr):
            if source == "hf" and family.config_from_hf is None:
                raise ValueError(f"family {family.name!r} reads no Hugging Face directories "
                                 "(it has no config_from_hf and hf_tensor)")  # fmt: skip
            return family
    where = " in config.json" if source == "hf" else ""
    raise ValueError(
        f"unsupported {_WHAT[source]} {architecture!r}{where}; supported: "
        f"{', '.join(supported_architectures(source))}"
    )


def hf_family(model_type: str | None) -> Family:
    return family_for(model_type, "hf")


def gguf_family(architecture: str | None) -> Family:
    return family_for(architecture, "gguf")


# The families. Each entry names its module's pieces; nothing else in the package names them.
register(
    Family(
        name="llama",
        kind="decoder",
        architectures=llama_checkpoints.HF_ARCHITECTURES,
        build=Llama,
        config_type=ModelConfig,
        config_from_hf=llama_checkpoints.config_from_hf,
        hf_tensor=llama_checkpoints.hf_tensor,
        gguf_architectures=llama_checkpoints.GGUF_ARCHITECTURES,
        config_from_gguf=llama_checkpoints.config_from_gguf,
        gguf_to_hf=llama_checkpoints.gguf_to_hf,
        gguf_tensor=llama_checkpoints.gguf_tensor,
    )
)
register(
    Family(
        name="bert",
        kind="encoder",
        architectures=bert_checkpoints.HF_ARCHITECTURES,
        build=Bert,
        config_type=BertConfig,
        config_from_hf=bert_checkpoints.config_from_hf,
        hf_tensor=bert_checkpoints.hf_tensor,
        hf_prefixes=bert_checkpoints.HF_PREFIXES,
    )
)
