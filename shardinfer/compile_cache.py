"""JAX's persistent compilation cache, on by default so that a second process starts warm."""

from __future__ import annotations

from pathlib import Path

import jax

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "shardinfer" / "jax"


def enable_compilation_cache(directory: str | Path | None = DEFAULT_CACHE_DIR) -> Path | None:
    """Stores compiled executables under `directory` (None turns the cache off).

    Only compilations that took over 0.1 s are stored: tiny helpers are cheaper to compile
    again than to look up, but the 0.15-0.3 s ones (cache setup, sampling) add up at start.
    """
    if directory is None:
        jax.config.update("jax_compilation_cache_dir", None)
        return None
    path = Path(directory).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
