"""Logits and greedy tokens against Hugging Face transformers, on every mesh shape."""

import shutil

import numpy as np
import pytest
import torch
from conftest import MESHES, hf_logits, hf_model, to_old_config_form

import shardinfer as si


def _tokens(batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(batch, length), dtype=np.int32)


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("batch", [8, 3])  # 3 divides neither data=8 nor data=2
def test_logits_match_hf(tiny_hf, mesh, batch):
    tokens = _tokens(batch, 12)  # longer than the Mistral sliding window (8)
    expected = hf_logits(tiny_hf, tokens)
    got = si.load_model(tiny_hf, mesh=mesh).logits(tokens)
    assert got.shape == expected.shape
    assert np.abs(expected).max() > 1.0  # the comparison below is not between near-zeros
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_old_config_form_loads_the_same(tiny_hf, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(tiny_hf, old)
    to_old_config_form(old)
    new_model, old_model = si.load_model(tiny_hf), si.load_model(old)
    assert new_model.config == old_model.config
    tokens = _tokens(2, 10)
    np.testing.assert_array_equal(new_model.logits(tokens), old_model.logits(tokens))


def test_greedy_tokens_match_hf_generate(tiny_hf):
    prompts = [[5, 17, 99, 3], [200, 1, 7, 7, 7, 42, 11], [9]]
    llm = si.LLM(tiny_hf, mesh="data=2,model=4", max_batch=4, max_seq_len=64)
    params = si.SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    outs = llm.generate(prompts, params)
    reference = hf_model(tiny_hf)
    reference.generation_config.eos_token_id = None  # like ignore_eos: always 16 tokens
    for prompt, out in zip(prompts, outs, strict=True):
        with torch.no_grad():
            ids = reference.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=16,
            )[0, len(prompt) :].tolist()
        assert out.token_ids == ids
        assert out.prompt_token_ids == prompt
        assert out.finish_reason == "length"
