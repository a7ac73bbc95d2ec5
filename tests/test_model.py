"""The packed runtime against transformers (fp32, tiny random GQA models of every family).

Tolerance: each sequence's states are compared with an fp64 transformers run; our fp32 error must
be at most twice transformers' own fp32 error plus 1e-6 (``assert_matches_oracle``). Fused
projections and a different attention kernel round differently, never by more than that; a wrong
rope, bias, norm or mask is off by orders of magnitude more.
"""

import dataclasses

import pytest
import torch
from model_helpers import (
    FAMILIES,
    assert_matches_oracle,
    hf_hidden_states,
    random_sequences,
    runtime_from_hf,
    runtime_hidden_states,
    tiny_hf_model,
)

from llm2vec_fast.model import DecoderModel
from llm2vec_fast.packed import Packed

LENGTHS = [7, 1, 13]


@pytest.fixture(scope="module")
def models():
    """Per family: (transformers fp32, transformers fp64, our runtime), same weights."""
    built = {}
    for seed, family in enumerate(FAMILIES):
        hf32 = tiny_hf_model(family, seed=seed)
        built[family] = (hf32, tiny_hf_model(family, seed=seed).double(), runtime_from_hf(hf32))
    return built


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_transformers(models, family, causal):
    hf32, hf64, ours = models[family]
    sequences = random_sequences(LENGTHS, seed=1)
    for ids, states in zip(sequences, runtime_hidden_states(ours, sequences, causal=causal)):
        expected64 = hf_hidden_states(hf64, ids, causal=causal)
        assert_matches_oracle(
            states,
            hf_hidden_states(hf32, ids, causal=causal),
            expected64,
            f"{family} len {len(ids)}",
        )


def test_bidirectional_differs_from_causal(models):
    _, _, ours = models["llama"]
    sequences = random_sequences([9, 1], seed=2)
    bidirectional = runtime_hidden_states(ours, sequences, causal=False)
    causal = runtime_hidden_states(ours, sequences, causal=True)
    assert (bidirectional[0] - causal[0]).abs().amax(
        dim=-1
    ).min() > 1e-2  # every token, even the last
    torch.testing.assert_close(
        bidirectional[1], causal[1], rtol=0, atol=0
    )  # one token: nothing to mask


def test_llama3_rope_scaling_matches_transformers():
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    hf32 = tiny_hf_model("llama", seed=5, rope_parameters=rope)
    hf64 = tiny_hf_model("llama", seed=5, rope_parameters=rope).double()
    ours = runtime_from_hf(hf32)
    assert ours.config.rope_scaling is not None
    sequences = random_sequences([40, 5], seed=3)
    for ids, states in zip(sequences, runtime_hidden_states(ours, sequences, causal=False)):
        assert_matches_oracle(
            states,
            hf_hidden_states(hf32, ids, causal=False),
            hf_hidden_states(hf64, ids, causal=False),
            "llama3",
        )


def test_same_text_same_states_whatever_the_packing(models):
    _, _, ours = models["qwen2"]
    text, *others = random_sequences([11, 3, 17, 1, 6], seed=4)
    alone = runtime_hidden_states(ours, [text], causal=False)[0]
    packings = [
        [text, *others],
        [*others[:2], text],
        [others[3], [], text, others[2]],
        [text, text],
    ]
    for sequences in packings:
        states = runtime_hidden_states(ours, sequences, causal=False)
        position = next(i for i, seq in enumerate(sequences) if seq is text)
        torch.testing.assert_close(states[position], alone)


def test_empty_sequences_are_legal(models):
    _, _, ours = models["llama"]
    with torch.no_grad():
        states = ours(Packed.from_sequences([[], [5, 6], []]))
    assert states.shape == (2, 64) and torch.isfinite(states).all()
    torch.testing.assert_close(states, runtime_hidden_states(ours, [[5, 6]], causal=False)[0])
    nothing = Packed.from_sequences([[], []])  # a batch of nothing but empty sequences
    with torch.no_grad():
        assert ours(nothing).shape == (0, 64)


