"""Qwen3 in the packed runtime: per-head q/k RMSNorm before RoPE, explicit head_dim, sliding layers.

Same tolerance as test_model.py (``assert_matches_oracle``): our fp32 error against fp64
transformers at most twice transformers' own fp32 error plus 1e-6.
"""

from pathlib import Path

import pytest
import torch
from model_helpers import (
    assert_matches_oracle,
    hf_hidden_states,
    random_sequences,
    runtime_from_hf,
    runtime_hidden_states,
    save_tiny_folder,
    tiny_hf_model,
    write_tiny_gguf,
)

from llm2vec_fast import LLM2Vec
from llm2vec_fast.config import ModelConfig
from llm2vec_fast.loading import load_model
from llm2vec_fast.weights import build_model, canonical_tensors, read_gguf, runtime_state_dict

# GQA 2:1 and head_dim 24 beside hidden 64 / 4 heads = 16 (model_helpers' Qwen3 default).
LENGTHS = [7, 1, 13]


def assert_states_match(ours, hf32, hf64, sequences, *, causal: bool, what: str) -> None:
    for ids, states in zip(sequences, runtime_hidden_states(ours, sequences, causal=causal)):
        assert_matches_oracle(
            states,
            hf_hidden_states(hf32, ids, causal=causal),
            hf_hidden_states(hf64, ids, causal=causal),
            f"{what} len {len(ids)}",
        )


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="plain"),
        pytest.param(dict(attention_bias=True, tie_word_embeddings=True), id="biased-tied"),
    ],
)
def test_matches_transformers(causal, options):
    hf32 = tiny_hf_model("qwen3", seed=31, **options)
    hf64 = tiny_hf_model("qwen3", seed=31, **options).double()
    ours = runtime_from_hf(hf32)
    attention = ours.layers[0].self_attn
    assert attention.qkv_split == (4 * 24, 2 * 24, 2 * 24)
    assert attention.q_norm.weight.shape == attention.k_norm.weight.shape == (24,)
    assert (attention.qkv_proj.bias is not None) == (attention.o_proj.bias is not None)
    assert (attention.qkv_proj.bias is not None) == bool(options)
    sequences = random_sequences(LENGTHS, seed=31)
    assert_states_match(ours, hf32, hf64, sequences, causal=causal, what="qwen3")


def test_qk_norm_weights_are_used():
    """With the q/k norm weights changed, the states change: the norms are not skipped."""
    hf32 = tiny_hf_model("qwen3", seed=32)
    ours = runtime_from_hf(hf32)
    ids = random_sequences([9], seed=32)
    before = runtime_hidden_states(ours, ids, causal=True)[0]
    with torch.no_grad():
        ours.layers[1].self_attn.k_norm.weight.mul_(2.0)
    assert (runtime_hidden_states(ours, ids, causal=True)[0] - before).abs().max() > 1e-3


def test_missing_qk_norm_weight_is_named():
    hf32 = tiny_hf_model("qwen3", seed=33)
    hf_config = hf32.config.to_dict()
    tensors = canonical_tensors(dict(hf32.state_dict()), hf_config)
    del tensors["layers.1.self_attn.q_norm.weight"]
    with pytest.raises(ValueError, match=r"lacks 1 weight.*layers\.1\.self_attn\.q_norm\.weight"):
        runtime_state_dict(ModelConfig.from_hf_dict(hf_config), tensors)


def test_saved_folder_loads_and_encodes_like_transformers(tmp_path):
    """save_pretrained's folder through load_model, and through LLM2Vec.from_pretrained's mean
    pooling, causal with a sliding layer shorter than the texts."""
    options = dict(
        use_sliding_window=True,
        sliding_window=3,
        layer_types=["full_attention", "sliding_attention"],
    )
    hf32 = tiny_hf_model("qwen3", seed=34, **options)
    hf64 = tiny_hf_model("qwen3", seed=34, **options).double()
    folder = save_tiny_folder(hf32, tmp_path / "qwen3")

    model, _ = load_model(folder)
    assert model.loaded_from.config.model_type == "qwen3"
    assert [layer.self_attn.sliding_window for layer in model.layers] == [None, 3]
    sequences = random_sequences([10, 4], seed=34)
    for causal in (False, True):
        assert_states_match(model, hf32, hf64, sequences, causal=causal, what="loaded qwen3")

    encoder = LLM2Vec.from_pretrained(
        folder, enable_bidirectional=False, pooling_mode="mean", torch_dtype="float32"
    )
    texts = ["w5 w6 w7 w8 w9 w10 w11", ["w40 w41:", "w9 w10 w11 w12 w13"], "w13"]
    embeddings = encoder.encode(texts, show_progress_bar=False)  # (3, hidden)
    assert embeddings.shape == (3, 64)
    for embedding, item in zip(embeddings, encoder.tokenize(texts)):
        mask = torch.tensor(item.pool_mask)
        hf32_mean = hf_hidden_states(hf32, item.input_ids, causal=True)[mask].mean(dim=0)
        hf64_mean = hf_hidden_states(hf64, item.input_ids, causal=True)[mask].mean(dim=0)
        assert_matches_oracle(embedding, hf32_mean, hf64_mean, f"mean of {item}")


def write_gguf(hf_model, path: Path) -> Path:
    """An fp32 GGUF file of a transformers Qwen3."""
    config = hf_model.config
    rope_theta = config.rope_parameters["rope_theta"]
    return write_tiny_gguf(path, "qwen3", config, hf_model.state_dict(), rope_theta=rope_theta)


def test_gguf_file_reads_like_transformers(tmp_path):
    """A Qwen3 GGUF through transformers' GGUF loader (it maps attn_q_norm / attn_k_norm) into
    the runtime. transformers reads no head_dim from a qwen3 GGUF and takes Qwen3Config's 128,
    the head_dim of every released Qwen3, so the tiny model uses it too."""
    hf32 = tiny_hf_model("qwen3", seed=35, head_dim=128)
    hf64 = tiny_hf_model("qwen3", seed=35, head_dim=128).double()
    checkpoint = read_gguf(write_gguf(hf32, tmp_path / "tiny-qwen3.gguf"))
    config = ModelConfig.from_hf_dict(checkpoint.hf_config)
    assert (config.model_type, config.head_dim, config.qk_norm) == ("qwen3", 128, True)
    ours = build_model(config, checkpoint.tensors)
    sequences = random_sequences([9, 2], seed=35)
    for causal in (False, True):
        assert_states_match(ours, hf32, hf64, sequences, causal=causal, what="gguf qwen3")
