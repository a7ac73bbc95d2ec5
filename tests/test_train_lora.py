"""LoRA on the fused projections: peft-format save, and the same outputs as peft on transformers."""

import copy

import pytest
import torch
from model_helpers import random_sequences, runtime_from_hf, runtime_hidden_states, tiny_hf_model

from llm2vec_fast.loading import load_model
from llm2vec_fast.packed import Packed
from llm2vec_fast.train.lora import (
    add_lora,
    load_lora_state_dict,
    lora_modules,
    lora_state_dict,
    save_adapter,
)


def _random_lora_(model, seed: int) -> None:
    """Non-zero B matrices (B starts at zero), so every delta is visible."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in lora_modules(model):
            for b in module.lora_B:
                b.copy_(0.05 * torch.randn(b.shape, generator=generator))


def _peft_hidden(
    hf_model, folder, layout: str, sequences: list[list[int]], dtype: torch.dtype
) -> list[torch.Tensor]:
    """transformers + peft (causal attention, its default), one sequence at a time."""
    from peft import PeftModel

    base = copy.deepcopy(hf_model).to(dtype)
    target = base if layout == "causal_lm" else base.model
    PeftModel.from_pretrained(target, str(folder)).eval()  # injects the LoRA layers in place
    with torch.no_grad():
        return [base.model(input_ids=torch.tensor([ids])).last_hidden_state[0] for ids in sequences]


@pytest.mark.parametrize(
    ("family", "layout"), [("llama", "llm2vec"), ("qwen2", "causal_lm"), ("qwen3", "causal_lm")]
)
def test_saved_adapter_loads_in_peft_with_the_same_outputs(tmp_path, family, layout):
    hf_model = tiny_hf_model(family, seed=1)
    ours = add_lora(runtime_from_hf(hf_model), r=4, alpha=8.0, dropout=0.05).eval()
    _random_lora_(ours, seed=2)
    folder = save_adapter(
        ours, tmp_path / "adapter", base_model_name_or_path="unused", layout=layout
    )
    prefix = "base_model.model.model." if layout == "causal_lm" else "base_model.model."
    assert f"{prefix}layers.1.self_attn.k_proj.lora_B.weight" in lora_state_dict(ours, layout)

    sequences = random_sequences([7, 12], seed=3)
    ours_states = runtime_hidden_states(ours, sequences, causal=True)
    peft32 = _peft_hidden(hf_model, folder, layout, sequences, torch.float32)
    peft64 = _peft_hidden(hf_model, folder, layout, sequences, torch.float64)
    for state, p32, p64 in zip(ours_states, peft32, peft64):
        ours_error = (state.double() - p64).abs().max().item()
        peft_error = (p32.double() - p64).abs().max().item()
        assert ours_error <= 2 * peft_error + 1e-6, (
            f"{ours_error:.3e} vs peft fp32 {peft_error:.3e}"
        )
    # the adapter changes the outputs, so peft agreeing means peft loaded every LoRA weight
    plain = runtime_hidden_states(runtime_from_hf(hf_model), sequences, causal=True)
    assert (plain[0] - ours_states[0]).abs().max() > 1e-3


def test_merged_by_load_model_matches_the_lora_model(tmp_path):
    from model_helpers import save_tiny_folder

    hf_model = tiny_hf_model("llama", seed=4)
    base = save_tiny_folder(hf_model, tmp_path / "base")
    ours = add_lora(runtime_from_hf(hf_model), r=4, alpha=8.0).eval()
    _random_lora_(ours, seed=5)
    folder = save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(base))
    merged, _ = load_model(folder)
    sequences = random_sequences([5, 9, 1], seed=6)
    for a, b in zip(
        runtime_hidden_states(ours, sequences, causal=False),
        runtime_hidden_states(merged, sequences, causal=False),
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_only_lora_weights_train_and_all_get_gradients():
    model = add_lora(runtime_from_hf(tiny_hf_model("mistral", seed=7)), r=2, alpha=4.0).train()
    _random_lora_(model, seed=8)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    # 2 layers x (q, k, v, o, gate, up, down) x (A, B)
    assert len(trainable) == 2 * 7 * 2
    packed = Packed.from_sequences(random_sequences([6], seed=9))
    model(packed).square().mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_lora_state_round_trip_and_errors():
    source = add_lora(runtime_from_hf(tiny_hf_model("llama", seed=10)), r=2, alpha=4.0)
    _random_lora_(source, seed=11)
    target = add_lora(runtime_from_hf(tiny_hf_model("llama", seed=10)), r=2, alpha=4.0)
    load_lora_state_dict(target, lora_state_dict(source, "causal_lm"))
    for key, value in lora_state_dict(source).items():
        torch.testing.assert_close(lora_state_dict(target)[key], value, rtol=0, atol=0)
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(target)
    with pytest.raises(ValueError, match="does not fit"):
        load_lora_state_dict(
            target, {"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 64)}
        )
