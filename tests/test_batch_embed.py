"""Embedding batch jobs: vectors equal to sentence-transformers', one line per id however the
job is interrupted, OpenAI Batch API shapes, .npy vectors, and the same lines under launch."""

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import shardinfer as si

MODEL = "all-minilm-l6-v2"
TEXTS = [
    "The cat sat on the mat.",
    "A long text " + "that goes on and on " * 80,  # past the model's 256 tokens: truncated
    "Zoë's café serves crème brûlée — 東京の天気は晴れです 🌤",
    "short",
    "Embeddings map text to vectors whose angles say how alike two texts are.",
]


def _model_dir() -> Path:
    from shardinfer.weights.registry import resolve_registry_name

    return resolve_registry_name(MODEL)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(_model_dir()), device="cpu")
    return st.encode(TEXTS, batch_size=64, convert_to_numpy=True)


@pytest.fixture(scope="module")
def embedder():
    return si.Embedder(MODEL, max_batch=8, compilation_cache=None)


def _cosine_distance(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return 1 - (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _lines(path: Path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        out[record.get("custom_id", record.get("id"))] = record
    return out


def _simple_rows() -> list[dict]:
    rows = [{"id": i, "input": text} for i, text in enumerate(TEXTS)]
    rows.append({"id": "pair", "input": [TEXTS[0], TEXTS[2]]})
    return rows


def test_an_embedding_job_writes_sentence_transformers_vectors(embedder, reference, tmp_path):
    ids = embedder.tokenize([TEXTS[3]])[0]
    source = _write(tmp_path / "in.jsonl", [
        *_simple_rows(), {"id": "tokens", "input": ids}, {"id": "empty", "input": ""},
        {"id": "nothing"}, {"id": "wide", "input": "x", "dimensions": 1024},
        {"id": "bad-token", "input": [5, 10**6]}, {"id": 0, "input": "again"},
    ])  # fmt: skip
    summary = si.run_batch(source, tmp_path / "out.jsonl", embedder, task="embed")
    assert (summary.rows, summary.errors) == (7, 5)
    lines = _lines(tmp_path / "out.jsonl")
    got = np.array([lines[i]["embedding"] for i in range(len(TEXTS))])
    assert _cosine_distance(got, reference).max() < 1e-5
    assert _cosine_distance(lines["pair"]["embeddings"], reference[[0, 2]]).max() < 1e-5
    assert _cosine_distance(lines["tokens"]["embedding"], reference[3]) < 1e-5
    assert lines[1]["prompt_tokens"] == embedder.max_seq_len == 256
    errors = (tmp_path / "out.errors.jsonl").read_text().splitlines()
    reasons = {e["id"]: e["error"] for e in map(json.loads, errors)}
    assert "empty" in reasons["empty"]
    assert 'no "input"' in reasons["nothing"]
    assert "dimensions=1024" in reasons["wide"] and "384" in reasons["wide"]
    assert "1000000" in reasons["bad-token"]
    assert "duplicate id" in reasons[0]


def test_openai_embedding_lines_get_openai_batch_output(embedder, reference, tmp_path):
    def line(custom_id, text, **body):
        return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings",
                "body": {"model": MODEL, "input": text, **body}}  # fmt: skip

    source = _write(tmp_path / "in.jsonl", [
        line("f", TEXTS[0]), line("b", [TEXTS[2], TEXTS[4]], encoding_format="base64"),
    ])  # fmt: skip
    si.run_batch(source, tmp_path / "out.jsonl", embedder, task="embed")
    lines = _lines(tmp_path / "out.jsonl")
    body = lines["f"]["response"]["body"]
    assert lines["f"]["response"]["status_code"] == 200 and lines["f"]["error"] is None
    assert body["object"] == "list" and body["model"] == MODEL
    assert body["data"][0]["object"] == "embedding" and body["data"][0]["index"] == 0
    assert _cosine_distance(body["data"][0]["embedding"], reference[0]) < 1e-5
    assert body["usage"]["prompt_tokens"] == len(embedder.tokenize([TEXTS[0]])[0])
    data = lines["b"]["response"]["body"]["data"]
    got = [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in data]
    assert [d["index"] for d in data] == [0, 1]
    assert _cosine_distance(got, reference[[2, 4]]).max() < 1e-5


def test_a_torn_line_is_redone_and_npy_vectors_match(embedder, reference, tmp_path):
    source = _write(tmp_path / "in.jsonl", _simple_rows())
    out = tmp_path / "out.jsonl"
    si.run_batch(source, out, embedder, task="embed", vectors="npy", max_batch=8)
    data = out.read_bytes()
    out.write_bytes(data[: len(data) - 10])
    summary = si.run_batch(source, out, embedder, task="embed", vectors="npy")
    assert (summary.rows, summary.resumed) == (1, len(TEXTS))
    lines = _lines(out)
    assert len(out.read_text().splitlines()) == len(lines) == len(TEXTS) + 1
    vectors_dir = tmp_path / "out.jsonl.vectors"
    for i in range(len(TEXTS)):
        where = lines[i]["vectors"]
        block = np.load(vectors_dir / where["file"])[slice(*where["rows"])]
        assert block.shape == (1, 384)
        assert _cosine_distance(block[0], reference[i]) < 1e-5
    assert not list(vectors_dir.glob("*.partial"))


def test_an_embedding_job_under_launch_gives_the_lines_of_one_process(embedder, tmp_path):
    source = _write(tmp_path / "in.jsonl", _simple_rows())
    one = tmp_path / "one.jsonl"
    si.run_batch(source, one, embedder, task="embed")
    two = tmp_path / "two.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, "-m", "shardinfer.cli", "launch", "--num-processes", "2",
           "--host-devices", "4", "--", "batch", "--task", "embed", "--mesh", "data=2,model=4",
           "--max-batch", "8", "--input", str(source), "--output", str(two)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = _lines(one), _lines(two)
    assert sorted(a, key=str) == sorted(b, key=str)
    for key in a:
        vectors = "embedding" if "embedding" in a[key] else "embeddings"
        assert _cosine_distance(a[key][vectors], b[key][vectors]).max() < 1e-6
