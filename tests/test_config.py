import pytest
import torch
from model_helpers import FAMILIES, tiny_hf_config
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from llm2vec_fast.config import Llama3RopeScaling, ModelConfig, rope_inv_freq

LLAMA3 = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def hf_dict(family: str, **overrides) -> dict:
    return tiny_hf_config(family, **overrides).to_dict()


@pytest.mark.parametrize("family", FAMILIES)
def test_reads_transformers_config(family):
    config = ModelConfig.from_hf_dict(hf_dict(family))
    assert config.model_type == family
    assert (config.vocab_size, config.hidden_size, config.num_layers) == (96, 64, 2)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (4, 2, 16)
    assert config.intermediate_size == 80
    assert config.rms_norm_eps == 1e-5
    assert config.rope_theta == 10000.0 and config.rope_scaling is None
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 0)
    assert config.max_position_embeddings == 256


def test_bias_flags_per_family():
    qwen2 = ModelConfig.from_hf_dict(hf_dict("qwen2"))
    assert (qwen2.qkv_bias, qwen2.o_bias, qwen2.mlp_bias) == (True, False, False)
    llama = ModelConfig.from_hf_dict(hf_dict("llama"))
    assert (llama.qkv_bias, llama.o_bias, llama.mlp_bias) == (False, False, False)
    biased = ModelConfig.from_hf_dict(hf_dict("llama", attention_bias=True, mlp_bias=True))
    assert (biased.qkv_bias, biased.o_bias, biased.mlp_bias) == (True, True, True)


def test_head_dim_explicit_or_derived():
    derived = {k: v for k, v in hf_dict("qwen2").items() if k != "head_dim"}
    assert ModelConfig.from_hf_dict(derived).head_dim == 64 // 4
    explicit = ModelConfig.from_hf_dict(hf_dict("llama", head_dim=32))
    assert explicit.head_dim == 32


def test_sliding_window_recorded():
    assert ModelConfig.from_hf_dict(hf_dict("mistral", sliding_window=128)).sliding_window == 128
    assert ModelConfig.from_hf_dict(hf_dict("mistral", sliding_window=None)).sliding_window is None
    without_key = {k: v for k, v in hf_dict("mistral").items() if k != "sliding_window"}
    assert ModelConfig.from_hf_dict(without_key).sliding_window == 4096  # transformers' default
    assert ModelConfig.from_hf_dict(hf_dict("qwen2", sliding_window=128)).sliding_window is None


@pytest.mark.parametrize("max_window_layers", [None, 0, 1, 2])
def test_qwen2_window_only_when_a_layer_slides(max_window_layers):
    """transformers gives Qwen2's window to layers i >= max_window_layers (default 28) only."""
    options = {} if max_window_layers is None else {"max_window_layers": max_window_layers}
    raw = hf_dict("qwen2", sliding_window=128, use_sliding_window=True, **options)  # 2 layers
    slides = "sliding_attention" in raw["layer_types"]
    assert slides == (max_window_layers in (0, 1))
    assert ModelConfig.from_hf_dict(raw).sliding_window == (128 if slides else None)
    old_style = {
        k: v for k, v in raw.items() if k != "layer_types"
    }  # configs saved before layer_types
    assert ModelConfig.from_hf_dict(old_style).sliding_window == (128 if slides else None)


def test_qwen3_config():
    """Explicit head_dim (transformers' default 128 when absent, not hidden / heads), q/k norms,
    attention_bias on q/k/v and o alike, never an MLP bias."""
    config = ModelConfig.from_hf_dict(hf_dict("qwen3"))
    assert (config.model_type, config.head_dim, config.qk_norm) == ("qwen3", 24, True)
    assert (config.qkv_bias, config.o_bias, config.mlp_bias) == (False, False, False)
    biased = ModelConfig.from_hf_dict(hf_dict("qwen3", attention_bias=True))
    assert (biased.qkv_bias, biased.o_bias, biased.mlp_bias) == (True, True, False)
    without_head_dim = {k: v for k, v in hf_dict("qwen3").items() if k != "head_dim"}
    assert ModelConfig.from_hf_dict(without_head_dim).head_dim == 128
    assert not any(ModelConfig.from_hf_dict(hf_dict(family)).qk_norm for family in FAMILIES)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_layer_types_give_per_layer_windows(family):
    kinds = ["sliding_attention", "full_attention"]
    raw = hf_dict(family, use_sliding_window=True, sliding_window=8, layer_types=kinds)
    config = ModelConfig.from_hf_dict(raw)
    assert [config.layer_window(i) for i in range(2)] == [8, None]
    # transformers drops the window without use_sliding_window, then cannot build the mask
    without_flag = hf_dict(family, sliding_window=8, layer_types=kinds)
    with pytest.raises(ValueError, match="marks sliding_attention layers but the config sets no"):
        ModelConfig.from_hf_dict(without_flag)
    all_full = hf_dict(family, use_sliding_window=True, sliding_window=8, max_window_layers=2)
    config = ModelConfig.from_hf_dict(all_full)
    assert [config.layer_window(i) for i in range(2)] == [None, None]


def test_mistral_window_covers_every_layer_and_llama_has_none():
    mistral = ModelConfig.from_hf_dict(hf_dict("mistral", sliding_window=5))
    assert [mistral.layer_window(i) for i in range(2)] == [5, 5]
    llama = ModelConfig.from_hf_dict(hf_dict("llama"))
    assert [llama.layer_window(i) for i in range(2)] == [None, None]


