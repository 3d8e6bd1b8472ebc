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
    """All *.safetensors files of a directory as one name -> lazy array source."""

    def __init__(self, directory: Path):
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{directory} has no *.safetensors files")
        self._where: dict[str, SafetensorsFile] = {}
        for path in files:
            f = SafetensorsFile(path)
            for name in f.names():
                self._where[name] = f

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> np.ndarray:
        return self._where[name].get(name)