def test_default_position_ids_restart_per_sequence(models):
    _, _, ours = models["mistral"]
    packed = Packed.from_sequences(random_sequences([4, 6], seed=5))
    explicit = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 4, 5])
    with torch.no_grad():
        default = ours(packed)
        torch.testing.assert_close(
            default, ours(dataclasses.replace(packed, position_ids=explicit)), rtol=0, atol=0
        )
        shifted = ours(dataclasses.replace(packed, position_ids=explicit + 3))
    torch.testing.assert_close(shifted, default)  # RoPE is relative: a common shift changes nothing


def test_qwen2_projection_biases(models):
    hf32, _, ours = models["qwen2"]
    attention = ours.layers[0].self_attn
    assert attention.qkv_proj.bias is not None and attention.o_proj.bias is None
    assert ours.layers[0].mlp.gate_up_proj.bias is None
    hf_attention = hf32.model.layers[0].self_attn
    expected = torch.cat(
        [hf_attention.q_proj.bias, hf_attention.k_proj.bias, hf_attention.v_proj.bias]
    )
    assert torch.equal(attention.qkv_proj.bias, expected)
    assert attention.qkv_split == (64, 32, 32)


def test_llama_attention_and_mlp_bias_match_transformers():
    hf32 = tiny_hf_model("llama", seed=6, attention_bias=True, mlp_bias=True)
    hf64 = tiny_hf_model("llama", seed=6, attention_bias=True, mlp_bias=True).double()
    ours = runtime_from_hf(hf32)
    assert (
        ours.layers[0].self_attn.o_proj.bias is not None
        and ours.layers[0].mlp.down_proj.bias is not None
    )
    ids = random_sequences([9], seed=6)[0]
    states = runtime_hidden_states(ours, [ids], causal=True)[0]
    assert_matches_oracle(
        states,
        hf_hidden_states(hf32, ids, causal=True),
        hf_hidden_states(hf64, ids, causal=True),
        "biased llama",
    )


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_lm_head_weight(tied):
    hf32 = tiny_hf_model("qwen2", seed=7, tie_word_embeddings=tied)
    ours = runtime_from_hf(hf32)
    assert (ours.lm_head is None) == tied
    assert (ours.lm_head_weight is ours.embed_tokens.weight) == tied
    assert torch.equal(ours.lm_head_weight, hf32.lm_head.weight)
    ids = random_sequences([8], seed=7)[0]
    with torch.no_grad():
        expected = hf32(input_ids=torch.tensor([ids])).logits[0]
    logits = runtime_hidden_states(ours, [ids], causal=True)[0] @ ours.lm_head_weight.T
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)


def test_dropout_only_in_train_mode(models):
    _, _, ours = models["llama"]
    packed = Packed.from_sequences(random_sequences([10, 5], seed=8))
    with torch.no_grad():
        plain = ours(packed)
        for attention, hidden in [(0.2, 0.0), (0.0, 0.2)]:
            ours.set_dropout(attention=attention, hidden=hidden)
            try:
                torch.testing.assert_close(ours(packed), plain, rtol=0, atol=0)
                ours.train()
                first = ours(packed)
                second = ours(packed)
            finally:
                ours.eval()
                ours.set_dropout(attention=0.0, hidden=0.0)
            assert (first - plain).abs().max() > 1e-3, (attention, hidden)
            assert (first - second).abs().max() > 1e-3, (attention, hidden)
    with pytest.raises(ValueError, match="hidden dropout must be in"):
        ours.set_dropout(attention=0.1, hidden=1.0)


def test_gradient_checkpointing_gives_the_same_gradients():
    ours = runtime_from_hf(tiny_hf_model("mistral", seed=9)).train()
    packed = Packed.from_sequences(random_sequences([6, 9], seed=9))

    def loss_and_grads(checkpointing: bool):
        ours.set_gradient_checkpointing(checkpointing)
        ours.zero_grad()
        loss = ours(packed).square().mean()
        loss.backward()
        return loss.detach(), {
            name: p.grad.clone() for name, p in ours.named_parameters() if p.grad is not None
        }

    loss, grads = loss_and_grads(False)
    loss_ckpt, grads_ckpt = loss_and_grads(True)
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    assert (
        grads.keys()
        == grads_ckpt.keys()
        == {name for name, _ in ours.named_parameters()} - {"lm_head.weight"}
    )
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], msg=name)
    assert grads["layers.0.self_attn.qkv_proj.weight"].abs().max() > 0