def test_bad_layer_types_are_refused():
    raw = hf_dict("qwen2", use_sliding_window=True, sliding_window=8)
    with pytest.raises(ValueError, match="layer_types lists 3 layers, the model has 2"):
        ModelConfig.from_hf_dict({**raw, "layer_types": ["sliding_attention"] * 3})
    with pytest.raises(ValueError, match="unsupported layer_types \\['chunked_attention'\\]"):
        ModelConfig.from_hf_dict({**raw, "layer_types": ["sliding_attention", "chunked_attention"]})


def test_tie_word_embeddings():
    assert ModelConfig.from_hf_dict(hf_dict("llama", tie_word_embeddings=True)).tie_word_embeddings
    assert not ModelConfig.from_hf_dict(
        hf_dict("llama", tie_word_embeddings=False)
    ).tie_word_embeddings


def test_old_style_rope_keys():
    raw = {k: v for k, v in hf_dict("llama").items() if k != "rope_parameters"}
    raw.update(rope_theta=500000.0, rope_scaling={"type": "llama3", **LLAMA3})
    config = ModelConfig.from_hf_dict(raw)
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == Llama3RopeScaling(8.0, 1.0, 4.0, 8192)


def test_rope_scaling_beside_different_rope_parameters_is_refused():
    """A model card may say to add rope_scaling to a config saved with rope_parameters; transformers
    then uses rope_scaling alone and silently drops rope_parameters' rope_theta."""
    raw = hf_dict("llama", rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    with pytest.raises(ValueError, match="both rope_parameters and rope_scaling and they differ"):
        ModelConfig.from_hf_dict({**raw, "rope_scaling": {"rope_type": "llama3", **LLAMA3}})
    with pytest.raises(ValueError, match="both rope_parameters and rope_scaling and they differ"):
        ModelConfig.from_hf_dict(
            {**hf_dict("qwen2"), "rope_scaling": {"type": "yarn", "factor": 4.0}}
        )
    same = {
        **raw,
        "rope_scaling": {"type": "default", "rope_theta": 500000.0},
    }  # the same, old key names
    assert ModelConfig.from_hf_dict(same).rope_theta == 500000.0


@pytest.mark.parametrize(
    ("head_dim", "theta", "scaling"),
    [
        (16, 10000.0, None),
        (128, 500000.0, LLAMA3),
        (
            64,
            10000.0,
            {
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 2.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ],
    ids=["default", "llama3.1-8b", "llama3-short-context"],
)
def test_inv_freq_matches_transformers(head_dim, theta, scaling):
    rope = {"rope_type": "llama3" if scaling else "default", "rope_theta": theta, **(scaling or {})}
    hf_config = LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        max_position_embeddings=131072,
        rope_parameters=rope,
    )
    hf_rotary = LlamaRotaryEmbedding(hf_config)
    expected, attention_scaling = hf_rotary.inv_freq, hf_rotary.attention_scaling
    config = ModelConfig.from_hf_dict(hf_config.to_dict())
    ours = config.rope_inv_freq()
    assert attention_scaling == 1.0
    assert ours.dtype == torch.float32 and ours.shape == (head_dim // 2,)
    torch.testing.assert_close(
        ours, expected, rtol=4e-7, atol=0.0
    )  # a few fp32 ulps: we compute in fp64


def test_llama3_scaling_changes_only_low_frequencies():
    plain = rope_inv_freq(128, 500000.0)
    scaled = rope_inv_freq(128, 500000.0, Llama3RopeScaling(8.0, 1.0, 4.0, 8192))
    assert torch.equal(scaled[:8], plain[:8])  # short wavelengths kept
    torch.testing.assert_close(scaled[-8:], plain[-8:] / 8.0)  # long wavelengths divided by factor
    assert ((scaled <= plain) & (scaled >= plain / 8.0)).all()


def test_unsupported_model_type_names_supported_ones():
    with pytest.raises(ValueError, match=r"unsupported model_type 'gpt2'.*llama, mistral, qwen2"):
        ModelConfig.from_hf_dict({**hf_dict("llama"), "model_type": "gpt2"})


def test_unsupported_rope_type():
    raw = hf_dict(
        "llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    )
    with pytest.raises(ValueError, match="unsupported rope type 'dynamic'"):
        ModelConfig.from_hf_dict(raw)


def test_missing_keys_and_bad_values_are_named():
    raw = hf_dict("llama")
    del raw["intermediate_size"]
    with pytest.raises(ValueError, match="missing intermediate_size"):
        ModelConfig.from_hf_dict(raw)
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        ModelConfig.from_hf_dict({**hf_dict("llama"), "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        ModelConfig.from_hf_dict({**hf_dict("llama"), "num_key_value_heads": 3})
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}
    with pytest.raises(
        ValueError, match="llama3 rope scaling is missing low_freq_factor, high_freq_factor"
    ):
        ModelConfig.from_hf_dict({**hf_dict("llama"), "rope_parameters": rope})


def test_from_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_file(tmp_path)
    tiny_hf_config("qwen2").save_pretrained(tmp_path)
    assert ModelConfig.from_file(tmp_path) == ModelConfig.from_hf_dict(hf_dict("qwen2"))
