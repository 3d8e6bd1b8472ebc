"""Hugging Face model directories: config.json (read by the model family) and safetensors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from shardinfer.weights.safetensors_io import SafetensorsFile


def read_hf_config(directory: Path, families: Callable[[str | None], Any]) -> Any:
    """config.json (and generation_config.json) read by the config reader of the family that
    `families(model_type)` returns (models/registry.py `hf_family`)."""
    path = directory / "config.json"
    if not path.is_file():
        raise ValueError(f"{directory} has no config.json; is it a Hugging Face model directory?")
    generation_path = directory / "generation_config.json"
    generation = json.loads(generation_path.read_text()) if generation_path.is_file() else None
    raw = json.loads(path.read_text())
    return families(raw.get("model_type")).config_from_hf(raw, generation)


class SafetensorsDirectory:
    """All *.safetensors files of a directory as one name -> lazy array source.

    A name is looked up under each of `prefixes` in turn (a family's `hf_prefixes`: the same
    weights saved from a base model and from a task model differ by such a prefix)."""

    def __init__(self, directory: Path, prefixes: tuple[str, ...] = ("",)):
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            other = [p.name for p in directory.glob("*.bin")] + [
                p.name for p in directory.glob("*.pt*")
            ]
            hint = f" (only {', '.join(sorted(other))}: convert it to safetensors)" if other else ""
            raise ValueError(f"{directory} has no *.safetensors files{hint}")
        self.prefixes = prefixes
        self._where: dict[str, SafetensorsFile] = {}
        for path in files:
            f = SafetensorsFile(path)
            for name in f.names():
                self._where[name] = f

    def _stored_name(self, name: str) -> str | None:
        return next((p + name for p in self.prefixes if p + name in self._where), None)

    def __contains__(self, name: str) -> bool:
        return self._stored_name(name) is not None

    def get(self, name: str) -> np.ndarray:
        stored = self._stored_name(name)
        if stored is None:
            raise KeyError(name)
        return self._where[stored].get(stored)
