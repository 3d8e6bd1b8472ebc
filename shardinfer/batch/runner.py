"""`run_batch`: a JSON-lines file through the engine, resumable, one output line per id.

Process 0 (or the only process) reads the input as a stream, skips the ids the output already
holds, tokenizes a window of rows at a time and hands them out longest first, keeping every
engine's queue full; each row is written as soon as it is done. Under `launch` the other
processes execute process 0's steps. With `replicas`, R engines on R sub-meshes each run in a
thread (JAX releases the GIL while a step runs) and take rows from one shared feeder.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shardinfer.batch.journal import LineWriter, recover
from shardinfer.batch.progress import Progress
from shardinfer.batch.rows import BadLine, Row, Task, id_key, parse_line, row_seed, stable_hash
from shardinfer.engine.core import EngineCore
from shardinfer.engine.params import SamplingParams
from shardinfer.engine.request import Request
from shardinfer.serving.openai_schema import CHAT, COMPLETION, final_body

DEFAULT_MAX_TOKENS = 256


@dataclasses.dataclass
class BatchSummary:
    rows: int = 0  # written by this run
    resumed: int = 0  # already in the output, skipped
    errors: int = 0  # bad lines found by this run (earlier runs' stay in the errors file)
    other_shards: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    def describe(self) -> str:
        rate = self.completion_tokens / self.seconds if self.seconds else 0.0
        return (f"{_count(self.rows, 'row')} written, {self.resumed} already done, "
                f"{_count(self.errors, 'error')}, "
                f"{self.prompt_tokens} prompt and {self.completion_tokens} generated tokens in "
                f"{self.seconds:.1f} s ({rate:.1f} tok/s)")  # fmt: skip


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def parse_shard(text: str) -> tuple[int, int]:
    """'K/N' -> (K, N): this job takes the rows whose id hashes to K of N."""
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"shard must look like K/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= k < n:
        raise ValueError(f"shard {text}: K must be in 0..N-1")
    return k, n


def default_errors_path(output: Path) -> Path:
    return output.with_name(output.stem + ".errors" + (output.suffix or ".jsonl"))


class _Lines:
    """The input's rows in order, minus those done, those of other shards and the lines whose
    errors are already recorded; bad lines come out as BadLine."""

    def __init__(self, path: Path, model: str, task: Task | None, done: set, logged: set,
                 shard: tuple[int, int], summary: BatchSummary, progress: Progress):  # fmt: skip
        self.path, self.model, self.task = path, model, task
        self.done, self.logged, self.shard = done, logged, shard
        self.summary, self.progress = summary, progress
        self.first_line: dict[str, int] = {}  # id -> its line: duplicates are refused

    def __iter__(self) -> Iterator[Row | tuple[int, BadLine]]:
        k, n = self.shard
        with open(self.path, "rb") as f:
            for number, raw in enumerate(f, 1):
                text = raw.decode("utf-8", errors="replace").strip()
                if not text:
                    continue
                try:
                    row: Row | None = parse_line(text, number, self.model, self.task)
                    error = None
                except BadLine as e:
                    row, error = None, e
                key = row.key if row else (id_key(error.row_id) if error.row_id is not None
                                           else f"line:{number}")  # fmt: skip
                if stable_hash(key) % n != k:
                    self.summary.other_shards += 1
                    self.progress.advance()
                    continue
                if row is not None and key in self.first_line:
                    row, error = (
                        None,
                        BadLine(f"duplicate id (first on line {self.first_line[key]})", row.id),
                    )
                elif row is not None:
                    self.first_line[key] = number
                if number in self.logged:  # an earlier run recorded why it cannot run
                    self.progress.advance()
                    continue
                if row is not None and key in self.done:
                    self.summary.resumed += 1
                    self.progress.advance()
                    continue
                yield row if row is not None else (number, error)


class _Feeder:
    """Rows as requests, a window at a time, longest prompt first (rows of a like length
    prefill together with little padding; the short ones fill in at the end)."""

    def __init__(self, lines: _Lines, job: _Job, window: int):
        self.rows, self.job, self.window = iter(lines), job, window
        self.ready: deque[tuple[Request, Row]] = deque()
        self.exhausted = False
        self.lock = threading.Lock()

    def take(self, core: EngineCore, n: int) -> list[tuple[Request, Row]]:
        with self.lock:
            while not self.ready and not self.exhausted:
                self._fill(core)
            return [self.ready.popleft() for _ in range(min(n, len(self.ready)))]

    def _fill(self, core: EngineCore) -> None:
        made, consumed = [], 0
        for item in itertools.islice(self.rows, self.window):
            consumed += 1
            if isinstance(item, tuple):
                self.job.bad(*item)
                continue
            try:
                made.append((self.job.request(core, item), item))
            except BadLine as e:
                self.job.bad(item.line, e)
        made.sort(key=lambda pair: -len(pair[0].prompt_ids))
        self.ready.extend(made)
        self.exhausted = consumed < self.window


def error_record(line: int, error: BadLine) -> dict[str, Any]:
    """A bad line's record in the errors file: its number, the reason, its id if it had one."""
    record: dict[str, Any] = {"line": line, "error": str(error)}
    if error.row_id is not None:
        record["id"] = error.row_id
    return record


