"""LoRA for training on the runtime's fused projections, saved in peft's format.

Each fused projection (``qkv_proj`` = q/k/v, ``gate_up_proj`` = gate/up) gets one low-rank pair
per sub-projection, exactly as peft gives ``q_proj``, ``k_proj``, ... their own ``lora_A`` and
``lora_B``: ``y = W x + b + scale * [B_q A_q x ; B_k A_k x ; B_v A_v x]`` with
``scale = alpha / r``. The base weights are frozen. One dropout mask on the input is shared by
the sub-projections of a fused layer (peft draws one per projection; both are dropout on the
LoRA input, so training is statistically the same).

The targets are the seven projections of every family (llm2vec's ``initialize_peft`` list for
Llama, Mistral, Gemma and Qwen2, kept for Qwen3 and Gemma 3): Gemma 3's GeGLU has the same
gate/up/down names. Norms are never targets: Qwen3's and Gemma 3's q/k norms stay frozen and
apply to the adapted q and k, where peft's LoRA on ``q_proj`` / ``k_proj`` puts them too.

``save_adapter`` writes ``adapter_config.json`` + ``adapter_model.safetensors`` with peft's key
names (``llm2vec_fast.adapters``), which ``llm2vec_fast.loading``, peft and the ``llm2vec``
package load.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..adapters import ADAPTER_KEY_PREFIXES, TARGET_MODULES, lora_key, strip_key_prefix
from ..files import write_atomically
from ..model import DecoderModel
from ..settings import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` whose output rows split into named parts, each with a LoRA pair."""

    def __init__(
        self, base: nn.Linear, parts: dict[str, int], r: int, alpha: float, dropout: float
    ) -> None:
        super().__init__()
        if sum(parts.values()) != base.out_features:
            raise ValueError(f"parts {parts} do not add up to the {base.out_features} output rows")
        self.base = base
        self.base.requires_grad_(False)
        self.part_names = tuple(parts)
        self.part_sizes = tuple(parts.values())
        self.r = r
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device, dtype = base.weight.device, torch.float32  # fp32 LoRA weights under a bf16 base
        self.lora_A = nn.ParameterList(
            nn.Parameter(torch.empty(r, base.in_features, device=device, dtype=dtype))
            for _ in parts
        )  # each (r, in)
        self.lora_B = nn.ParameterList(
            nn.Parameter(torch.zeros(size, r, device=device, dtype=dtype))
            for size in self.part_sizes
        )  # each (out_part, r)
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # peft's default initialisation

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # (T, out)
        low = self.dropout(x).float() @ torch.cat(list(self.lora_A)).T  # (T, parts * r)
        deltas = [
            part @ b.T for part, b in zip(low.split(self.r, dim=-1), self.lora_B)
        ]  # each (T, out_part)
        return out + (self.scale * torch.cat(deltas, dim=-1)).to(out.dtype)


def _targets(model: DecoderModel) -> list[tuple[str, nn.Module, str, dict[str, int]]]:
    """``(layer prefix, parent module, attribute, {peft module name: rows})`` of every
    projection."""
    found = []
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        q, k, v = attn.qkv_split
        gate, up = mlp.gate_up_split
        found += [
            (f"layers.{i}.self_attn", attn, "qkv_proj", {"q_proj": q, "k_proj": k, "v_proj": v}),
            (f"layers.{i}.self_attn", attn, "o_proj", {"o_proj": attn.o_proj.out_features}),
            (f"layers.{i}.mlp", mlp, "gate_up_proj", {"gate_proj": gate, "up_proj": up}),
            (f"layers.{i}.mlp", mlp, "down_proj", {"down_proj": mlp.down_proj.out_features}),
        ]
    return found


