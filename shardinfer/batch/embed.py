"""`run_batch(task="embed")`: a JSON-lines file through an Embedder, resumable, one line per id.

The same files and guarantees as generation (runner.py): the input streamed, ids already in
the output skipped, a torn last line redone, bad lines to the errors file. Rows are tokenized a
window at a time, sorted by length and embedded `max_batch` at a time (one padded program per
batch); each batch's lines are written as soon as it returns. Vectors go into the output lines,
or (`vectors="npy"`) into one `.npy` file per batch in `<output>.vectors/`, written and renamed
into place before the lines that point at it, so a line never names a file that is not whole.

Under several processes every process must run each batch (the encoder is SPMD): process 0
reads the input and sends each batch's token ids to the others in one fixed-size buffer
(one compiled broadcast for the whole job); a buffer with no rows ends the job.
"""

from __future__ import annotations

import base64
import itertools
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from shardinfer.batch.journal import LineWriter
from shardinfer.batch.progress import Progress
from shardinfer.batch.rows import BadLine, Row, stable_hash
from shardinfer.batch.runner import (
    BatchSummary,
    _count_lines,
    _Lines,
    default_errors_path,
    error_record,
    open_job,
)
from shardinfer.embedder import Embedder
from shardinfer.engine.broadcast import broadcast_value, is_master, multi_process

VECTORS = ("lines", "npy")


def run_embed_batch(
    input: str | Path,
    output: str | Path,
    model: str | Path | Embedder,
    *,
    errors: str | Path | None = None,
    mesh: Any = None,
    max_batch: int = 64,
    max_seq_len: int | None = None,
    shard: tuple[int, int] = (0, 1),
    window: int | None = None,
    progress: bool | None = None,
    vectors: str = "lines",
    **load_options: Any,
) -> BatchSummary:
    """See `run_batch`; `model` is an encoder's registry name or directory, or an Embedder."""
    if vectors not in VECTORS:
        raise ValueError(f"vectors must be one of {VECTORS}, got {vectors!r}")
    options = {k: v for k, v in load_options.items() if v is not None}
    embedder = model if isinstance(model, Embedder) else Embedder(
        model, mesh=mesh, max_batch=max_batch, max_seq_len=max_seq_len, **options
    )  # fmt: skip
    wire = _Wire(embedder) if multi_process() else None
    if wire and not is_master():
        wire.follow()
        return BatchSummary()
    input, output = Path(input), Path(output)
    errors = Path(errors) if errors else default_errors_path(output)
    try:
        return _lead(embedder, wire, input, output, errors, shard, window, progress, vectors)
    finally:
        if wire:
            wire.send([])  # the others return, whatever happened here


class _Wire:
    """A batch of token rows from process 0 to every process, in one fixed-size int32 buffer:
    row 0 holds the batch's row count, each next row a length and the ids."""

    def __init__(self, embedder: Embedder):
        self.embedder = embedder
        self.shape = (embedder.max_batch + 1, embedder.max_seq_len + 1)

    def send(self, rows: list[list[int]]) -> list[list[int]]:
        buffer = np.zeros(self.shape, np.int32)
        buffer[0, 0] = len(rows)
        for i, ids in enumerate(rows, 1):
            buffer[i, 0] = len(ids)
            buffer[i, 1 : 1 + len(ids)] = ids
        got = broadcast_value(buffer)
        return [got[i, 1 : 1 + got[i, 0]].tolist() for i in range(1, 1 + got[0, 0])]

    def follow(self) -> None:
        while rows := self.send([]):
            self.embedder.embed_tokens(rows)


def _lead(embedder, wire, input: Path, output: Path, errors: Path, shard, window, progress,
          vectors: str) -> BatchSummary:  # fmt: skip
    started, summary = time.perf_counter(), BatchSummary()
    done, logged = open_job(input, output, errors)
    meter = Progress(_count_lines(input), enabled=progress)
    lines = iter(_Lines(input, embedder.name, "embed", done, logged, shard, summary, meter))
    out, err = LineWriter(output), LineWriter(errors)
    npy = _NpyShards(output) if vectors == "npy" else None
    window = window or 8 * embedder.max_batch
    try:
        while chunk := list(itertools.islice(lines, window)):
            jobs = []
            for item in chunk:
                if isinstance(item, tuple):
                    _bad(err, summary, meter, *item)
                    continue
                try:
                    jobs.append((item, _token_rows(embedder, item)))
                except BadLine as e:
                    _bad(err, summary, meter, item.line, e)
            # Longest first, then cut into batches at row boundaries: a row's texts stay in one
            # batch, so a row is written whole or not at all.
            jobs.sort(key=lambda job: -max(len(ids) for ids in job[1]))
            for batch in _batches(jobs, embedder.max_batch):
                rows = [ids for _, token_rows in batch for ids in token_rows]
                if wire:
                    wire.send(rows)
                found = embedder.embed_tokens(rows)
                where = npy.write(found) if npy else None
                at = 0
                for row, token_rows in batch:
                    part = slice(at, at + len(token_rows))
                    at += len(token_rows)
                    ref = (where, part) if where else None
                    record = _record(row, embedder.name, found[part], token_rows, ref)
                    out.write(record)
                    tokens = sum(len(ids) for ids in token_rows)
                    summary.rows += 1
                    summary.prompt_tokens += tokens
                    meter.advance(tokens=tokens)
    finally:
        out.close()
        err.close()
        summary.seconds = time.perf_counter() - started
        meter.close(summary)
    return summary


