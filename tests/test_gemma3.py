"""Gemma 3 text in the packed runtime against transformers' ``Gemma3TextModel``.

Tolerance as test_model.py (``assert_matches_oracle``): our fp32 error against an fp64
transformers run at most twice transformers' own fp32 error plus 1e-6 (``gemma3_helpers`` says
how the fp64 run keeps its norms in fp64). A wrong window, RoPE base, norm form or scale is off
by orders of magnitude more.
"""

from pathlib import Path

import pytest
import torch
from gemma3_helpers import (
    FULL,
    SLIDING,
    gemma3_hidden_states,
    gemma3_norms_in_input_dtype,
    tiny_gemma3,
    tiny_gemma3_config,
)
from model_helpers import (
    assert_matches_oracle,
    random_sequences,
    runtime_from_hf,
    runtime_hidden_states,
    save_tiny_folder,
    write_tiny_gguf,
)
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    LlamaConfig,
    SiglipVisionConfig,
)
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from llm2vec_fast.config import LinearRopeScaling, ModelConfig
from llm2vec_fast.kernels import reference
from llm2vec_fast.loading import load_model
from llm2vec_fast.model import embedding_scale
from llm2vec_fast.packed import Packed
from llm2vec_fast.weights import build_model, canonical_tensors, read_gguf, runtime_state_dict

LENGTHS = [7, 1, 13, 20]  # longer and shorter than the window (8; bidirectional |i - j| <= 4)


def assert_states_match(ours, hf32, hf64, sequences, *, causal: bool, what: str) -> None:
    """``hf32`` / ``hf64``: transformers ``Gemma3TextModel``s whose config decides the attention."""
    for ids, states in zip(sequences, runtime_hidden_states(ours, sequences, causal=causal)):
        assert_matches_oracle(
            states,
            gemma3_hidden_states(hf32, ids),
            gemma3_hidden_states(hf64, ids),
            f"{what} len {len(ids)}",
        )


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="plain"),
        pytest.param(
            dict(attention_bias=True, tie_word_embeddings=False, final_logit_softcapping=30.0),
            id="biased-untied-final-softcap",
        ),
    ],
)
def test_matches_transformers(causal, options):
    """Causal: transformers' default Gemma 3. Bidirectional: transformers with
    use_bidirectional_attention, against ``forward(causal=False)`` of that config."""
    options = dict(options, use_bidirectional_attention=not causal)
    hf32 = tiny_gemma3(seed=41, **options)
    hf64 = tiny_gemma3(seed=41, **options).double()
    ours = runtime_from_hf(hf32)
    attention = [layer.self_attn for layer in ours.layers]
    assert attention[0].qkv_split == (4 * 24, 2 * 24, 2 * 24)
    assert [a.sliding_window for a in attention] == [8, None, 8]
    assert [a.bidirectional_window for a in attention] == [5, None, 5]  # |i - j| < 5
    assert [layer.rope_row for layer in ours.layers] == [1, 0, 1]
    assert attention[0].softmax_scale == 32**-0.5
    assert (ours.lm_head is None) == ("tie_word_embeddings" not in options)
    sequences = random_sequences(LENGTHS, seed=41)
    assert_states_match(ours, hf32.model, hf64.model, sequences, causal=causal, what="gemma3")


def test_bidirectional_without_the_flag_is_transformers_with_it():
    """``causal=False`` on a Gemma 3 config without use_bidirectional_attention is transformers'
    result with the flag set (the band on sliding layers), not full attention everywhere."""
    ours = runtime_from_hf(tiny_gemma3(seed=42))
    hf32 = tiny_gemma3(seed=42, use_bidirectional_attention=True)
    hf64 = tiny_gemma3(seed=42, use_bidirectional_attention=True).double()
    sequences = random_sequences(LENGTHS, seed=42)
    assert_states_match(ours, hf32.model, hf64.model, sequences, causal=False, what="unflagged")
    # the band matters at this length: full attention on every layer is far from it
    ids = sequences[-1]
    full_mask = torch.zeros(1, 1, len(ids), len(ids))
    with torch.no_grad():
        everywhere = hf32.model(torch.tensor([ids]), attention_mask=full_mask).last_hidden_state
    assert (everywhere[0] - gemma3_hidden_states(hf32.model, ids)).abs().max() > 1e-2


