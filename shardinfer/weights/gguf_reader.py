"""A small GGUF parser: metadata and tensor locations, tensors memory-mapped.

The `gguf` package's reader builds a numpy view for every part of every metadata field
(about a million for a 49k-token vocabulary, ~8 s); parsing the header with `struct` takes a
fraction of a second. Dequantization is in gguf_quants.py.
"""

from __future__ import annotations

import codecs
import math
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

_SCALARS = {  # GGUF value type -> struct format
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
    12: "<d",
}  # fmt: skip
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")


class TensorInfo(NamedTuple):
    name: str
    shape: tuple[int, ...]  # numpy order (GGUF stores the fastest-varying dimension first)
    type_id: int
    offset: int  # from the start of the data section


class GGUFContents(NamedTuple):
    fields: dict[str, Any]
    tensors: dict[str, TensorInfo]
    data_start: int


class _Cursor:
    def __init__(self, buffer: memoryview):
        self.buf, self.pos = buffer, 0

    def scalar(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        value = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return value

    def strings(self, count: int) -> list[str]:
        """`count` strings in a row (a vocabulary, merges): the tight loop of a warm start."""
        buf, pos, length, decode = self.buf, self.pos, _U64.unpack_from, codecs.utf_8_decode
        out = []
        for _ in range(count):
            (n,) = length(buf, pos)
            out.append(decode(buf[pos + 8 : pos + 8 + n], "replace", True)[0])
            pos += 8 + n
        self.pos = pos
        return out

    def value(self, type_id: int):
        if type_id == _STRING:
            return self.string()
        if type_id == _ARRAY:
            item_type, count = self.scalar("<I"), self.scalar("<Q")
            if item_type in _SCALARS and item_type != 7:
                dtype = np.dtype(_SCALARS[item_type].replace("?", "b"))
                out = np.frombuffer(self.buf, dtype, count, self.pos).tolist()
                self.pos += dtype.itemsize * count
                return out
            if item_type == _STRING:
                return self.strings(count)
            return [self.value(item_type) for _ in range(count)]
        if type_id not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {type_id}")
        return self.scalar(_SCALARS[type_id])


def read_gguf(path: Path, mmap: np.memmap) -> GGUFContents:
    cur = _Cursor(memoryview(mmap))
    try:
        if bytes(cur.buf[:4]) != b"GGUF":
            raise ValueError("bad magic number")
        cur.pos = 4
        version = cur.scalar("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (2 and 3 are supported)")
        n_tensors, n_fields = cur.scalar("<Q"), cur.scalar("<Q")
        fields = {}
        for _ in range(n_fields):
            key = cur.string()
            fields[key] = cur.value(cur.scalar("<I"))
        tensors = {}
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
            type_id, offset = cur.scalar("<I"), cur.scalar("<Q")
            tensors[name] = TensorInfo(name, tuple(reversed(dims)), type_id, offset)
    except (struct.error, UnicodeDecodeError, ValueError, IndexError) as e:
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from e
    alignment = int(fields.get("general.alignment", 32))
    return GGUFContents(fields, tensors, -(-cur.pos // alignment) * alignment)


def tensor_bytes(mmap: np.memmap, contents: GGUFContents, info: TensorInfo, path: Path):
    """The raw tensor as the `gguf` package's dequantize expects it: rows of bytes."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    qtype = GGMLQuantizationType(info.type_id)
    block, type_size = GGML_QUANT_SIZES[qtype]
    *rows, row_len = info.shape
    row_bytes = row_len // block * type_size
    start = contents.data_start + info.offset
    size = math.prod(rows) * row_bytes
    if start + size > mmap.size:
        raise ValueError(f"{path}: tensor {info.name!r} runs past the end (truncated?)")
    return qtype, mmap[start : start + size].reshape(*rows, row_bytes)