class _Job:
    """What a run shares between its engine threads: the writers, the counts, the defaults."""

    def __init__(self, model: str, output: LineWriter, errors: LineWriter, summary: BatchSummary,
                 progress: Progress, max_tokens: int, temperature: float, seed: int):  # fmt: skip
        self.model, self.output, self.errors = model, output, errors
        self.summary, self.progress = summary, progress
        self.max_tokens, self.temperature, self.seed = max_tokens, temperature, seed
        self.lock = threading.Lock()

    def bad(self, line: int, error: BadLine) -> None:
        with self.lock:
            self.errors.write(error_record(line, error))
            self.summary.errors += 1
            self.progress.advance()

    def request(self, core: EngineCore, row: Row) -> Request:
        body = row.body
        try:
            if row.task == "chat":
                ids = core.chat_ids([m.model_dump() for m in body.messages])
                limit = body.max_completion_tokens or body.max_tokens
            else:
                ids = core.prompt_ids(body.prompt)
                limit = body.max_tokens
            room = core.room(ids)
            if limit is not None and limit > room:
                raise ValueError(
                    f"max_tokens={limit} with a {len(ids)}-token prompt exceeds "
                    f"max_seq_len={core.max_seq_len}; ask for at most {room}"
                )
            fields = body.model_fields_set
            temperature = body.temperature if "temperature" in fields else self.temperature
            seed = body.seed if body.seed is not None else row_seed(row.key, self.seed)
            stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
            params = SamplingParams(
                max_tokens=min(limit or self.max_tokens, room), temperature=temperature,
                top_p=body.top_p, top_k=body.top_k, seed=seed, stop=tuple(stop),
                ignore_eos=body.ignore_eos,
            )  # fmt: skip
            return core.make_request(ids, params)
        except ValueError as e:
            raise BadLine(str(e), row.id) from None

    def done(self, request: Request, row: Row) -> None:
        out = request.output()
        prompt, generated = len(out.prompt_token_ids), len(out.token_ids)
        if row.openai:
            rid = f"batch_req_{stable_hash(row.key):016x}"
            kind = CHAT if row.task == "chat" else COMPLETION
            body = final_body(rid, self.model, kind, out.text, out.finish_reason, prompt,
                              generated)  # fmt: skip
            response = {"status_code": 200, "request_id": rid, "body": body}
            record = {"id": rid, "custom_id": row.id, "response": response, "error": None}
        else:
            record = {"id": row.id, "text": out.text, "finish_reason": out.finish_reason,
                      "prompt_tokens": prompt, "completion_tokens": generated}  # fmt: skip
        with self.lock:
            self.output.write(record)
            self.summary.rows += 1
            self.summary.prompt_tokens += prompt
            self.summary.completion_tokens += generated
            self.progress.advance(tokens=generated)


