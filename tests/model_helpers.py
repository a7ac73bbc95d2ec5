"""Tiny random transformers models and the transformers oracle for the runtime tests.

Bidirectional reference: transformers 5.x returns a ready 4D attention mask unchanged
(``masking_utils._preprocess_mask_arguments``), so an all-zero additive mask ``(1, 1, L, L)``
with the eager attention makes every token see every other token of the sequence: the
``is_causal=False`` semantics LLM2Vec gives these models. Causal reference: the default call.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from llm2vec_fast.config import ModelConfig
from llm2vec_fast.model import DecoderModel
from llm2vec_fast.packed import Packed
from llm2vec_fast.weights import build_model, canonical_tensors

VOCAB = 96
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA 2:1
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
CONFIG_CLASSES = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
}
# The families whose head_dim is hidden / heads (16 here); Qwen3 has its own tests.
FAMILIES = ("llama", "mistral", "qwen2")
# Qwen3: head_dim explicit and unlike hidden / heads, so that q/k/v sizes cannot be derived wrongly.
FAMILY_DEFAULTS = {"qwen3": dict(head_dim=24)}


def tiny_hf_config(family: str, **overrides):
    values = dict(TINY, attn_implementation="eager", **FAMILY_DEFAULTS.get(family, {}))
    values.update(overrides)
    return CONFIG_CLASSES[family](**values)


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights with visible structure: norms around 1, biases and projections clearly non-zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)
            else:
                param.copy_(noise / param.shape[-1] ** 0.5)
    return model


def tiny_hf_model(family: str, seed: int = 0, **overrides):
    """A random transformers causal LM of the family, fp32, eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(family, **overrides))
    return randomize_(model, seed).eval()


def runtime_from_hf(hf_model) -> DecoderModel:
    """Our runtime holding the same weights as a transformers model."""
    hf_config = hf_model.config.to_dict()
    tensors = canonical_tensors(dict(hf_model.state_dict()), hf_config)
    return build_model(ModelConfig.from_hf_dict(hf_config), tensors)


def hf_hidden_states(hf_model, ids: list[int], *, causal: bool) -> torch.Tensor:
    """transformers' last hidden states ``(L, hidden)`` for one sequence run alone."""
    param = next(hf_model.parameters())
    input_ids = torch.tensor([ids], device=param.device)
    mask = (
        None
        if causal
        else torch.zeros(1, 1, len(ids), len(ids), dtype=param.dtype, device=param.device)
    )
    with torch.no_grad():
        out = hf_model.model(input_ids=input_ids, attention_mask=mask)
    return out.last_hidden_state[0]


def runtime_hidden_states(
    model: DecoderModel, sequences: list[list[int]], *, causal: bool
) -> list[torch.Tensor]:
    """Our runtime on all sequences packed together, split back per sequence."""
    with torch.no_grad():
        hidden = model(Packed.from_sequences(sequences), causal=causal)
    return list(hidden.split([len(seq) for seq in sequences]))


def random_sequences(lengths: list[int], seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (length,), generator=generator).tolist() for length in lengths]


def assert_matches_oracle(
    ours: torch.Tensor, hf32: torch.Tensor, hf64: torch.Tensor, what: str
) -> None:
    """Our states may be off the fp64 oracle by at most 2x the error of transformers in the same
    dtype, plus 1e-6 (about 10 fp32 ulps at the unit scale of normed states) for where both round
    alike."""
    ours_error = (ours.double() - hf64).abs().max().item()
    hf_error = (hf32.double() - hf64).abs().max().item()
    assert ours_error <= 2 * hf_error + 1e-6, (
        f"{what}: error {ours_error:.3e} vs transformers fp32 {hf_error:.3e}"
    )


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny vocabulary (ids 0-2 are pad/bos/eos)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def save_tiny_folder(hf_model, folder: Path, **save_kwargs) -> Path:
    """A transformers folder (weights, config, tokenizer) as ``save_pretrained`` writes it."""
    hf_model.save_pretrained(folder, **save_kwargs)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def write_tiny_gguf(
    path: Path,
    arch: str,
    config,
    tensors: dict[str, torch.Tensor],
    *,
    rope_theta: float,
    sliding_window: int | None = None,
) -> Path:
    """An fp32 GGUF file of a tiny model as llama.cpp names it (gguf's tensor name map of
    ``arch``), with the metadata transformers' GGUF loader reads; ``tensors`` keyed by
    transformers' state-dict names, as llama.cpp stores them."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_embedding_length(config.hidden_size)
    writer.add_rope_freq_base(rope_theta)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if sliding_window is not None:
        writer.add_sliding_window(sliding_window)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"w{i}" for i in range(config.vocab_size)])
    writer.add_token_types([1] * config.vocab_size)
    writer.add_token_merges([])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    for key, value in tensors.items():
        writer.add_tensor(names.get_name(key, try_suffixes=(".weight",)), value.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
