"""Batch jobs: one output line per valid id, equal to an uninterrupted run however often the
job is killed and resumed; bad lines in the errors file; OpenAI Batch API shapes; shards."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import shardinfer as si
from shardinfer.batch.journal import CorruptOutput, LineWriter, recover
from shardinfer.batch.rows import BadLine, id_key, parse_line, stable_hash
from shardinfer.batch.runner import parse_shard

MODEL = "smollm2-135m-instruct"
SLOTS, SEQ = 8, 256  # the CLI runs get the same, so every run compiles the same shapes


def _rows(n: int) -> list[dict]:
    """Prompts of mixed lengths, greedy and sampled rows, several lengths to generate."""
    rows = []
    for i in range(n):
        row = {"id": f"row-{i}", "prompt": "Tell me about the number " + " and".join(
            str(j) for j in range(i % 7 + 1)), "max_tokens": 4 + (i * 5) % 13}  # fmt: skip
        if i % 3 == 0:
            row["temperature"] = 0.0
        rows.append(row)
    return rows


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _read(path: Path) -> dict:
    """id -> the line, without the wall-clock fields (OpenAI bodies' `created`)."""
    out = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "custom_id" in record:
            record["response"]["body"].pop("created")
            out[record["custom_id"]] = record
        else:
            out[record["id"]] = record
    return out


def _ids(path: Path) -> list:
    return [json.loads(x).get("custom_id", json.loads(x).get("id")) for x in path.open()]


@pytest.fixture(scope="module")
def llm():
    model = si.load_model(MODEL, weight_cache=None)
    return si.LLM(model, max_batch=SLOTS, max_seq_len=SEQ, compilation_cache=None)


@pytest.fixture(scope="module")
def reference(llm, tmp_path_factory) -> tuple[Path, dict]:
    """24 rows run once, uninterrupted: what every other run must reproduce."""
    work = tmp_path_factory.mktemp("reference")
    source = _write(work / "in.jsonl", _rows(24))
    summary = si.run_batch(source, work / "out.jsonl", llm, temperature=0.8, seed=3)
    assert summary.rows == 24 and summary.errors == 0
    return source, _read(work / "out.jsonl")


# ---- lines and files, no model ----------------------------------------------------------------


def test_lines_are_parsed_or_refused_with_a_reason():
    row = parse_line('{"id": 7, "prompt": "hi", "temperature": 0.5}', 1, MODEL, None)
    assert (row.id, row.task, row.openai, row.body.temperature) == (7, "completion", False, 0.5)
    messages = [{"role": "user", "content": "hi"}]
    chat = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "other", "messages": messages}}  # fmt: skip
    row = parse_line(json.dumps(chat), 2, MODEL, None)
    assert (row.id, row.task, row.openai) == ("a", "chat", True)
    refused = {
        "{not json": "not JSON",
        "[1, 2]": "JSON object",
        '{"prompt": "hi"}': 'no "id"',
        '{"id": "a"}': 'no "prompt" or "messages"',
        '{"id": true, "prompt": "x"}': "id must be",
        '{"id": "a", "prompt": "x", "top_p": 0}': "top_p",
        '{"id": "a", "prompt": "x", "stream": true}': "stream",
        '{"custom_id": "a", "url": "/v1/edits", "body": {}}': "url must be one of",
        '{"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {}}': "POST",
    }
    for text, reason in refused.items():
        with pytest.raises(BadLine, match=reason):
            parse_line(text, 1, MODEL, None)
    assert id_key(1) != id_key("1")


def test_shards_split_ids_into_disjoint_parts_that_cover_them_all():
    keys = [id_key(f"row-{i}") for i in range(1000)]
    parts = [{k for k in keys if stable_hash(k) % 4 == s} for s in range(4)]
    assert sum(len(p) for p in parts) == 1000 and set().union(*parts) == set(keys)
    assert all(150 < len(p) < 350 for p in parts)  # and roughly even
    # The same in another process, whose str hash() is salted otherwise.
    code = "from shardinfer.batch.rows import stable_hash; print(stable_hash('row-1'))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": "123"}, check=True)  # fmt: skip
    assert int(other.stdout) == stable_hash("row-1")
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "-1/2", "1", "a/b"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)


