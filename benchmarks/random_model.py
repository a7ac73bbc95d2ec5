"""Real model configurations with random weights, for benchmarks on machines without weights.

Throughput does not depend on the weight values, so the GPU benchmarks build SmolLM2-135M,
Qwen2-1.5B, Mistral-7B and Llama-3-8B from their config.json values (written out below) with
transformers' own random initialization. ``tiny`` is a two-layer Llama for CPU rehearsals.

A model folder (weights, config, and a byte-level BPE tokenizer trained on the standard
library's docstrings) serves the scripts that load from a path (bench_embed, bench_train):

    python benchmarks/random_model.py smollm2-135m /tmp/smollm2-random [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from workloads import stdlib_text

_COMMON = {"hidden_act": "silu", "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2}

MODEL_CONFIGS: dict[str, dict] = {
    "tiny": {
        **_COMMON,
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 2048,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
    },
    "smollm2-135m": {
        **_COMMON,
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
        "initializer_range": 0.041666666666666664,
    },
    "qwen2-1.5b": {
        **_COMMON,
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "vocab_size": 151936,
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "max_window_layers": 28,
        "sliding_window": 32768,
        "use_sliding_window": False,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
    },
    "mistral-7b": {
        **_COMMON,
        "model_type": "mistral",
        "architectures": ["MistralForCausalLM"],
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 32768,
        "sliding_window": None,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
    },
    "llama-3-8b": {
        **_COMMON,
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    },
}


def config_dict(name: str) -> dict:
    if name not in MODEL_CONFIGS:
        raise KeyError(f"unknown model config {name!r}; expected one of {', '.join(MODEL_CONFIGS)}")
    return dict(MODEL_CONFIGS[name])


def parameter_count(name: str) -> int:
    """Parameters of the base model (embeddings and layers, no separate LM head)."""
    c = MODEL_CONFIGS[name]
    hidden, inner = c["hidden_size"], c["intermediate_size"]
    head_dim = hidden // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * head_dim
    attention = (
        hidden * hidden * 2
        + 2 * hidden * kv
        + (hidden + 2 * kv if c["model_type"] == "qwen2" else 0)
    )
    layer = attention + 3 * hidden * inner + 2 * hidden
    return c["vocab_size"] * hidden + c["num_hidden_layers"] * layer + hidden


def hf_config(name: str, **overrides):
    from transformers import AutoConfig

    values = config_dict(name)
    values.update(overrides)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def random_hf_model(
    name: str,
    *,
    dtype: torch.dtype,
    device: str | torch.device,
    causal_lm: bool = False,
    seed: int = 0,
):
    """A transformers model of this config with random weights, created directly on ``device``,
    eval mode, sdpa attention. ``causal_lm`` adds the LM head (for saving a full checkpoint)."""
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(seed)
    factory = AutoModelForCausalLM if causal_lm else AutoModel
    with torch.device(device):
        model = factory.from_config(hf_config(name, attn_implementation="sdpa"), dtype=dtype)
    return model.eval()


def bpe_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on standard-library docstrings (ids 0-2: pad, bos,
    eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = stdlib_text(max_chars=50 * vocab_size)
    backend.train_from_iterator((text[i : i + 2000] for i in range(0, len(text), 2000)), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def write_model_folder(name: str, folder: Path, *, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A transformers folder for config ``name``: random weights (saved in ``dtype``) and a
    tokenizer."""
    vocab_size = MODEL_CONFIGS[name]["vocab_size"]
    model = random_hf_model(name, dtype=dtype, device="cpu", causal_lm=True)
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 1, 2, 0
    model.save_pretrained(folder)
    bpe_tokenizer(min(vocab_size, 8192)).save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(MODEL_CONFIGS))
    parser.add_argument("folder", type=Path)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    print(write_model_folder(args.name, args.folder, dtype=getattr(torch, args.dtype)))


if __name__ == "__main__":
    main()
