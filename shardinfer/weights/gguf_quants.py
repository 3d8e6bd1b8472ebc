"""Whole-tensor numpy dequantization of the GGUF block formats we load.

The `gguf` package dequantizes in groups of rows through Python loops, ~2 s for SmolLM2-135M,
most of a warm start; these are single vectorized passes over the whole tensor (~10x faster).
Layouts follow ggml's block structs (tests compare against the `gguf` package):
  Q8_0: f16 d, int8 q[32]            x = d * q
  Q4_0: f16 d, u8 q[16]              x = d * (nibble - 8)
  Q4_1: f16 d, f16 m, u8 q[16]       x = d * nibble + m
where byte i of q holds element i in its low nibble and element i + 16 in its high nibble.
"""

from __future__ import annotations

import numpy as np

BLOCK = 32


def _blocks(raw: np.ndarray, block_bytes: int) -> np.ndarray:
    return np.ascontiguousarray(raw).reshape(-1, block_bytes)


def _scale(blocks: np.ndarray, at: int) -> np.ndarray:
    return blocks[:, at : at + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(q: np.ndarray) -> np.ndarray:
    out = np.empty((q.shape[0], BLOCK), np.float32)
    np.bitwise_and(q, 0x0F, out=out[:, : BLOCK // 2], casting="unsafe")
    np.right_shift(q, 4, out=out[:, BLOCK // 2 :], casting="unsafe")
    return out


def _q8_0(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 2 + BLOCK)
    out = np.empty((b.shape[0], BLOCK), np.float32)  # one pass: int8 * scale straight into it
    return np.multiply(b[:, 2:].view(np.int8), _scale(b, 0), out=out)


def _q4_0(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 2 + BLOCK // 2)
    x = _nibbles(b[:, 2:])
    x -= 8.0
    return np.multiply(x, _scale(b, 0), out=x)


def _q4_1(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 4 + BLOCK // 2)
    x = _nibbles(b[:, 4:])
    np.multiply(x, _scale(b, 0), out=x)
    return np.add(x, _scale(b, 2), out=x)


def _f32(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float32)


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _bf16(raw: np.ndarray) -> np.ndarray:
    return (np.ascontiguousarray(raw).view(np.uint16).astype(np.uint32) << 16).view(np.float32)


DEQUANTIZE = {"F32": _f32, "F16": _f16, "BF16": _bf16, "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1}


def dequantize(raw: np.ndarray, qtype_name: str) -> np.ndarray:
    """float32 values of `raw` (rows of bytes, as stored) shaped [*rows, row_len]."""
    rows = raw.shape[:-1]
    return DEQUANTIZE[qtype_name](raw).reshape(*rows, -1)


# Where each part of a block lies: (qs start, bytes of qs, scale offsets d and m).
_BLOCK_PARTS = {"Q8_0": (2, BLOCK, 0, None), "Q4_0": (2, BLOCK // 2, 0, None),
                "Q4_1": (4, BLOCK // 2, 0, 2)}  # fmt: skip


def split_blocks(raw: np.ndarray, qtype_name: str):
    """A block tensor's rows of bytes [rows, row_bytes] as the arrays models/blocks.py keeps:
    (qs [rows, blocks, bytes], d [rows, blocks] float16, m or None); None for a type that is
    not one of those block formats."""
    if qtype_name not in _BLOCK_PARTS:
        return None
    start, size, d_at, m_at = _BLOCK_PARTS[qtype_name]
    rows = raw.shape[0]
    b = np.ascontiguousarray(raw).reshape(rows, -1, start + size)
    qs = b[..., start:].copy()
    if qtype_name == "Q8_0":
        qs = qs.view(np.int8)

    def half(at):
        return b[..., at : at + 2].copy().view(np.float16)[..., 0]

    return qs, half(d_at), None if m_at is None else half(m_at)
