"""One input line of a batch job -> a row to run, or the reason it cannot run.

Two styles of line. Simple: `{"id": ..., "prompt": ...}` or `{"id": ..., "messages": [...]}`
(or `"input"` for embeddings), with optional sampling fields under their OpenAI names.
OpenAI Batch API: `{"custom_id": ..., "method": "POST", "url": "/v1/chat/completions",
"body": {...}}`, as vLLM's run_batch reads them. Sampling fields are checked by the same
pydantic models as the HTTP server's, so a line is refused for what a request would be.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Literal

from pydantic import ValidationError

from shardinfer.serving.openai_schema import ChatBody, CompletionBody

Task = Literal["completion", "chat", "embed"]
URLS: dict[str, Task] = {
    "/v1/completions": "completion",
    "/v1/chat/completions": "chat",
    "/v1/embeddings": "embed",
}


class BadLine(ValueError):
    """A line that cannot run; its message is the reason written to the errors file."""

    def __init__(self, reason: str, row_id: Any = None):
        super().__init__(reason)
        self.row_id = row_id


@dataclasses.dataclass
class Row:
    line: int  # 1-based, in the input file
    id: Any  # the line's "id" (simple) or "custom_id" (OpenAI), as it was given
    openai: bool  # OpenAI Batch API style: the output follows its shape
    task: Task
    body: Any  # CompletionBody | ChatBody | EmbeddingBody

    @property
    def key(self) -> str:
        return id_key(self.id)


def id_key(row_id: Any) -> str:
    """The id as one string (1 and "1" stay apart): what resuming and duplicates compare."""
    return json.dumps(row_id, sort_keys=True)


def stable_hash(text: str) -> int:
    """A 64-bit hash that is the same in every process and run (Python's hash() is salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def row_seed(key: str, job_seed: int) -> int:
    """A sampled row's seed when it brings none: from its id, not its position, so a resumed
    or re-sharded job draws the same tokens for it."""
    return stable_hash(f"{job_seed}:{key}") & 0x7FFFFFFF


def parse_line(text: str, line: int, model: str, task: Task | None) -> Row:
    """`task` is the job's (`--task`); None lets each line's fields say (prompt or messages)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadLine(f"not JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(data, dict):
        raise BadLine(f"a line must be a JSON object, got {type(data).__name__}")
    if "custom_id" in data:
        return _openai_line(data, line, model, task)
    return _simple_line(data, line, model, task)


def _check_id(row_id: Any, name: str) -> None:
    if not isinstance(row_id, str | int) or isinstance(row_id, bool) or row_id == "":
        raise BadLine(f"{name} must be a non-empty string or an integer, got {row_id!r}")


def _openai_line(data: dict, line: int, model: str, task: Task | None) -> Row:
    row_id = data["custom_id"]
    _check_id(row_id, "custom_id")
    if data.get("method", "POST") != "POST":
        raise BadLine(f"method must be POST, got {data.get('method')!r}", row_id)
    url = data.get("url")
    if url not in URLS:
        raise BadLine(f"url must be one of {sorted(URLS)}, got {url!r}", row_id)
    if task is not None and (URLS[url] == "embed") != (task == "embed"):
        raise BadLine(f"url {url} does not fit this job (--task {task})", row_id)
    body = data.get("body")
    if not isinstance(body, dict):
        raise BadLine("body must be a JSON object", row_id)
    return Row(line, row_id, True, URLS[url], _validate(URLS[url], body, model, row_id))


def _simple_line(data: dict, line: int, model: str, task: Task | None) -> Row:
    if "id" not in data:
        raise BadLine('no "id" (or "custom_id" for OpenAI Batch API lines)')
    row_id = data["id"]
    _check_id(row_id, "id")
    fields = {k: v for k, v in data.items() if k != "id"}
    if task == "embed":
        if "input" not in fields and "prompt" not in fields:
            raise BadLine('no "input" (or "prompt") to embed', row_id)
        fields.setdefault("input", fields.pop("prompt", None))
        kind: Task = "embed"
    elif "messages" in fields:
        kind = "chat"
    elif "prompt" in fields:
        kind = "completion"
    else:
        raise BadLine('no "prompt" or "messages"', row_id)
    return Row(line, row_id, False, kind, _validate(kind, fields, model, row_id))


def _validate(kind: Task, fields: dict, model: str, row_id: Any):
    """The body checked as the HTTP server checks a request. The job runs one model, so a
    line's own "model" is not compared with it (files made for another name still run)."""
    if kind == "embed":
        from shardinfer.serving.openai_schema import EmbeddingBody as schema
    else:
        schema = CompletionBody if kind == "completion" else ChatBody
    try:
        body = schema.model_validate({**fields, "model": model})
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "line"
        raise BadLine(f"{where}: {first['msg']}", row_id) from None
    if getattr(body, "stream", False):
        raise BadLine("stream is not available in a batch job", row_id)
    return body
