"""GGUF files of every supported tensor type, against transformers loading the same file.

The files are written here with the `gguf` package, the way llama.cpp's converter writes a
Llama: q/k rows permuted for its rotary layout, 2-D weights quantized.
"""

import gguf
import numpy as np
import pytest
import torch
import transformers
from conftest import MESHES

import shardinfer as si

Q = gguf.GGMLQuantizationType
HEADS, KV_HEADS = 8, 2
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _write_gguf(path, qtype, tied: bool) -> None:
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
        initializer_range=0.2, rms_norm_eps=1e-5, tie_word_embeddings=tied,
    )  # fmt: skip
    torch.manual_seed(1)
    state = transformers.LlamaForCausalLM(config).state_dict()
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"<{i}>" for i in range(256)])
    w.add_token_types([1] * 256)
    w.add_eos_token_id(2)
    for name, tensor in state.items():
        if tied and name == "lm_head.weight":
            continue
        if name in TOP_NAMES:
            out = TOP_NAMES[name]
        else:
            layer, rest = name.split(".")[2], ".".join(name.split(".")[3:])
            out = f"blk.{layer}.{LAYER_NAMES[rest]}"
        v = tensor.numpy()
        if out.endswith("attn_q.weight"):
            v = _llama_cpp_permute(v, HEADS)
        elif out.endswith("attn_k.weight"):
            v = _llama_cpp_permute(v, KV_HEADS)
        if v.ndim == 1 or qtype == Q.F32:
            w.add_tensor(out, v.astype(np.float32))
        elif qtype == Q.F16:
            w.add_tensor(out, v.astype(np.float16))
        else:
            w.add_tensor(out, gguf.quants.quantize(v.astype(np.float32), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize(
    "qtype, tied", [(Q.F32, False), (Q.F16, True), (Q.Q8_0, False), (Q.Q4_0, True), (Q.Q4_1, False)]
)
def test_gguf_logits_match_hf(tmp_path, qtype, tied):
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    _write_gguf(path, qtype, tied)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32
    ).eval()
    tokens = np.random.default_rng(0).integers(0, 256, (3, 11))
    with torch.no_grad():
        expected = reference(torch.as_tensor(tokens)).logits.numpy()
    for mesh in MESHES:  # the first load fills the weight cache; the others map it
        model = si.load_model(path, mesh=mesh, weight_cache=tmp_path / "weights")
        assert model.config.tie_word_embeddings == tied
        np.testing.assert_allclose(model.logits(tokens), expected, atol=1e-4, rtol=0)


def test_truncated_gguf_is_refused(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, Q.Q8_0, tied=False)
    path.write_bytes(path.read_bytes()[:-5000])
    with pytest.raises(ValueError, match="runs past the end"):
        si.load_model(path)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_dequantize_equals_the_gguf_package(qtype):
    """Our vectorized dequantization against the reference implementation, bit for bit."""
    from shardinfer.weights.gguf_quants import dequantize

    values = np.random.default_rng(0).normal(size=(6, 96)).astype(np.float32) * 3
    raw = gguf.quants.quantize(values, qtype)
    raw = raw.view(np.uint8).reshape(values.shape[0], -1)  # rows of bytes, as stored in a file
    expected = gguf.quants.dequantize(raw, qtype).astype(np.float32)
    np.testing.assert_array_equal(dequantize(raw, qtype.name), expected)


def test_default_model_dequantizes_like_the_gguf_package():
    from shardinfer.models.registry import gguf_family
    from shardinfer.weights.gguf_file import GGUFFile
    from shardinfer.weights.gguf_reader import tensor_bytes
    from shardinfer.weights.registry import resolve_registry_name

    f = GGUFFile(resolve_registry_name("smollm2-135m-instruct"), gguf_family)
    for name in ("model.embed_tokens.weight", "model.layers.3.mlp.down_proj.weight"):
        info = f._tensors[name]
        qtype, raw = tensor_bytes(f._mmap, f._contents, info, f.path)
        expected = gguf.quants.dequantize(raw, qtype)
        np.testing.assert_array_equal(f.get(name), expected, err_msg=f"{name} ({qtype.name})")