def _bad(errors: LineWriter, summary: BatchSummary, meter: Progress, line: int, error) -> None:
    errors.write(error_record(line, error))
    summary.errors += 1
    meter.advance()


def _token_rows(embedder: Embedder, row: Row) -> list[list[int]]:
    """The row's inputs as token ids (texts tokenized and truncated as sentence-transformers
    does; token lists as given), checked as the server checks a request."""
    body = row.body
    if body.dimensions is not None and body.dimensions != embedder.dim:
        raise BadLine(
            f"dimensions={body.dimensions}: this model's embeddings have {embedder.dim} "
            "(it cannot shorten them)", row.id
        )  # fmt: skip
    inputs = body.input
    if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
        inputs = [inputs]
    if not inputs:
        raise BadLine("input is empty", row.id)
    if len(inputs) > embedder.max_batch:
        raise BadLine(f"input has {len(inputs)} items, over max_batch={embedder.max_batch} "
                      "(split the row)", row.id)  # fmt: skip
    token_rows = []
    for i, item in enumerate(inputs):
        which = "input" if len(inputs) == 1 else f"input[{i}]"
        if isinstance(item, str):
            if not item.strip():
                raise BadLine(f"{which} is empty", row.id)
            token_rows.append(embedder.tokenize([item])[0])
        else:
            try:
                embedder.check_tokens([item])
            except ValueError as e:
                raise BadLine(f"{which}: {str(e).removeprefix('row 0: ')}", row.id) from None
            token_rows.append(list(item))
    return token_rows


def _batches(jobs: list, max_rows: int):
    batch, size = [], 0
    for job in jobs:
        if batch and size + len(job[1]) > max_rows:
            yield batch
            batch, size = [], 0
        batch.append(job)
        size += len(job[1])
    if batch:
        yield batch


def _record(row: Row, model: str, found: np.ndarray, token_rows, ref) -> dict:
    tokens = sum(len(ids) for ids in token_rows)
    single = len(token_rows) == 1 and (isinstance(row.body.input, str)
                                       or isinstance(row.body.input[0], int))  # fmt: skip
    if ref is not None:  # the vectors are in a .npy file: say where
        name, part = ref
        vectors: Any = {"file": name, "rows": [part.start, part.stop]}
    elif row.openai and row.body.encoding_format == "base64":
        vectors = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in found]
    else:
        vectors = found.tolist()
    if not row.openai:
        record = {"id": row.id, "prompt_tokens": tokens}
        if ref is not None:
            record["vectors"] = vectors
        else:
            record["embedding" if single else "embeddings"] = vectors[0] if single else vectors
        return record
    rid = f"batch_req_{stable_hash(row.key):016x}"
    if ref is not None:
        data: Any = vectors
    else:
        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
    body = {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}  # fmt: skip
    response = {"status_code": 200, "request_id": rid, "body": body}
    return {"id": rid, "custom_id": row.id, "response": response, "error": None}


class _NpyShards:
    """`<output>.vectors/NNNNNN.npy`, one per batch, each whole before a line names it."""

    def __init__(self, output: Path):
        self.dir = output.with_name(output.name + ".vectors")
        self.dir.mkdir(parents=True, exist_ok=True)
        taken = [int(p.stem) for p in self.dir.glob("*.npy") if p.stem.isdigit()]
        self.next = max(taken, default=-1) + 1  # a file left by a killed run is never reused

    def write(self, vectors: np.ndarray) -> str:
        name = f"{self.next:06d}.npy"
        self.next += 1
        temporary = self.dir / (name + ".partial")
        with open(temporary, "wb") as f:
            np.save(f, vectors)
            f.flush()
            os.fsync(f.fileno())
        temporary.rename(self.dir / name)
        return name
