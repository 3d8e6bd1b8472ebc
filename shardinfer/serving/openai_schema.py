"""The OpenAI API's shapes: request bodies (pydantic), error bodies, response and SSE chunks.

Shared by everything that speaks the API (`serve`, and the router that forwards to servers).
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any, Literal

import numpy as np
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr


class SamplingBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: Literal[1] = 1
    ignore_eos: bool = False  # vLLM's extension: keep going past the end-of-text token


class CompletionBody(SamplingBody):
    prompt: str | list[int]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class EmbeddingBody(BaseModel):
    """/v1/embeddings: `input` one text, texts, one token-id list or token-id lists (used as
    given: include [CLS]/[SEP] as the tokenizer would). `dimensions` can only be the model's
    own width; `user` is accepted and ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str
    # Strict: a token id is never a string, nor a string a number.
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


CHAT, COMPLETION = "chat.completion", "text_completion"


def error_response(
    status: int, message: str, kind: str = "invalid_request_error", headers=None
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


class Refused(Exception):
    """A request answered with an OpenAI error body instead of a completion."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 headers: dict | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.kind, self.headers)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def chunk(rid, model, kind, created, piece, finish_reason) -> dict[str, Any]:
    """One streamed chunk: a chat delta (`piece` a dict) or completion text."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason}
    if kind == CHAT:
        choice["delta"] = piece
    else:
        choice["text"] = piece
    object_name = "chat.completion.chunk" if kind == CHAT else COMPLETION
    return {"id": rid, "object": object_name, "created": created, "model": model,
            "choices": [choice]}  # fmt: skip


def usage_chunk(rid, model, kind, created, prompt_tokens: int, completion_tokens: int) -> dict:
    """The last chunk of a stream: no choices, the token counts."""
    object_name = "chat.completion.chunk" if kind == CHAT else COMPLETION
    return {"id": rid, "object": object_name, "created": created, "model": model,
            "choices": [], "usage": usage(prompt_tokens, completion_tokens)}  # fmt: skip


def final_body(rid, model, kind, text, finish_reason, prompt_tokens, completion_tokens) -> dict:
    """A whole (not streamed) completion."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason}
    if kind == CHAT:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {
        "id": rid,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def embedding_list(model: str, vectors: np.ndarray, encoding_format: str, tokens: int) -> dict:
    """The /v1/embeddings response: one entry per input, in order; base64 is the float32
    vector's little-endian bytes (what the openai client decodes)."""
    if encoding_format == "base64":
        values: list[Any] = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
    else:
        values = vectors.astype(np.float32).tolist()
    data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(values)]
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}  # fmt: skip
