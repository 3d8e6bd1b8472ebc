"""Several processes, one mesh (local processes joined by jax.distributed over gloo stand in
for hosts): the same numbers as one process, and a dead process ends the run in bounded time."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import shardinfer as si

SCRIPT = Path(__file__).with_name("multiprocess_script.py")
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return env | extra


def _launch(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardinfer.cli", "launch", *args],
                          capture_output=True, text=True, env=_env(), timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> dict:
    """The Python API in 2 processes x 4 devices, mesh data=2,model=4 (what each process saw)."""
    out = tmp_path_factory.mktemp("mp") / "result"
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), str(out), "data=2,model=4"],
            env=_env(
                XLA_FLAGS="--xla_force_host_platform_device_count=4",
                SHARDINFER_COORDINATOR=f"127.0.0.1:{port}",
                SHARDINFER_NUM_PROCESSES="2",
                SHARDINFER_PROCESS_ID=str(i),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    return {i: json.loads(Path(f"{out}.{i}").read_text()) for i in range(2)}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference(mesh) -> dict:
    model = si.load_model("smollm2-135m-instruct", mesh=mesh, weight_cache=None)
    llm = si.LLM(model, max_batch=4, max_seq_len=256, compilation_cache=None)
    greedy = llm.chat(CHAT, si.SamplingParams(max_tokens=12, temperature=0.0))[0]
    seeded = si.SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=5)
    sampled = llm.generate(["Once upon a time"] * 2, seeded)
    logits = model.logits([[1, 2, 3, 4], [5, 6, 7, 8]])
    return {"greedy": greedy.token_ids, "sampled": [o.token_ids for o in sampled],
            "logits": logits}  # fmt: skip


def test_two_processes_equal_one_process_and_one_device(two_processes):
    import jax

    first, second = two_processes[0], two_processes[1]
    assert (first["processes"], first["devices"]) == (2, 8)
    # Every process got the same outputs (process 0's, shared at the end of each run).
    for key in ("greedy", "greedy_text", "sampled", "argmax"):
        assert first[key] == second[key], key
    assert "Paris" in first["greedy_text"]
    for seen in (first, second):
        # Each process placed exactly the slices its own 4 devices hold, never a whole weight
        # for all 8: less than 4 full copies, as data=2 replicates and model=4 splits.
        assert seen["placed_bytes"] == seen["local_shard_bytes"]
        assert seen["placed_bytes"] < 4 * seen["weight_bytes"]
    for mesh in (si.make_mesh("data=2,model=4"), si.make_mesh("data=1", devices=jax.devices()[:1])):
        ref = _reference(mesh)
        assert first["greedy"] == ref["greedy"]
        assert first["sampled"] == ref["sampled"]  # seeded: the same draws on any mesh
        # float32 sums in another order (a different split over devices): logits of ~10-30
        # agree to ~3e-4.
        head = np.array(first["logits_head"])
        np.testing.assert_allclose(head, ref["logits"][:, :, :64], atol=1e-3, rtol=1e-4)


def test_info_under_launch_shows_each_process_and_the_global_devices():
    done = _launch("--num-processes", "2", "--host-devices", "2", "--", "info", timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    for i in range(2):
        assert f"[{i}] process {i} of 2" in done.stdout
        assert f"[{i}] backend cpu: 2 local device(s), 4 in all" in done.stdout


def test_generate_under_launch_prints_once_what_one_process_prints(tmp_path):
    cache = str(tmp_path / "jax")
    args = ["generate", "--mesh", "data=2,model=4", "--prompt", "What is the capital of France?",
            "--max-tokens", "12", "--compilation-cache", cache]  # fmt: skip
    done = _launch("--num-processes", "2", "--host-devices", "4", "--", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    single = subprocess.run([sys.executable, "-m", "shardinfer.cli", *args, "--host-devices", "8"],
                            capture_output=True, text=True, env=_env(), timeout=600)  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    # Only process 0 prints the answer, prefixed with its process.
    assert done.stdout == "".join(f"[0] {line}\n" for line in single.stdout.splitlines())
    assert "Paris" in done.stdout


def test_bench_under_launch_reports_once(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "--mesh", "data=2,model=2", "--batch-sizes", "1,2", "--new-tokens", "4",
            "--repeats", "1", "--prompt-lengths", "8", "--json", str(out),
            "--compilation-cache", str(tmp_path / "jax")]  # fmt: skip
    done = _launch("--num-processes", "2", "--host-devices", "2", "--", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("decode tok/s") == 1 and "[1]" not in done.stdout
    result = json.loads(out.read_text())
    assert [row["batch"] for row in result["decode"]] == [1, 2]
    assert all(row["decode_tok_s"] > 0 for row in result["decode"])
    assert result["ttft_s"]["8"] > 0 and result["read_bandwidth_gbps"] > 0


def _long_generate_under_launch() -> tuple[subprocess.Popen, dict[int, int]]:
    cmd = [sys.executable, "-m", "shardinfer.cli", "launch", "--num-processes", "2",
           "--host-devices", "2", "--", "generate", "--mesh", "data=2,model=2", "--prompt", "hi",
           "--max-tokens", "100000", "--max-seq-len", "2048", "--raw"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())  # fmt: skip
    pids: dict[int, int] = {}
    deadline = time.monotonic() + 300
    while len(pids) < 2:
        line = proc.stderr.readline()
        assert line and time.monotonic() < deadline, "launch did not start its processes"
        if m := re.match(r"launch: process (\d) is pid (\d+)", line):
            pids[int(m[1])] = int(m[2])
    time.sleep(8)  # joined, loading or generating
    assert proc.poll() is None
    return proc, pids


@pytest.mark.parametrize(
    "sig, words, bound",
    [
        # 0.1 s to notice + up to 5 s for the others to stop.
        (signal.SIGKILL, "process 1 was killed by SIGKILL", 7.0),
        # Stopped for over 2 s counts as failed (gloo would wait for it until JAX's
        # heartbeat timeout); then as above.
        (signal.SIGSTOP, "process 1 is stopped (SIGSTOP) for over 2 s", 9.0),
    ],
)
def test_a_dead_or_stuck_process_ends_launch_in_bounded_time_naming_it(sig, words, bound):
    proc, pids = _long_generate_under_launch()
    try:
        hit_at = time.monotonic()
        os.kill(pids[1], sig)
        code = proc.wait(timeout=60)
        elapsed = time.monotonic() - hit_at
        rest = proc.stderr.read()
        left = []
        for pid in pids.values():  # launch leaves no process behind
            try:
                os.kill(pid, 0)
                left.append(pid)
            except ProcessLookupError:
                pass
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert code != 0
    assert f"launch: {words}" in rest
    assert elapsed < bound, elapsed
    assert not left


def test_serve_under_launch_answers_openai_and_drains_on_sigterm(tmp_path):
    """2 processes x 4 devices behind one HTTP server (process 0's): the official client gets
    the text one process gives, streamed or not; SIGTERM to launch drains, all exit 0."""
    import openai

    port = _free_port()
    cmd = [sys.executable, "-m", "shardinfer.cli", "launch", "--num-processes", "2",
           "--host-devices", "4", "--", "serve", "--mesh", "data=2,model=4", "--port", str(port),
           "--max-batch", "2", "--max-seq-len", "256", "--no-warmup",
           "--compilation-cache", str(tmp_path / "jax")]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())  # fmt: skip
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline and proc.poll() is None, "no server"
                time.sleep(0.5)
        ask = dict(model="smollm2-135m-instruct", messages=CHAT, max_tokens=12, temperature=0)
        whole = client.chat.completions.create(**ask).choices[0].message.content
        pieces = [c.choices[0].delta.content or "" for c in
                  client.chat.completions.create(**ask, stream=True) if c.choices]  # fmt: skip
        time.sleep(2.5)  # idle for a while: the followers are kept alive, not timed out
        again = client.chat.completions.create(**ask).choices[0].message.content
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, err[-3000:]
    assert "stopping the others" not in err  # no process failed
    model = si.load_model("smollm2-135m-instruct", mesh="data=2,model=4")
    expected = si.LLM(model, max_batch=2, max_seq_len=256).chat(
        CHAT, si.SamplingParams(max_tokens=12, temperature=0.0))[0].text  # fmt: skip
    assert whole == "".join(pieces) == again == expected


def test_checkpoints_move_between_process_counts(tmp_path):
    """Saved by 2 processes (each writing its shards), restored by 1 on another mesh; saved
    by 1, restored by 2: the same logits, the same greedy text."""
    saved_by_two = tmp_path / "by-two"
    convert = ["convert", "smollm2-135m-instruct", str(saved_by_two), "--mesh", "data=2,model=2"]
    done = _launch("--num-processes", "2", "--host-devices", "2", "--", *convert)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("saved smollm2-135m-instruct") == 1  # process 0 says so, once
    tokens = [[1, 2, 3, 4, 5]]
    original = si.load_model("smollm2-135m-instruct", mesh="data=8")
    restored = si.load_model(saved_by_two, mesh="model=8")
    np.testing.assert_allclose(restored.logits(tokens), original.logits(tokens), atol=1e-3)

    saved_by_one = tmp_path / "by-one"
    original.save(saved_by_one)
    args = ["generate", "--mesh", "data=2,model=2", "--prompt", "What is the capital of France?",
            "--max-tokens", "10", "--compilation-cache", str(tmp_path / "jax")]  # fmt: skip
    two = _launch("--num-processes", "2", "--host-devices", "2", "--", *args, "--model",
                  str(saved_by_one))  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    expected = si.LLM(original, max_batch=1, max_seq_len=1024).chat(
        CHAT, si.SamplingParams(max_tokens=10, temperature=0.0))[0].text  # fmt: skip
    assert two.stdout == "".join(f"[0] {line}\n" for line in expected.splitlines())


def test_a_server_whose_follower_died_answers_503_not_a_hang(tmp_path):
    """Two processes serving without a supervisor: process 1 is killed. Process 0's next
    collective (its once-a-second IDLE) fails, the engine goes down, and a request gets a 503
    at once; or process 0 itself ends (JAX's coordination service aborts it). Never a hang."""
    import urllib.error
    import urllib.request

    port, coordinator = _free_port(), _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "shardinfer.cli", "serve", "--mesh", "data=2,model=2",
             "--port", str(port), "--max-batch", "2", "--max-seq-len", "128", "--no-warmup",
             "--compilation-cache", str(tmp_path / "jax")],
            env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=2",
                     SHARDINFER_COORDINATOR=f"127.0.0.1:{coordinator}",
                     SHARDINFER_NUM_PROCESSES="2", SHARDINFER_PROCESS_ID=str(i)),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for i in range(2)
    ]  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline and procs[0].poll() is None, "no server"
                time.sleep(0.5)
        procs[1].kill()
        time.sleep(3)  # an IDLE broadcast or two
        body = json.dumps({"model": "smollm2-135m-instruct", "prompt": "hi", "max_tokens": 4})
        request = urllib.request.Request(base + "/v1/completions", data=body.encode(),
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        started = time.monotonic()
        try:
            urllib.request.urlopen(request, timeout=30)
            outcome = "answered"
        except urllib.error.HTTPError as e:
            outcome = e.code
        except OSError:  # process 0 is gone too (refused or reset): an error, not a hang
            outcome = "gone"
        assert outcome in (503, "gone"), outcome
        assert time.monotonic() - started < 30
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