def test_recover_cuts_a_torn_last_line_and_refuses_damage_inside(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": 1}\n{"id": 2}\n{"id": 3, "te')
    assert recover(path, lambda r: r["id"]) == {1, 2}
    assert path.read_text() == '{"id": 1}\n{"id": 2}\n'
    path.write_text('{"id": 1}\n{"id": 2\n{"id": 3}\n')
    with pytest.raises(CorruptOutput, match="line 2"):
        recover(path, lambda r: r["id"])
    assert path.read_text() == '{"id": 1}\n{"id": 2\n{"id": 3}\n'  # left as it was


def test_a_write_that_fails_half_way_leaves_no_torn_line(tmp_path):
    writer = LineWriter(tmp_path / "out.jsonl")
    writer.write({"id": 1})
    real = writer._file

    class FullDisk:  # takes part of the line, then the disk is full
        def __getattr__(self, name):
            return getattr(real, name)

        def write(self, data):
            if len(data) > 4:
                return real.write(data[:4])
            raise OSError(errno.ENOSPC, "No space left on device")

    writer._file = FullDisk()
    with pytest.raises(OSError, match="No space"):
        writer.write({"id": 2, "text": "long enough to be cut"})
    writer._file = real
    writer.write({"id": 3})
    writer.close()
    assert (tmp_path / "out.jsonl").read_text() == '{"id": 1}\n{"id": 3}\n'


# ---- jobs ---------------------------------------------------------------------------------------


def test_a_job_writes_one_line_per_id_with_what_the_engine_generates(llm, reference):
    _, lines = reference
    assert sorted(lines) == sorted(r["id"] for r in _rows(24))
    greedy = [r for r in _rows(24) if r.get("temperature") == 0.0]
    outs = llm.generate([r["prompt"] for r in greedy],
                        [si.SamplingParams(max_tokens=r["max_tokens"], temperature=0.0)
                         for r in greedy])  # fmt: skip
    for row, out in zip(greedy, outs, strict=True):
        line = lines[row["id"]]
        assert line["text"] == out.text
        assert line["completion_tokens"] == len(out.token_ids)
        assert line["prompt_tokens"] == len(out.prompt_token_ids)
        assert line["finish_reason"] == out.finish_reason
    sampled = [lines[r["id"]]["text"] for r in _rows(24) if r.get("temperature") != 0.0]
    assert len(set(sampled)) > 1


def test_bad_lines_go_to_the_errors_file_and_the_rest_complete(llm, tmp_path):
    good = _rows(3)
    source = _write(tmp_path / "in.jsonl", [
        good[0], "{oops", {"id": "no-prompt"}, {"id": "empty", "prompt": ""}, good[1],
        {"id": "row-0", "prompt": "again"}, {"id": "hot", "prompt": "x", "temperature": -1},
        {"id": "long", "prompt": "x", "max_tokens": 10_000}, good[2],
    ])  # fmt: skip
    summary = si.run_batch(source, tmp_path / "out.jsonl", llm, temperature=0.0)
    assert (summary.rows, summary.errors) == (3, 6)
    assert sorted(_read(tmp_path / "out.jsonl")) == ["row-0", "row-1", "row-2"]
    errors = [json.loads(x) for x in (tmp_path / "out.errors.jsonl").open()]
    reasons = {e["line"]: e["error"] for e in errors}
    assert "not JSON" in reasons[2]
    assert 'no "prompt"' in reasons[3]
    assert "empty" in reasons[4]
    assert "duplicate id (first on line 1)" in reasons[6]
    assert "temperature" in reasons[7]
    assert "max_tokens=10000" in reasons[8] and "max_seq_len=256" in reasons[8]
    assert sorted(reasons) == [2, 3, 4, 6, 7, 8]
    # A rerun finds everything done or recorded: nothing is written twice.
    again = si.run_batch(source, tmp_path / "out.jsonl", llm, temperature=0.0)
    assert (again.rows, again.errors, again.resumed) == (0, 0, 3)
    assert len(_ids(tmp_path / "out.jsonl")) == 3
    assert len((tmp_path / "out.errors.jsonl").read_text().splitlines()) == 6


def test_openai_batch_input_gives_openai_batch_output(llm, tmp_path):
    requests = [
        {"custom_id": "chat-1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": MODEL, "messages": [{"role": "user", "content": "Hi!"}],
                  "max_tokens": 6, "temperature": 0}},
        {"custom_id": "text-1", "method": "POST", "url": "/v1/completions",
         "body": {"model": MODEL, "prompt": "The sky is", "max_tokens": 5, "temperature": 0}},
    ]  # fmt: skip
    source = _write(tmp_path / "in.jsonl", requests)
    si.run_batch(source, tmp_path / "out.jsonl", llm)
    lines = _read(tmp_path / "out.jsonl")
    chat, text = lines["chat-1"], lines["text-1"]
    for line in (chat, text):
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert line["response"]["status_code"] == 200
        assert line["response"]["request_id"] == line["id"]
    body = chat["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    assert body["choices"][0]["message"]["role"] == "assistant"
    expected = llm.chat([{"role": "user", "content": "Hi!"}],
                        si.SamplingParams(max_tokens=6, temperature=0.0))[0]  # fmt: skip
    assert body["choices"][0]["message"]["content"] == expected.text
    assert body["usage"]["completion_tokens"] == len(expected.token_ids)
    body = text["response"]["body"]
    assert body["object"] == "text_completion"
    expected = llm.generate("The sky is", si.SamplingParams(max_tokens=5, temperature=0.0))[0]
    assert body["choices"][0]["text"] == expected.text
    assert body["usage"]["total_tokens"] == len(expected.prompt_token_ids) + 5


def test_a_torn_last_line_is_redone(llm, reference, tmp_path):
    source, lines = reference
    out = tmp_path / "out.jsonl"
    si.run_batch(source, out, llm, temperature=0.8, seed=3)
    data = out.read_bytes()
    out.write_bytes(data[: len(data) - 20])  # a kill in the middle of writing the last line
    summary = si.run_batch(source, out, llm, temperature=0.8, seed=3)
    assert (summary.rows, summary.resumed) == (1, 23)
    assert len(_ids(out)) == 24 and _read(out) == lines


def test_shards_together_hold_exactly_one_line_per_id(llm, reference, tmp_path):
    source, lines = reference
    parts = []
    for k in range(3):
        out = tmp_path / f"out.{k}.jsonl"
        summary = si.run_batch(source, out, llm, temperature=0.8, seed=3, shard=f"{k}/3")
        assert summary.rows + summary.other_shards == 24
        parts.append(_read(out))
    assert sum(len(p) for p in parts) == 24
    assert {k: v for p in parts for k, v in p.items()} == lines  # seeds follow ids


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "shardinfer.cli", "batch", "--max-batch", str(SLOTS),
            "--max-seq-len", str(SEQ), "--temperature", "0.8", "--seed", "3", *args]  # fmt: skip