def test_bf16_model_keeps_fp32_rope(models):
    hf32, _, ours32 = models["llama"]
    ours = runtime_from_hf(hf32).to(torch.bfloat16)
    assert ours.rope_inv_freq.dtype == torch.float32
    sequences = random_sequences([12], seed=10)
    states = runtime_hidden_states(ours, sequences, causal=False)[0]
    assert states.dtype == torch.bfloat16
    reference = runtime_hidden_states(ours32, sequences, causal=False)[0]
    assert (
        states.float() - reference
    ).abs().max() < 0.25  # bf16 keeps ~3 significant digits over 2 layers


def test_bad_inputs_are_explained(models):
    _, _, ours = models["llama"]
    ids, positions = torch.tensor([3, 4, 5]), torch.arange(3)
    good = torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D int32"):
        ours(Packed(ids, torch.tensor([0, 3]), positions, 3))
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D int32"):
        ours(Packed(ids[:0], torch.zeros(1, dtype=torch.int32), positions[:0], 0))
    with pytest.raises(ValueError, match="input_ids must be a 1-D integer"):
        ours(Packed(ids[None], good, positions, 3))
    with pytest.raises(ValueError, match="end at T=3"):
        ours(Packed(ids, torch.tensor([0, 2], dtype=torch.int32), positions, 3))
    with pytest.raises(ValueError, match="non-decreasing"):
        ours(Packed(ids, torch.tensor([0, 2, 1, 3], dtype=torch.int32), positions, 3))
    with pytest.raises(ValueError, match="max_seqlen=2 is smaller than the longest sequence"):
        ours(Packed(ids, good, positions, 2))
    with pytest.raises(ValueError, match="position_ids shape"):
        ours(Packed(ids, good, torch.arange(4), 3))


# Tiny windows under sequences of up to 20 tokens: every layer of Mistral slides; Qwen2's layers
# i >= max_window_layers; Qwen3's as its layer_types say (one sliding, one full).
SLIDING = {
    "mistral": dict(sliding_window=5),
    "qwen2": dict(use_sliding_window=True, sliding_window=6, max_window_layers=1),
    "qwen3": dict(
        use_sliding_window=True,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
    ),
}
SLIDING_LAYER_WINDOWS = {"mistral": (5, 5), "qwen2": (None, 6), "qwen3": (4, None)}


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("family", tuple(SLIDING))
def test_sliding_window_matches_transformers(family, causal):
    """Causal passes longer than the window slide as transformers' masks do; bidirectional
    encoding attends over the whole sequence (LLM2Vec's is_causal=False)."""
    hf32 = tiny_hf_model(family, seed=11, **SLIDING[family])
    hf64 = tiny_hf_model(family, seed=11, **SLIDING[family]).double()
    ours = runtime_from_hf(hf32)
    windows = tuple(layer.self_attn.sliding_window for layer in ours.layers)
    assert windows == SLIDING_LAYER_WINDOWS[family]
    sequences = random_sequences([20, 3, 13], seed=11)
    for ids, states in zip(sequences, runtime_hidden_states(ours, sequences, causal=causal)):
        assert_matches_oracle(
            states,
            hf_hidden_states(hf32, ids, causal=causal),
            hf_hidden_states(hf64, ids, causal=causal),
            f"{family} window {windows} len {len(ids)}",
        )