@pytest.mark.parametrize("window", range(1, 10))
def test_bidirectional_band_is_transformers_halved_window(window):
    """transformers with the flag keeps |i - j| < sliding_window // 2 + 1 (Gemma3TextConfig
    halves the config's window, _bidirectional_window_overlay compares exclusively): the window
    our bidirectional pass gives varlen_attention, whose band is |i - j| < window too."""
    transformers_window = tiny_gemma3_config(
        sliding_window=window, use_bidirectional_attention=True
    ).sliding_window
    raw = tiny_gemma3_config(sliding_window=window).to_dict()
    config = ModelConfig.from_hf_dict(raw)
    assert config.layer_window(0, causal=False) == transformers_window
    assert (config.layer_window(0), config.layer_window(1, causal=False)) == (window, None)


def test_gradients_match_transformers():
    """Training sees transformers' gradients: the (1 + w) norms' weights (stored zero-centred),
    the GeGLU MLP and the scaled embeddings, bidirectional with the band."""
    options = dict(use_bidirectional_attention=True)
    ids = random_sequences([13], seed=49)[0]
    probe = torch.randn(len(ids), 64, generator=torch.Generator().manual_seed(49))
    names = [
        "embed_tokens.weight",
        "layers.0.input_layernorm.weight",
        "layers.0.post_attention_layernorm.weight",
        "layers.2.pre_feedforward_layernorm.weight",
        "layers.1.post_feedforward_layernorm.weight",
        "layers.1.self_attn.k_norm.weight",
        "layers.2.mlp.down_proj.weight",
        "norm.weight",
    ]

    def hf_gradients(model) -> dict[str, torch.Tensor]:
        states = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        (states * probe.to(states.dtype)).sum().backward()
        parameters = dict(model.model.named_parameters())
        return {name: parameters[name].grad for name in names}

    hf32 = tiny_gemma3(seed=49, **options)
    ours = runtime_from_hf(hf32)
    expected32 = hf_gradients(hf32)
    with gemma3_norms_in_input_dtype():
        expected64 = hf_gradients(tiny_gemma3(seed=49, **options).double())
    states = ours(Packed.from_sequences([ids]), causal=False)
    (states * probe).sum().backward()
    parameters = dict(ours.named_parameters())
    for name in names:
        assert_matches_oracle(parameters[name].grad, expected32[name], expected64[name], name)


