"""POST /v1/embeddings: a validated body -> checked token rows -> the AsyncEmbedder -> OpenAI's
response shape. `embedding_rows` is the one place an embedding request's input is checked."""

from __future__ import annotations

from collections.abc import Callable

from shardinfer.embedder import Embedder
from shardinfer.serving.async_embedder import AsyncEmbedder
from shardinfer.serving.async_engine import EngineDown, QueueFull
from shardinfer.serving.openai_schema import EmbeddingBody, Refused, embedding_list

# OpenAI's own limit on inputs per request.
MAX_INPUTS = 2048


def embedding_rows(body: EmbeddingBody, embedder: Embedder) -> list[list[int]]:
    """The body's inputs as token ids: texts tokenized and truncated as sentence-transformers
    does, token lists as given (checked against the vocabulary and max_seq_len). ValueError
    names what is wrong, and which input."""
    if body.dimensions is not None and body.dimensions != embedder.dim:
        raise ValueError(
            f"dimensions={body.dimensions} is not available: this model's embeddings have "
            f"{embedder.dim} dimensions (it cannot shorten them)"
        )
    inputs = body.input
    one = isinstance(inputs, str) or (bool(inputs) and isinstance(inputs[0], int))
    items = [inputs] if one else list(inputs)
    if not items:
        raise ValueError("input is empty: give a text, a list of texts or of token ids")
    if len(items) > MAX_INPUTS:
        raise ValueError(f"input has {len(items)} items; at most {MAX_INPUTS} per request")
    texts = {i: item for i, item in enumerate(items) if isinstance(item, str)}
    for i, text in texts.items():
        if not text.strip():
            raise ValueError(f"{_which(i, one)} is {'empty' if not text else 'only whitespace'}")
    tokenized = dict(zip(texts, embedder.tokenize(list(texts.values())), strict=True))
    rows = []
    for i, item in enumerate(items):
        if i in tokenized:
            rows.append(tokenized[i])
            continue
        try:
            embedder.check_tokens([item])
        except ValueError as e:
            raise ValueError(f"{_which(i, one)}: {str(e).removeprefix('row 0: ')}") from None
        rows.append(list(item))
    return rows


def _which(i: int, one: bool) -> str:
    return "input" if one else f"input[{i}]"


class Embeddings:
    """The handler: checks, queues, answers (errors as OpenAI error bodies)."""

    def __init__(self, engine: AsyncEmbedder, model_name: str, count: Callable[[str], None]):
        self.engine, self.model_name, self.count = engine, model_name, count

    async def respond(self, body: EmbeddingBody):
        try:
            if body.model != self.model_name:
                raise Refused(404, f"model {body.model!r} does not exist; this server has "
                                   f"{self.model_name!r}", "not_found_error")  # fmt: skip
            try:
                rows = embedding_rows(body, self.engine.embedder)
            except ValueError as e:
                raise Refused(400, str(e)) from e
            try:
                vectors = await self.engine.embed(rows)
            except QueueFull as e:
                raise Refused(429, str(e), "rate_limit_error", {"Retry-After": "1"}) from e
            except EngineDown as e:
                raise Refused(503, str(e), "service_unavailable") from e
            except RuntimeError as e:  # the devices failed this batch
                raise Refused(500, str(e), "server_error") from e
        except Refused as e:
            self.count("rejected" if e.status in (429, 503) else
                       "error" if e.status == 500 else "invalid")  # fmt: skip
            return e.response()
        self.count("embedded")
        tokens = sum(len(row) for row in rows)
        return embedding_list(body.model, vectors, body.encoding_format, tokens)