@pytest.mark.parametrize("family", tuple(SLIDING))
def test_sliding_window_changes_causal_states_past_the_window(family):
    """The windowed states differ from full causal attention once a sequence outgrows the
    window, and only there: the equivalence test above could not pass with the window ignored."""
    windowed = runtime_from_hf(tiny_hf_model(family, seed=12, **SLIDING[family]))
    full = DecoderModel(dataclasses.replace(windowed.config, sliding_window=None, layer_types=()))
    full.load_state_dict(windowed.state_dict())
    ids = random_sequences([16], seed=12)[0]
    narrowest = min(w for w in SLIDING_LAYER_WINDOWS[family] if w is not None)
    with_window = runtime_hidden_states(windowed.eval(), [ids], causal=True)[0]
    without = runtime_hidden_states(full.eval(), [ids], causal=True)[0]
    difference = (with_window - without).abs().amax(dim=-1)  # (L,)
    assert difference[:narrowest].max() == 0
    assert difference[-1] > 1e-3
    bidirectional = [runtime_hidden_states(m, [ids], causal=False)[0] for m in (windowed, full)]
    torch.testing.assert_close(*bidirectional, rtol=0, atol=0)


HEAD_DIM_64 = dict(
    hidden_size=256, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2
)
TRITON_CASES = [
    pytest.param("cpu", torch.float32, id="interpreter-fp32"),
    pytest.param(
        "cpu", torch.float16, id="interpreter-fp16"
    ),  # bf16 tl.dot is broken in the interpreter
    *(
        pytest.param("cuda", dtype, id=f"gpu-{str(dtype)[6:]}", marks=pytest.mark.gpu)
        for dtype in (torch.float32, torch.float16, torch.bfloat16)
    ),
]


@pytest.mark.parametrize(("device", "dtype"), TRITON_CASES)
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("family", FAMILIES)
def test_runtime_on_triton_kernels_matches_the_fp64_oracle(
    monkeypatch, family, causal, device, dtype
):
    """The whole runtime on the Triton kernels (the interpreter on a CPU) against fp64 transformers:
    its error at most twice that of transformers in the same dtype on the same device, plus 1e-6
    (DESIGN.md's policy). Head dim 64, GQA 2:1, lengths around a 64-token block."""
    check_on_triton_kernels(monkeypatch, family, causal, device, dtype)


@pytest.mark.parametrize(("device", "dtype"), TRITON_CASES)
@pytest.mark.parametrize(
    ("family", "causal", "options"),
    [
        pytest.param("mistral", True, dict(sliding_window=20), id="mistral-causal-W20"),
        pytest.param(
            "qwen3",
            True,
            dict(
                head_dim=48,
                use_sliding_window=True,
                sliding_window=20,
                layer_types=["full_attention", "sliding_attention"],
            ),
            id="qwen3-causal-W20-D48",
        ),
        pytest.param("qwen3", False, dict(head_dim=48), id="qwen3-bidirectional-D48"),
    ],
)
def test_windows_and_qwen3_on_triton_kernels_match_the_fp64_oracle(
    monkeypatch, family, causal, options, device, dtype
):
    """As above for the sliding-window kernels (windows shorter than the 64-token blocks and the
    sequences) and Qwen3's q/k norms on the Triton rms_norm kernel."""
    check_on_triton_kernels(monkeypatch, family, causal, device, dtype, **options)


def check_on_triton_kernels(monkeypatch, family, causal, device, dtype, **options):
    monkeypatch.setenv("LLM2VEC_FAST_BACKEND", "triton")
    config = dict(HEAD_DIM_64, **options)
    hf64 = tiny_hf_model(family, seed=7, **config).double()
    hf_same = tiny_hf_model(family, seed=7, **config).to(device, dtype)
    ours = runtime_from_hf(tiny_hf_model(family, seed=7, **config)).to(device, dtype)
    sequences = random_sequences(
        [1, 63, 65, 113] if device == "cpu" else [1, 63, 64, 65, 113, 200], seed=8
    )
    with torch.no_grad():
        hidden = ours(Packed.from_sequences(sequences).to(device), causal=causal)  # (T, hidden)
    assert hidden.dtype == dtype
    for ids, states in zip(sequences, hidden.split([len(s) for s in sequences])):
        expected64 = hf_hidden_states(hf64, ids, causal=causal)
        theirs = hf_hidden_states(hf_same, ids, causal=causal).cpu()
        assert_matches_oracle(states.cpu(), theirs, expected64, f"{family} {dtype} len {len(ids)}")