def _drive(core: EngineCore, feeder: _Feeder, job: _Job, stop: threading.Event) -> None:
    """One engine: keep its queue at least one batch deep, step, write what finished."""
    rows: dict[Request, Row] = {}
    try:
        while not stop.is_set():
            core.keep_alive()  # under launch: the followers hear from process 0 while it reads
            want = 2 * core.max_batch - core.num_waiting()
            if want > 0:
                for request, row in feeder.take(core, want):
                    rows[request] = row
                    core.add(request)
            if not core.has_work():
                if feeder.exhausted and not feeder.ready:
                    return
                continue
            for request in core.step():
                if request.done:
                    job.done(request, rows.pop(request))
    except BaseException:
        stop.set()  # the other engines stop too; what was written stays
        raise
    finally:
        for request in rows:
            core.abort(request)


def run_cores(cores: list[EngineCore], input: Path, output: Path, errors: Path | None = None,
              *, model_name: str, task: Task | None = None, max_tokens: int = DEFAULT_MAX_TOKENS,
              temperature: float = 1.0, seed: int = 0, shard: tuple[int, int] = (0, 1),
              window: int | None = None, progress: bool | None = None) -> BatchSummary:  # fmt: skip
    """The job over engines already built (one, or one per replica); see `run_batch`."""
    input, output = Path(input), Path(output)
    errors = Path(errors) if errors else default_errors_path(output)
    if not cores[0].leads:  # another process plans: execute its steps until it is done
        cores[0].follow()
        return BatchSummary()
    try:
        return _lead(cores, input, output, errors, model_name, task, max_tokens, temperature,
                     seed, shard, window, progress)  # fmt: skip
    finally:
        for core in cores:
            core.close()  # the other processes return from follow(), whatever happened here


def _lead(cores, input, output, errors, model_name, task, max_tokens, temperature, seed, shard,
          window, progress) -> BatchSummary:  # fmt: skip
    started, summary = time.perf_counter(), BatchSummary()
    done, logged = open_job(input, output, errors)
    meter = Progress(_count_lines(input), enabled=progress)
    lines = _Lines(input, model_name, task, done, logged, shard, summary, meter)
    out, err = LineWriter(output), LineWriter(errors)
    job = _Job(model_name, out, err, summary, meter, max_tokens, temperature, seed)
    feeder = _Feeder(lines, job, window or 8 * sum(c.max_batch for c in cores))
    stop, failures = threading.Event(), []

    def drive(core: EngineCore) -> None:
        try:
            _drive(core, feeder, job, stop)
        except BaseException as e:
            failures.append(e)

    try:
        if len(cores) == 1:
            _drive(cores[0], feeder, job, stop)
        else:
            threads = [threading.Thread(target=drive, args=(c,), daemon=True) for c in cores]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if failures:
                raise failures[0]
    finally:
        out.close()
        err.close()
        summary.seconds = time.perf_counter() - started
        meter.close(summary)
    return summary


def open_job(input: Path, output: Path, errors: Path) -> tuple[set, set]:
    """Checks the job's files and recovers what earlier runs did: the ids of the output's
    complete lines (a torn last line cut) and the line numbers the errors file records."""
    if not input.is_file():
        raise ValueError(f"input {input} is not a file")
    if output.resolve() in (input.resolve(), errors.resolve()):
        raise ValueError("the output must be a file of its own (not the input or errors file)")
    done = recover(output, lambda r: id_key(r["custom_id"] if "custom_id" in r else r["id"]))
    return done, recover(errors, lambda r: r["line"])


def _count_lines(path: Path) -> int:
    count = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            count += chunk.count(b"\n")
    return count
