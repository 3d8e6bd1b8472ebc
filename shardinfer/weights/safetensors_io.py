"""A memory-mapped safetensors reader: tensors are read lazily, slice by slice.

The `safetensors` package's numpy loader cannot represent bfloat16, and we want each device to
read only its own slice; the format (8-byte header length, JSON header, raw bytes) is simple
enough to map directly.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise ValueError(f"{self.path}: not a safetensors file (shorter than its header)")
            (header_len,) = struct.unpack("<Q", raw_len)
            size = self.path.stat().st_size
            if header_len > size - 8:
                raise ValueError(f"{self.path}: header length {header_len} exceeds the file")
            try:
                header = json.loads(f.read(header_len))
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.path}: unreadable safetensors header ({e})") from e
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        self._entries = header
        for name, entry in header.items():
            _, end = entry["data_offsets"]
            if self._data_start + end > size:
                raise ValueError(f"{self.path}: tensor {name!r} runs past the end (truncated?)")
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        """A read-only view of the tensor; nothing is read until it is sliced or copied."""
        entry = self._entries[name]
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        raw = self._mmap[self._data_start + begin : self._data_start + end]
        return raw.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])