def add_lora(
    model: DecoderModel, r: int = 16, alpha: float = 32.0, dropout: float = 0.05
) -> DecoderModel:
    """Freeze every weight of ``model`` and wrap its projections with trainable LoRA pairs (in
    place)."""
    if r < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {r}")
    if lora_modules(model):
        raise ValueError("the model already has LoRA layers")
    model.requires_grad_(False)
    for _, parent, attribute, parts in _targets(model):
        setattr(parent, attribute, LoRALinear(getattr(parent, attribute), parts, r, alpha, dropout))
    model.lora_config = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout}
    return model


def lora_modules(model: DecoderModel) -> list[tuple[str, LoRALinear]]:
    """``(layer prefix, LoRALinear)`` of every wrapped projection, in model order."""
    found = []
    for prefix, parent, attribute, _ in _targets(model):
        module = getattr(parent, attribute)
        if isinstance(module, LoRALinear):
            found.append((prefix, module))
    return found


def lora_state_dict(model: DecoderModel, layout: str = "llm2vec") -> dict[str, torch.Tensor]:
    """The LoRA matrices under peft's key names (``...q_proj.lora_A.weight``), on the CPU."""
    if layout not in ADAPTER_KEY_PREFIXES:
        raise ValueError(
            f"unknown adapter layout {layout!r}; expected one of {', '.join(ADAPTER_KEY_PREFIXES)}"
        )
    prefix = ADAPTER_KEY_PREFIXES[layout]
    state = {}
    for layer_prefix, module in lora_modules(model):
        for name, a, b in zip(module.part_names, module.lora_A, module.lora_B):
            module_name = f"{layer_prefix}.{name}"
            state[lora_key(prefix, module_name, "A")] = a.detach().cpu().contiguous()
            state[lora_key(prefix, module_name, "B")] = b.detach().cpu().contiguous()
    return state


def load_lora_state_dict(model: DecoderModel, state: dict[str, torch.Tensor]) -> None:
    """Copy saved LoRA matrices (either layout) back into the model's LoRA layers."""
    expected = lora_state_dict(model, "llm2vec")
    prefix = ADAPTER_KEY_PREFIXES["llm2vec"]
    renamed = {prefix + strip_key_prefix(key): value for key, value in state.items()}
    missing = sorted(set(expected) - set(renamed))
    unexpected = sorted(set(renamed) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"LoRA state does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    with torch.no_grad():
        for layer_prefix, module in lora_modules(model):
            for name, a, b in zip(module.part_names, module.lora_A, module.lora_B):
                a.copy_(renamed[lora_key(prefix, f"{layer_prefix}.{name}", "A")])
                b.copy_(renamed[lora_key(prefix, f"{layer_prefix}.{name}", "B")])


def adapter_config(model: DecoderModel, base_model_name_or_path: str) -> dict:
    """peft's ``adapter_config.json`` for these LoRA layers."""
    settings = model.lora_config
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": settings["r"],
        "lora_alpha": settings["lora_alpha"],
        "lora_dropout": settings["lora_dropout"],
        "target_modules": list(TARGET_MODULES),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_adapter(
    model: DecoderModel, folder: str | Path, base_model_name_or_path: str, layout: str = "llm2vec"
) -> Path:
    """Write the adapter in peft's format; each file is replaced atomically.

    ``layout="llm2vec"`` (default) keys the weights for the bare decoder, as llm2vec's MNTP,
    SimCSE and supervised adapters are (loaded by ``llm2vec.LLM2Vec`` and by peft on
    ``AutoModel``); ``"causal_lm"`` keys them for peft on ``AutoModelForCausalLM``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = lora_state_dict(model, layout)
    if not state:
        raise ValueError("the model has no LoRA layers to save")
    write_atomically(
        folder / ADAPTER_WEIGHTS_FILE,
        lambda path: save_file(state, str(path), metadata={"format": "pt"}),
    )
    config = adapter_config(model, base_model_name_or_path)
    write_atomically(
        folder / ADAPTER_CONFIG_FILE,
        lambda path: path.write_text(json.dumps(config, indent=2) + "\n"),
    )
    return folder
