"""A disk cache of a GGUF file's dequantized weights, memory-mapped by the next process.

Dequantizing and laying out SmolLM2's weights took ~0.7 s of a warm start, and on the dev VM
the fresh memory they land in cost up to ~2 s more (a fresh process faults in every new page;
the host backs guest memory lazily). A memory-mapped file in the page cache is mapped in
~0.05 s, and XLA:CPU uses its 64-byte-aligned arrays in place.

One `<key>.bin` holds every parameter, in our layout and dtype, at aligned offsets;
`<key>.json` lists them and is written last (by rename), so a file without its list, or whose
size or list does not match what is being loaded, is never used. The key covers the source
file (path, size, modification time), the format, and every parameter's path, shape and
dtype (so dtype, quantization and the layer loop each get their own entry).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shardinfer.sharding import Sharder
from shardinfer.weights.loader import param_shardings

log = logging.getLogger("shardinfer")

DEFAULT_WEIGHT_CACHE_DIR = Path.home() / ".cache" / "shardinfer" / "weights"
FORMAT = 1
ALIGN = 64  # XLA:CPU takes a host array without a copy from a 64-byte boundary
MAX_BYTES = 4 * 2**30  # larger models are not cached: the disk cost would surprise
MAX_TOTAL_BYTES = 16 * 2**30  # beyond this, the least recently used entries are removed


def _leaves(abstract_state: nnx.State) -> list[tuple[str, tuple[int, ...], str]]:
    out = []
    for path, var in nnx.to_flat_state(abstract_state):
        value = var.get_value()
        out.append((".".join(map(str, path)), tuple(value.shape), np.dtype(value.dtype).name))
    return out


class WeightCache:
    def __init__(self, directory: str | Path = DEFAULT_WEIGHT_CACHE_DIR):
        self.directory = Path(directory).expanduser()

    def _files(self, source: Path, leaves: list) -> tuple[Path, Path, dict]:
        """The entry's data and index files, and the source file's identity."""
        stat = source.stat()
        origin = {"source": str(source.resolve()), "size": stat.st_size,
                  "mtime_ns": stat.st_mtime_ns}  # fmt: skip
        key = hashlib.sha256(json.dumps([FORMAT, origin, leaves]).encode()).hexdigest()[:32]
        return self.directory / f"{key}.bin", self.directory / f"{key}.json", origin

    def load(self, source: Path, abstract_state: nnx.State, sharder: Sharder) -> nnx.State | None:
        """The cached parameters placed on their shards, or None (not cached, or unusable)."""
        leaves = _leaves(abstract_state)
        data, index, origin = self._files(source, leaves)
        try:
            listing = json.loads(index.read_text())
            entries = listing["parameters"]
            if {k: listing.get(k) for k in origin} != origin or not _matches(entries, leaves):
                raise ValueError("its parameter list differs")
            if data.stat().st_size != entries[-1][3] + _nbytes(entries[-1]):
                raise ValueError("its size is wrong (truncated?)")
            mapped = np.memmap(data, np.uint8, mode="c")  # private: writes never reach the file
        except FileNotFoundError:
            return None
        except (OSError, ValueError, IndexError, KeyError, TypeError) as e:
            log.warning("ignoring weight cache %s: %s", data, e)
            return None
        arrays = {}
        shardings = nnx.to_flat_state(param_shardings(abstract_state, sharder))
        for (name, shape, dtype, offset), (path, sharding) in zip(entries, shardings, strict=True):
            host = mapped[offset : offset + _nbytes((name, shape, dtype))]
            host = host.view(jnp.dtype(dtype)).reshape(shape)
            arrays[path] = jax.make_array_from_callback(
                tuple(shape), sharding, lambda i, h=host: h[i]
            )
        with contextlib.suppress(OSError):  # a read-only cache still maps
            os.utime(index)  # its modification time is its last use (see _trim)
        log.info("weights of %s mapped from %s", source, data)
        return nnx.map_state(lambda path, var: var.replace(arrays[path]), abstract_state)

    def store(self, source: Path, abstract_state: nnx.State, state: nnx.State) -> None:
        """Writes the loaded parameters; a failure (disk full, read-only) only logs."""
        leaves = _leaves(abstract_state)
        total = sum(_nbytes(leaf) for leaf in leaves)
        if total > MAX_BYTES or jax.process_count() > 1:
            return
        data, index, origin = self._files(source, leaves)
        entries, offset = [], 0
        temp = data.with_name(f"{data.name}.tmp{os.getpid()}")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with open(temp, "wb") as f:
                for leaf, (_, var) in zip(leaves, nnx.to_flat_state(state), strict=True):
                    offset = -(-offset // ALIGN) * ALIGN
                    f.seek(offset)
                    host = np.ascontiguousarray(np.asarray(var.get_value()))
                    f.write(host.reshape(-1).view(np.uint8))  # bytes, whatever the dtype
                    entries.append([*leaf, offset])
                    offset += _nbytes(leaf)
            os.replace(temp, data)
            temp = index.with_name(f"{index.name}.tmp{os.getpid()}")
            temp.write_text(json.dumps({**origin, "parameters": entries}))
            os.replace(temp, index)
        except OSError as e:
            log.warning("could not write the weight cache %s: %s", data, e)
            with contextlib.suppress(OSError):  # e.g. the directory is a file: no temp to remove
                temp.unlink(missing_ok=True)
            return
        self._drop_stale(origin)
        self._trim(keep=index)

    def _drop_stale(self, origin: dict) -> None:
        """Removes the entries of earlier versions of the same source file (another size or
        modification time): a replaced GGUF file would otherwise leave its weights behind."""
        for index in self.directory.glob("*.json"):
            try:
                listing = json.loads(index.read_text())
                same_file = listing["source"] == origin["source"]
                version = (listing["size"], listing["mtime_ns"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            stale = same_file and version != (origin["size"], origin["mtime_ns"])
            if stale:
                index.unlink(missing_ok=True)
                index.with_suffix(".bin").unlink(missing_ok=True)

    def _trim(self, keep: Path) -> None:
        """Removes the least recently used entries (by their index's modification time) while
        the directory holds more than MAX_TOTAL_BYTES; never `keep`, the entry just written."""
        entries = []
        for index in self.directory.glob("*.json"):
            try:
                entries.append(
                    (index.stat().st_mtime, index, index.with_suffix(".bin").stat().st_size)
                )
            except OSError:
                continue
        total = sum(size for _, _, size in entries)
        for _, index, size in sorted(entries, key=lambda e: e[0]):
            if total <= MAX_TOTAL_BYTES:
                break
            if index == keep:
                continue
            index.unlink(missing_ok=True)
            index.with_suffix(".bin").unlink(missing_ok=True)
            total -= size


def _nbytes(leaf) -> int:
    _, shape, dtype = leaf[:3]
    return int(np.prod(shape, dtype=np.int64)) * jnp.dtype(dtype).itemsize


def _matches(entries: list, leaves: list) -> bool:
    return len(entries) == len(leaves) and all(
        e[0] == name and tuple(e[1]) == shape and e[2] == dtype
        for e, (name, shape, dtype) in zip(entries, leaves, strict=True)
    )