def test_a_job_killed_with_sigkill_resumes_to_the_uninterrupted_output(reference, tmp_path):
    source, lines = reference
    out = tmp_path / "out.jsonl"
    cache = ["--compilation-cache", str(tmp_path / "jax")]
    cmd = _cli("--input", str(source), "--output", str(out), *cache)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out.exists() and len(out.read_bytes().splitlines()) >= 3):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the job wrote nothing in 300 s"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    written = len(out.read_bytes().splitlines())
    assert 3 <= written < 24, f"killed too late to test anything: {written} lines"
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "already done" in done.stderr
    assert len(_ids(out)) == 24  # exactly one line per id
    assert _read(out) == lines  # and each the one an uninterrupted run wrote


def test_bad_arguments_are_refused_before_anything_loads(tmp_path):
    source = _write(tmp_path / "in.jsonl", _rows(1))
    cases = {
        ("--input", str(tmp_path / "missing.jsonl")): "is not a file",
        ("--shard", "3/2"): "shard 3/2",
        ("--max-tokens", "0"): "--max-tokens must be >= 1",
        ("--temperature", "-1"): "--temperature must be >= 0",
    }
    for extra, message in cases.items():
        args = ["--input", str(source), "--output", str(tmp_path / "o.jsonl"), *extra]
        done = subprocess.run(_cli(*args), capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and message in done.stderr, (extra, done.stderr)
    assert not (tmp_path / "o.jsonl").exists()


def test_two_replicas_give_the_lines_of_one_engine(reference, tmp_path):
    source, lines = reference
    out = tmp_path / "out.jsonl"
    summary = si.run_batch(source, out, MODEL, replicas=2, max_batch=SLOTS, max_seq_len=SEQ,
                           temperature=0.8, seed=3, weight_cache=None)  # fmt: skip
    assert summary.rows == 24
    assert len(_ids(out)) == 24 and _read(out) == lines


def test_a_job_under_launch_gives_the_lines_of_one_process(reference, tmp_path):
    """2 processes x 4 devices, one data=8 mesh: rows spread over every process's devices."""
    source, lines = reference
    out = tmp_path / "out.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [
        sys.executable,
        "-m",
        "shardinfer.cli",
        "launch",
        "--num-processes",
        "2",
        "--host-devices",
        "4",
        "--",
        *_cli("--input", str(source), "--output", str(out))[3:],
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(_ids(out)) == 24 and _read(out) == lines
    assert done.stderr.count("24 rows written") == 1  # process 0 alone reports
