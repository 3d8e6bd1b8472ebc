"""GGUF files (llama.cpp's format): config, dequantized tensors and tokenizer metadata.

Tensors are exposed under Hugging Face names (the model family's GGUF name map renames them), so
one parameter name map per family serves both formats. Each is dequantized on the host only
when asked for, one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from shardinfer.weights.gguf_quants import dequantize, split_blocks
from shardinfer.weights.gguf_reader import read_gguf, tensor_bytes

_SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0"}


class GGUFFile:
    """A GGUF file's tensors under Hugging Face names, read by the model family that
    `families(general.architecture)` returns (models/registry.py `gguf_family`): its
    `config_from_gguf`, `gguf_to_hf` name map and `gguf_tensor` fix-up."""

    def __init__(self, path: str | Path, families: Callable[[str | None], Any]):
        self.path = Path(path)
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        self._contents = read_gguf(self.path, self._mmap)
        self.fields: dict[str, Any] = self._contents.fields
        self.arch = self.fields.get("general.architecture")
        try:
            self.family = families(self.arch)
            self.config = self.family.config_from_gguf(self.fields, self._contents.tensors.keys())
        except ValueError as e:
            raise ValueError(f"{self.path}: {e}") from e
        self._tensors = {}
        for t in self._contents.tensors.values():
            name = self.family.gguf_to_hf(t.name)
            if name is not None:
                self._tensors[name] = t

    def array_field(self, key: str) -> list | None:
        return self.fields.get(key)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def block_format(self, name: str) -> str | None:
        """ "q8_0", "q4_0" or "q4_1" for a tensor stored in that block format, else None."""
        from gguf import GGMLQuantizationType

        kind = GGMLQuantizationType(self._tensors[name].type_id).name
        return kind.lower() if kind in ("Q8_0", "Q4_0", "Q4_1") else None

    def blocks(self, name: str):
        """A block tensor's (qs, d, m) in HF row order (models/blocks.py layout, rows first),
        read as stored, without dequantizing; None for a tensor in another type. The family's
        `gguf_tensor` fix-up is applied to each part: it may only reorder rows."""
        t = self._tensors[name]
        qtype, raw = tensor_bytes(self._mmap, self._contents, t, self.path)
        parts = split_blocks(raw.reshape(-1, raw.shape[-1]), qtype.name)
        if parts is None:
            return None
        return tuple(None if a is None else self.family.gguf_tensor(name, a, self.config)
                     for a in parts)  # fmt: skip

    def get(self, name: str) -> np.ndarray:
        t = self._tensors[name]
        qtype, raw = tensor_bytes(self._mmap, self._contents, t, self.path)
        if qtype.name not in _SUPPORTED_TYPES:
            raise ValueError(
                f"{self.path}: tensor {t.name!r} is {qtype.name}; supported: "
                f"{', '.join(sorted(_SUPPORTED_TYPES))}"
            )
        return self.family.gguf_tensor(name, dequantize(raw, qtype.name), self.config)
