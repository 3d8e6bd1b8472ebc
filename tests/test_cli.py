"""The README's main command, end to end in a fresh process."""

import json
import os
import re
import subprocess
import sys


def _run(*args: str, **extra_env: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | extra_env
    return subprocess.run(
        [sys.executable, "-m", "shardinfer.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def _compile_seconds(stderr: str) -> float:
    return float(re.search(r"including ([0-9.]+)s of compilation", stderr).group(1))


def test_generate_on_a_simulated_mesh_then_warm_start(tmp_path):
    args = [
        "generate", "--host-devices", "8", "--mesh", "data=2,model=4",
        "--prompt", "What is the capital of France?", "--max-tokens", "12",
        "--compilation-cache", str(tmp_path / "cache"),
    ]  # fmt: skip
    cold = _run(*args)
    assert cold.returncode == 0, cold.stderr
    assert "Paris" in cold.stdout
    assert "Mesh(data=2, model=4) over 8 cpu device(s)" in cold.stderr
    assert "layers.*.mlp.gate_proj" in cold.stderr and "P(None, 'model')" in cold.stderr
    assert "tok/s" in cold.stderr
    # A second process finds the big programs in the persistent cache instead of compiling.
    warm = _run(*args)
    assert warm.returncode == 0, warm.stderr
    assert warm.stdout == cold.stdout
    # Unrolled layers (the CPU default) still trace 30 layers in the warm process: < 1/2.
    assert _compile_seconds(warm.stderr) < _compile_seconds(cold.stderr) / 2


def test_info_lists_simulated_devices():
    done = _run("info", "--host-devices", "4")
    assert done.returncode == 0, done.stderr
    assert "4 local device(s), 4 in all" in done.stdout and "process 0 of 1" in done.stdout


def test_host_devices_wins_over_jax_num_cpu_devices():
    """JAX's own variable beats XLA's flag; a notebook's or shell's must not beat the option."""
    done = _run("info", "--host-devices", "2", JAX_NUM_CPU_DEVICES="8")
    assert done.returncode == 0, done.stderr
    assert "2 local device(s), 2 in all" in done.stdout


def test_bad_mesh_is_a_clear_error():
    done = _run("generate", "--host-devices", "8", "--mesh", "data=3", "--prompt", "hi")
    assert done.returncode == 2
    assert "multiply to 3, but there are 8 devices" in done.stderr


def test_convert_then_generate(tiny_llama, tmp_path):
    dest = tmp_path / "converted"
    done = _run("convert", str(tiny_llama), str(dest), "--host-devices", "2", "--mesh", "model=2")
    assert done.returncode == 0, done.stderr
    assert "saved" in done.stdout and (dest / "shardinfer.json").is_file()
    import numpy as np

    import shardinfer as si

    tokens = np.arange(10).reshape(1, 10)
    np.testing.assert_allclose(
        si.load_model(dest).logits(tokens), si.load_model(tiny_llama).logits(tokens), atol=1e-5
    )


def test_bench_reports_rates_and_the_bandwidth_limit(tiny_llama, tmp_path):
    out = tmp_path / "bench.json"
    done = _run(
        "bench", "--model", str(tiny_llama), "--host-devices", "2", "--mesh", "data=2",
        "--batch-sizes", "1,2", "--new-tokens", "4", "--repeats", "1",
        "--prompt-lengths", "8,40", "--json", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "time to first token, 40-token prompt" in done.stdout
    result = json.loads(out.read_text())
    assert [row["batch"] for row in result["decode"]] == [1, 2]
    assert all(row["decode_tok_s"] > 0 for row in result["decode"])
    assert result["decode"][0]["fraction_of_bandwidth_limit"] > 0