def test_rope_per_layer_type_matches_transformers():
    """Both RoPE tables equal transformers' buffers, from rope_parameters keyed by layer type and
    from the older rope_theta / rope_local_base_freq / rope_scaling keys."""
    hf = tiny_gemma3(seed=43)
    rotary = hf.model.rotary_emb
    expected = torch.stack([rotary.full_attention_inv_freq, rotary.sliding_attention_inv_freq])
    torch.testing.assert_close(runtime_from_hf(hf).rope_inv_freq, expected, rtol=1e-6, atol=0)

    raw = tiny_gemma3_config().to_dict()
    del raw["rope_parameters"]
    raw.update(
        rope_theta=50_000.0,
        rope_local_base_freq=100.0,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    )
    config = ModelConfig.from_hf_dict(raw)
    assert (config.rope_theta, config.rope_scaling.factor) == (50_000.0, 2.0)
    assert (config.local_rope_theta, config.local_rope_scaling) == (100.0, None)
    torch.testing.assert_close(config.rope_inv_freq(), expected[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(config.rope_inv_freq(local=True), expected[1], rtol=1e-6, atol=0)


def test_linear_rope_scaling_matches_transformers_for_llama_too():
    """Linear scaling (Gemma 3 4B+'s global layers) is read for every family."""
    rope = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10_000.0}
    hf_config = LlamaConfig(hidden_size=128, num_attention_heads=4, rope_parameters=rope)
    config = ModelConfig.from_hf_dict(hf_config.to_dict())
    assert config.rope_scaling == LinearRopeScaling(4.0)
    expected = LlamaRotaryEmbedding(hf_config).inv_freq
    torch.testing.assert_close(config.rope_inv_freq(), expected, rtol=4e-7, atol=0)


def test_layer_kinds_from_sliding_window_pattern():
    """Without layer_types, every sliding_window_pattern-th layer is global (default 6), as
    Gemma3TextConfig builds them."""
    raw = tiny_gemma3_config(num_hidden_layers=7, layer_types=None).to_dict()
    del raw["layer_types"]
    expected = (SLIDING,) * 5 + (FULL, SLIDING)
    assert ModelConfig.from_hf_dict(raw).layer_types == expected
    raw["sliding_window_pattern"] = 2
    assert ModelConfig.from_hf_dict(raw).layer_types == (SLIDING, FULL) * 3 + (SLIDING,)


def test_attention_logit_softcapping_is_refused():
    raw = tiny_gemma3_config(attn_logit_softcapping=50.0).to_dict()
    with pytest.raises(ValueError, match="attn_logit_softcapping=50.0 is not supported"):
        ModelConfig.from_hf_dict(raw)


def test_missing_feedforward_norm_is_named():
    hf = tiny_gemma3(seed=44)
    hf_config = hf.config.to_dict()
    tensors = canonical_tensors(dict(hf.state_dict()), hf_config)
    del tensors["layers.2.pre_feedforward_layernorm.weight"]
    with pytest.raises(ValueError, match=r"lacks 1 weight.*layers\.2\.pre_feedforward_layernorm"):
        runtime_state_dict(ModelConfig.from_hf_dict(hf_config), tensors)


def test_embedding_scale_is_rounded_like_transformers():
    assert embedding_scale(3072, torch.bfloat16) == 55.5  # transformers' own example
    assert embedding_scale(3072, torch.float32) == torch.tensor(3072**0.5).item()


def test_unit_offset_norm_rounds_like_gemma3_rmsnorm():
    """In bf16 the reference equals Gemma3RMSNorm bit for bit: (1 + w) and the product in fp32,
    rounded once (Llama's form rounds the normed row first)."""
    torch.manual_seed(45)
    x = torch.randn(6, 48).bfloat16()
    norm = Gemma3RMSNorm(48, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(0.3 * torch.randn(48))
    norm = norm.bfloat16()
    ours, _ = reference.rms_norm(x, norm.weight.detach(), 1e-6, unit_offset=True)
    assert torch.equal(ours, norm(x).detach())


def test_multimodal_config_reads_its_text_config_with_transformers_defaults():
    """A gemma3 config.json's text_config sets only what differs from Gemma3TextConfig (Gemma 3
    4B's, here): the rest are transformers' defaults, linear scaling on global layers only."""
    text = {
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "model_type": "gemma3_text",
        "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
    }
    raw = {"model_type": "gemma3", "text_config": text, "vision_config": {}}
    config = ModelConfig.from_hf_dict(raw)
    expected = Gemma3Config(text_config=dict(text)).text_config
    assert (config.vocab_size, config.num_heads, config.num_kv_heads, config.head_dim) == (
        expected.vocab_size,
        expected.num_attention_heads,
        expected.num_key_value_heads,
        expected.head_dim,
    )
    assert config.layer_types == tuple(expected.layer_types)
    assert config.query_pre_attn_scalar == expected.query_pre_attn_scalar
    assert config.tie_word_embeddings and config.sliding_window == 1024
    assert (config.rope_theta, config.rope_scaling.factor) == (1_000_000.0, 8.0)
    assert (config.local_rope_theta, config.local_rope_scaling) == (10_000.0, None)
    parameters = expected.rope_parameters
    assert parameters[FULL]["rope_type"] == "linear"
    assert parameters[SLIDING]["rope_theta"] == config.local_rope_theta


def _tiny_multimodal(seed: int) -> Gemma3ForConditionalGeneration:
    """A random Gemma3ForConditionalGeneration around the tiny text config (a one-layer vision
    tower whose weights the runtime must leave out)."""
    vision = SiglipVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    config = Gemma3Config(
        text_config=tiny_gemma3_config().to_dict(),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=4,
        image_token_index=95,
        boi_token_index=93,
        eoi_token_index=94,
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(0.2 * noise if name.endswith("norm.weight") else noise / param.shape[-1])
    return model


def test_multimodal_checkpoint_loads_its_language_model(tmp_path):
    """A saved gemma3 (image-text) folder: its text_config, and the language model's weights
    under either prefix layout, vision weights left out."""
    hf = _tiny_multimodal(seed=46)
    folder = save_tiny_folder(hf, tmp_path / "gemma3")
    model, _ = load_model(folder)
    assert model.config.model_type == "gemma3_text"
    assert model.config.layer_types == (SLIDING, FULL, SLIDING)
    hf64 = _tiny_multimodal(seed=46).double()
    sequences = random_sequences([9, 3], seed=46)
    text32, text64 = hf.model.language_model, hf64.model.language_model
    assert_states_match(model, text32, text64, sequences, causal=True, what="gemma3 multimodal")

    hf_config = hf.config.to_dict()
    google_names = {
        key.replace("model.language_model.", "language_model.model.").replace(
            "model.vision_tower.", "vision_tower."
        ): value
        for key, value in hf.state_dict().items()
    }
    assert any(key.startswith("vision_tower.") for key in google_names)
    assert canonical_tensors(google_names, hf_config).keys() == model_state_names(hf)


def model_state_names(hf: Gemma3ForConditionalGeneration) -> set[str]:
    return {key for key in hf.model.language_model.state_dict() if "rotary_emb" not in key}


def write_gemma3_gguf(hf_model, path: Path) -> Path:
    """An fp32 GGUF file of a transformers Gemma 3 as llama.cpp writes it: norm weights stored as
    1 + w (transformers' GGUF loader subtracts the 1 again), no output.weight (tied)."""
    config = hf_model.config
    tensors = {
        key: value + 1.0 if key.endswith("norm.weight") else value
        for key, value in hf_model.state_dict().items()
        if key != "lm_head.weight"
    }
    rope_theta = config.rope_parameters[FULL]["rope_theta"]
    return write_tiny_gguf(
        path, "gemma3", config, tensors, rope_theta=rope_theta, sliding_window=config.sliding_window
    )


def test_gguf_file_reads_like_transformers(tmp_path):
    """A Gemma 3 GGUF through transformers' GGUF loader into the runtime. transformers reads no
    layer kinds, query_pre_attn_scalar or local RoPE base from a gemma3 GGUF and takes
    Gemma3TextConfig's defaults (every 6th layer global, 256, 10000), so the tiny model uses
    them too."""
    gguf_defaults = dict(
        num_hidden_layers=6,
        layer_types=None,
        query_pre_attn_scalar=256,
        rope_parameters={FULL: {"rope_type": "default", "rope_theta": 50_000.0}},
    )
    hf32 = tiny_gemma3(seed=47, **gguf_defaults)
    hf64 = tiny_gemma3(seed=47, **gguf_defaults).double()
    checkpoint = read_gguf(write_gemma3_gguf(hf32, tmp_path / "tiny-gemma3.gguf"))
    config = ModelConfig.from_hf_dict(checkpoint.hf_config)
    assert (config.model_type, config.head_dim, config.sliding_window) == ("gemma3_text", 24, 8)
    assert config.layer_types == (SLIDING,) * 5 + (FULL,)
    assert (config.rope_theta, config.local_rope_theta) == (50_000.0, 10_000.0)
    ours = build_model(config, checkpoint.tensors)
    sequences = random_sequences([9, 2], seed=47)
    assert_states_match(ours, hf32.model, hf64.model, sequences, causal=True, what="gguf gemma3")


# The interpreter runs the bidirectional pass only (the band and the full layers; causal
# windows are test_model.py's), the GPU both.
TRITON_CASES = [
    pytest.param("cpu", torch.float32, False, id="interpreter-fp32-bidirectional"),
    *(
        pytest.param(
            "cuda", dtype, causal, id=f"gpu-{str(dtype)[6:]}-{name}", marks=pytest.mark.gpu
        )
        for dtype in (torch.float32, torch.float16, torch.bfloat16)
        for causal, name in ((False, "bidirectional"), (True, "causal"))
    ),
]


@pytest.mark.parametrize(("device", "dtype", "causal"), TRITON_CASES)
def test_runtime_on_triton_kernels_matches_the_fp64_oracle(monkeypatch, device, dtype, causal):
    """The whole Gemma 3 runtime on the Triton kernels (the interpreter on a CPU: the unit-offset
    norm, the windowed attention with its own scale, RoPE per layer kind) against fp64
    transformers, with test_model.py's policy: at most twice transformers' error in the same
    dtype on the same device, plus 1e-6. Head dim 64, lengths around a 64-token block."""
    monkeypatch.setenv("LLM2VEC_FAST_BACKEND", "triton")
    options = dict(
        hidden_size=128, head_dim=64, intermediate_size=160, use_bidirectional_attention=not causal
    )
    hf64 = tiny_gemma3(seed=48, **options).double()
    hf_same = tiny_gemma3(seed=48, **options).to(device, dtype)
    ours = runtime_from_hf(tiny_gemma3(seed=48, **options)).to(device, dtype)
    lengths = [1, 30, 70] if device == "cpu" else [1, 63, 64, 65, 113, 200]
    sequences = random_sequences(lengths, seed=48)
    with torch.no_grad():
        hidden = ours(Packed.from_sequences(sequences).to(device), causal=causal)  # (T, hidden)
    assert hidden.dtype == dtype
    for ids, states in zip(sequences, hidden.split(lengths)):
        assert_matches_oracle(
            states.cpu(),
            gemma3_hidden_states(hf_same.model, ids).cpu(),
            gemma3_hidden_states(hf64.model, ids),
            f"gemma3 {dtype} len {len(ids)}",
        )
