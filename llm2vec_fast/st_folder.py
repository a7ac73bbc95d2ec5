"""sentence-transformers model folders on the packed runtime.

A folder that ``SentenceTransformer(FOLDER)`` loads (``modules.json``: Transformer, Pooling, then
optional Dense layers and Normalize) is read here into what our encoder needs: where the
Transformer's weights and tokenizer are, how texts are tokenized (prompts, ``max_seq_length``,
``do_lower_case``, the tokenizer's own special tokens) and a small head applied to the runtime's
last hidden states (pooling -> dense* -> normalize), with sentence-transformers' numbers.

Pooling modes map to ``masked_pool`` where its modes mean the same (``mean``; ``lasttoken``;
``cls`` and ``weightedmean`` when every token is pooled); ``max``, ``mean_sqrt_len_tokens`` and
``cls`` / ``weightedmean`` with ``include_prompt=False`` are plain PyTorch over the packed tokens
(sentence-transformers weighs a token by its position in the whole sequence, the prompt
included, which the kernel's 1..L over the pooled tokens does not).
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .files import read_json_object
from .kernels.reference import sequence_ids
from .packed import Packed
from .settings import CONFIG_FILE, SAFETENSORS_FILE
from .text import TokenizedText, as_instruction_pairs

MODULES_FILE = "modules.json"
SENTENCE_BERT_CONFIG_FILE = "sentence_bert_config.json"
ST_CONFIG_FILE = "config_sentence_transformers.json"
MODULE_CONFIG_FILE = "config.json"

ST_POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# the legacy boolean keys of a Pooling config.json, in sentence-transformers' concatenation order
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# prompts every SentenceTransformer has ("" unless the folder sets them): encode_query and
# encode_document pick them, and an empty prompt means none
_DEFAULT_PROMPTS = {"query": "", "document": ""}
DOCUMENT_PROMPT_NAMES = ("document", "passage", "corpus")


def is_sentence_transformers_folder(path: str | Path) -> bool:
    """A folder with sentence-transformers modules to run; not one ``llm2vec-fast export``
    wrote (its only module is our ``LLM2VecModule``: an llm2vec folder with prompts)."""
    modules_path = Path(path) / MODULES_FILE
    if not modules_path.is_file():
        return False
    with open(modules_path, encoding="utf-8") as handle:
        listed = json.load(handle)
    first = str(listed[0].get("type", "")) if isinstance(listed, list) and listed else ""
    return not (first.startswith("llm2vec_fast.") and first.endswith(".LLM2VecModule"))


def read_prompts(path: str | Path) -> tuple[dict[str, str], str | None]:
    """The prompts and default prompt name of config_sentence_transformers.json, with the
    empty ``query`` and ``document`` prompts every SentenceTransformer has; none without it."""
    config_path = Path(path) / ST_CONFIG_FILE
    if not config_path.is_file():
        return {}, None
    config = read_json_object(config_path)
    prompts = {**_DEFAULT_PROMPTS, **(config.get("prompts") or {})}
    default_prompt_name = config.get("default_prompt_name")
    if default_prompt_name is not None and default_prompt_name not in prompts:
        raise ValueError(
            f"{config_path}: default_prompt_name {default_prompt_name!r} is not one of its"
            f" prompts ({', '.join(prompts)})"
        )
    return prompts, default_prompt_name


class Dense(nn.Module):
    """sentence-transformers' Dense: ``activation(linear(x))`` (+ x, or a projection of x, with
    ``use_residual``)."""

    def __init__(
        self,
        linear: nn.Linear,
        activation: nn.Module,
        use_residual: bool = False,
        residual: nn.Linear | None = None,
    ):
        super().__init__()
        self.linear = linear
        self.activation = activation
        self.use_residual = use_residual
        self.residual = residual  # projects x when use_residual changes the width

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in) -> (B, out)
        out = self.activation(self.linear(x))
        if self.use_residual:
            out = out + (x if self.residual is None else self.residual(x))
        return out


@dataclass
class SentenceHead:
    """Pooling -> Dense layers -> Normalize, on the runtime's packed last hidden states."""

    pooling_modes: tuple[str, ...]
    include_prompt: bool = True
    dense: list[Dense] = field(default_factory=list)
    normalize: bool = False
    files: list[Path] = field(default_factory=list)  # the folder's files that decide the head

    def output_dim(self, hidden_size: int) -> int:
        if self.dense:
            return self.dense[-1].linear.out_features
        return hidden_size * len(self.pooling_modes)

    def to(self, device: torch.device) -> "SentenceHead":
        for layer in self.dense:
            layer.to(device)
        return self

    def describe(self) -> dict:
        return {
            "pooling_mode": list(self.pooling_modes),
            "include_prompt": self.include_prompt,
            "dense": [
                [layer.linear.in_features, layer.linear.out_features, _activation_name(layer)]
                for layer in self.dense
            ],
            "normalize": self.normalize,
        }

    def __call__(self, hidden: torch.Tensor, packed: Packed) -> torch.Tensor:
        """hidden ``(T, H)`` of ``packed`` -> ``(B, output_dim)`` fp32."""
        pooled = torch.cat(
            [pool(hidden, packed, mode) for mode in self.pooling_modes], dim=-1
        )  # (B, H * modes)
        for layer in self.dense:
            pooled = layer(pooled)
        if self.normalize:
            pooled = F.normalize(pooled, p=2, dim=-1)
        return pooled


def _activation_name(layer: Dense) -> str:
    return f"{type(layer.activation).__module__}.{type(layer.activation).__name__}"


def pool(hidden: torch.Tensor, packed: Packed, pooling_mode: str) -> torch.Tensor:
    """One sentence-transformers pooling mode over the tokens ``packed.pool_mask`` marks (all
    tokens when None, else those after an excluded prompt): ``(T, H)`` -> ``(B, H)`` fp32."""
    cu_seqlens = packed.cu_seqlens
    batch, total = packed.batch_size, hidden.shape[0]
    mask = packed.pool_mask
    # cls / weightedmean over every token are the kernel's (the check syncs with a GPU)
    every_token = pooling_mode in ("cls", "weightedmean") and (mask is None or bool(mask.all()))
    if mask is None:
        mask = torch.ones(total, dtype=torch.bool, device=hidden.device)
    if pooling_mode == "mean":
        return kernels.masked_pool(hidden, cu_seqlens, "mean", mask, check_cu_seqlens=False).float()
    if pooling_mode == "cls" and every_token:
        return kernels.masked_pool(hidden, cu_seqlens, "bos_token", check_cu_seqlens=False).float()
    if pooling_mode == "weightedmean" and every_token:
        weighted = kernels.masked_pool(hidden, cu_seqlens, "weighted_mean", check_cu_seqlens=False)
        return weighted.float()
    seq = sequence_ids(cu_seqlens, total)  # (T,)
    counts = torch.zeros(batch, device=hidden.device).index_add_(0, seq, mask.float())  # (B,)
    if pooling_mode == "lasttoken":  # zeros where nothing is pooled, as sentence-transformers
        last = kernels.masked_pool(hidden, cu_seqlens, "last_token", check_cu_seqlens=False)
        return torch.where(counts[:, None] > 0, last.float(), 0.0)
    hidden = hidden.float()
    if pooling_mode == "cls":  # the first pooled token; the first token when none is pooled
        positions = torch.arange(total, device=hidden.device)
        first = torch.full((batch,), total, device=hidden.device, dtype=torch.long)
        first = first.scatter_reduce(0, seq[mask], positions[mask], reduce="amin")
        first = torch.where(counts > 0, first, cu_seqlens[:-1].long())
        return hidden[first.clamp(max=max(total - 1, 0))]
    if pooling_mode == "max":  # -inf where nothing is pooled, as sentence-transformers gives
        best = torch.full((batch, hidden.shape[1]), float("-inf"), device=hidden.device)
        index = seq[mask][:, None].expand(-1, hidden.shape[1])
        return best.scatter_reduce(0, index, hidden[mask], reduce="amax")
    if pooling_mode == "mean_sqrt_len_tokens":
        sums = torch.zeros(batch, hidden.shape[1], device=hidden.device)
        sums.index_add_(0, seq[mask], hidden[mask])
        return sums / counts.clamp(min=1e-9).sqrt()[:, None]
    if pooling_mode == "weightedmean":  # weight: the token's position in its sequence, from 1
        offsets = cu_seqlens[:-1].long()[seq]
        weights = (torch.arange(total, device=hidden.device) - offsets + 1).float() * mask
        sums = torch.zeros(batch, hidden.shape[1], device=hidden.device)
        sums.index_add_(0, seq, hidden * weights[:, None])
        total_weight = torch.zeros(batch, device=hidden.device).index_add_(0, seq, weights)
        return sums / total_weight.clamp(min=1e-9)[:, None]
    raise ValueError(f"unknown pooling mode {pooling_mode!r}; expected one of {ST_POOLING_MODES}")


@dataclass
class SentenceTransformersFolder:
    """What ``SentenceTransformer(path)`` would run, read from its files."""

    path: Path
    transformer_path: Path  # the Transformer module's folder: config.json, weights, tokenizer
    head: SentenceHead
    max_seq_length: int | None  # None: the tokenizer's model_max_length, capped by the config
    do_lower_case: bool
    prompts: dict[str, str]
    default_prompt_name: str | None
    causal: bool


def read_folder(path: str | Path) -> SentenceTransformersFolder:
    """Parse a sentence-transformers folder; a module this runtime cannot run is refused."""
    path = Path(path)
    modules = _read_modules(path)
    kinds = [kind for kind, _ in modules]
    if not kinds or kinds[0] != "Transformer" or "Pooling" not in kinds[1:2]:
        raise ValueError(
            f"{path / MODULES_FILE}: expected Transformer, Pooling, then Dense or Normalize"
            f" modules; got {', '.join(kinds) or 'none'}"
        )
    transformer_path = modules[0][1]
    transformer_config = _transformer_config(transformer_path)
    head = SentenceHead(**_pooling_settings(modules[1][1]))
    for kind, folder in modules[2:]:
        if head.normalize:
            raise ValueError(f"{path / MODULES_FILE}: {kind} after Normalize is not supported")
        if kind == "Dense":
            head.dense.append(_read_dense(folder))
        elif kind == "Normalize":
            _check_module_names(folder, "Normalize")
            head.normalize = True
        else:
            raise ValueError(f"{path / MODULES_FILE}: a second {kind} module is not supported")
    prompts, default_prompt_name = read_prompts(path)
    head.files = [
        file
        for file in (
            path / MODULES_FILE,
            path / ST_CONFIG_FILE,
            transformer_path / SENTENCE_BERT_CONFIG_FILE,
            *(folder / MODULE_CONFIG_FILE for _, folder in modules[1:]),
            *(folder / SAFETENSORS_FILE for kind, folder in modules if kind == "Dense"),
        )
        if file.is_file()
    ]
    hf_config = read_json_object(transformer_path / CONFIG_FILE)
    max_seq_length = transformer_config.get("max_seq_length")
    return SentenceTransformersFolder(
        path=path,
        transformer_path=transformer_path,
        head=head,
        max_seq_length=int(max_seq_length) if max_seq_length is not None else None,
        do_lower_case=bool(transformer_config.get("do_lower_case", False)),
        prompts=prompts or dict(_DEFAULT_PROMPTS),
        default_prompt_name=default_prompt_name,
        # transformers runs these decoders causally unless their config says otherwise
        causal=not hf_config.get("use_bidirectional_attention", False),
    )


def _read_modules(path: Path) -> list[tuple[str, Path]]:
    """(kind, folder) of each module in modules.json, by idx."""
    with open(path / MODULES_FILE, encoding="utf-8") as handle:
        listed = json.load(handle)
    if not isinstance(listed, list):
        raise ValueError(f"{path / MODULES_FILE}: expected a list of modules")
    modules = []
    for entry in sorted(listed, key=lambda module: module.get("idx", 0)):
        class_ref = str(entry.get("type", ""))
        kind = class_ref.rsplit(".", 1)[-1]
        if not class_ref.startswith("sentence_transformers.") or kind not in (
            "Transformer",
            "Pooling",
            "Dense",
            "Normalize",
        ):
            raise ValueError(
                f"{path / MODULES_FILE}: module {class_ref!r} is not supported (supported:"
                " sentence-transformers' Transformer, Pooling, Dense and Normalize)"
            )
        relative = Path(str(entry.get("path", "")))
        if relative.is_absolute() or ".." in relative.parts:
            raise ValueError(f"{path / MODULES_FILE}: module path {relative} leaves the folder")
        modules.append((kind, path / relative))
    return modules


def _transformer_config(folder: Path) -> dict:
    """sentence_bert_config.json, checked for settings this runtime does not follow."""
    config_path = folder / SENTENCE_BERT_CONFIG_FILE
    config = read_json_object(config_path) if config_path.is_file() else {}
    task = config.get("transformer_task", "feature-extraction")
    modality = config.get("modality_config")
    if task != "feature-extraction" or (modality is not None and set(modality) != {"text"}):
        raise ValueError(
            f"{config_path}: only a text feature-extraction Transformer is supported"
            f" (transformer_task={task!r}, modalities={sorted(modality or ['text'])})"
        )
    unsupported = [
        key for key in ("processing_kwargs", "query_length", "document_length") if config.get(key)
    ]
    if unsupported:
        raise ValueError(f"{config_path}: {', '.join(unsupported)} are not supported")
    return config


def _pooling_settings(folder: Path) -> dict:
    config = read_json_object(folder / MODULE_CONFIG_FILE)
    modes = config.get("pooling_mode")
    if modes is None:
        modes = [mode for key, mode in _LEGACY_POOLING_KEYS.items() if config.get(key)] or ["mean"]
    modes = [modes] if isinstance(modes, str) else list(modes)
    unknown = [mode for mode in modes if mode not in ST_POOLING_MODES]
    if unknown:
        raise ValueError(
            f"{folder / MODULE_CONFIG_FILE}: unknown pooling mode {unknown[0]!r}"
            f" (sentence-transformers has {', '.join(ST_POOLING_MODES)})"
        )
    return {
        "pooling_modes": tuple(modes),
        "include_prompt": bool(config.get("include_prompt", True)),
    }


def _check_module_names(folder: Path, kind: str) -> dict:
    """A Dense or Normalize config.json, which must read and write the sentence embedding."""
    path = folder / MODULE_CONFIG_FILE
    config = read_json_object(path) if path.is_file() else {}
    names = (config.get("module_input_name"), config.get("module_output_name"))
    if any(name not in (None, "sentence_embedding") for name in names):
        raise ValueError(f"{path}: a {kind} on {names} is not supported (sentence_embedding only)")
    return config


def _read_dense(folder: Path) -> Dense:
    """A Dense module from its config.json and safetensors weights (never a pickle)."""
    config = _check_module_names(folder, "Dense")
    weights_path = folder / SAFETENSORS_FILE
    if not weights_path.is_file():
        pickle = folder / "pytorch_model.bin"
        raise ValueError(
            f"{folder}: Dense weights only as {pickle.name} (a pickle, never loaded: unpickling"
            " can run code); convert them to model.safetensors"
            if pickle.is_file()
            else f"{folder}: missing {SAFETENSORS_FILE}"
        )
    from safetensors.torch import load_file

    weights = load_file(str(weights_path))
    in_features, out_features = int(config["in_features"]), int(config["out_features"])
    bias = bool(config.get("bias", True))
    linear = nn.Linear(in_features, out_features, bias=bias)
    use_residual = bool(config.get("use_residual", False))
    residual = (
        nn.Linear(in_features, out_features, bias=False)
        if use_residual and in_features != out_features
        else None
    )
    activation = _activation(folder, config.get("activation_function"))
    layer = Dense(linear, activation, use_residual, residual)
    expected = set(layer.state_dict())
    if set(weights) != expected:
        raise ValueError(
            f"{weights_path}: expected tensors {sorted(expected)}, found {sorted(weights)}"
        )
    layer.load_state_dict(weights)
    return layer.float().eval()


def _activation(folder: Path, name: str | None) -> nn.Module:
    """The Dense activation: a ``torch.nn`` module class by its dotted name (Tanh by default, as
    sentence-transformers builds it); anything else would be remote code, and is refused."""
    if name is None:
        return nn.Tanh()
    module_name, _, class_name = str(name).rpartition(".")
    activation = None
    if module_name.startswith("torch."):
        try:
            activation = getattr(importlib.import_module(module_name), class_name, None)
        except ImportError:
            activation = None
    if not (inspect.isclass(activation) and issubclass(activation, nn.Module)):
        raise ValueError(
            f"{folder / MODULE_CONFIG_FILE}: activation_function {name!r} is not a torch.nn"
            " module class (custom code is never run)"
        )
    return activation()


def resolve_prompt(
    prompts: dict[str, str],
    default_prompt_name: str | None,
    prompt: str | None = None,
    prompt_name: str | None = None,
) -> str | None:
    """sentence-transformers' rule: ``prompt`` wins, else ``prompts[prompt_name]``, else the
    default prompt; None when none applies. An empty prompt means no prompt."""
    if prompt is not None:
        return prompt
    if prompt_name is not None:
        if prompt_name not in prompts:
            known = ", ".join(repr(name) for name in prompts) or "none"
            raise ValueError(f"prompt_name {prompt_name!r} is not a prompt of this model ({known})")
        return prompts[prompt_name]
    if default_prompt_name is not None:
        return prompts.get(default_prompt_name)
    return None


def lowercase_tokenizer(tokenizer: Any) -> None:
    """``do_lower_case``: put a Lowercase normalizer first, as sentence-transformers does."""
    from tokenizers.normalizers import Lowercase
    from tokenizers.normalizers import Sequence as NormalizerSequence

    backend = tokenizer.backend_tokenizer
    normalizer = backend.normalizer
    parts = [Lowercase()]
    if isinstance(normalizer, NormalizerSequence):
        parts += list(normalizer)
    elif normalizer is not None:
        parts.append(normalizer)
    backend.normalizer = NormalizerSequence(parts)


def tokenize(
    tokenizer: Any,
    inputs: Sequence,
    *,
    max_length: int,
    include_prompt: bool,
) -> list[TokenizedText]:
    """Token ids and pool masks as sentence-transformers builds them, without padding.

    Each input is a text or a ``[prompt, text]`` pair; the prompt is put before the text as
    is. The tokenizer adds its own special tokens (BOS, an appended EOS) and cuts at
    ``max_length``. With ``include_prompt=False`` the first n tokens are not pooled, n being the
    prompt's token count alone (BOS included, a trailing special token not), as
    sentence-transformers counts it.
    """
    pairs = as_instruction_pairs(inputs)
    if not pairs:
        return []
    texts = [prompt + text if prompt else text for prompt, text in pairs]
    encoded = tokenizer(
        texts,
        truncation=True,
        max_length=max_length,
        return_attention_mask=False,
        return_token_type_ids=False,
    )["input_ids"]
    prompt_lengths = {}
    if not include_prompt:
        special = set(tokenizer.all_special_ids)
        for prompt in {prompt for prompt, _ in pairs if prompt}:
            ids = tokenizer(prompt, truncation=True, max_length=max_length)["input_ids"]
            prompt_lengths[prompt] = len(ids) - (1 if ids and ids[-1] in special else 0)
    items = []
    for (prompt, _), text, ids in zip(pairs, texts, encoded):
        skipped = prompt_lengths.get(prompt, 0) if prompt else 0
        items.append(
            TokenizedText(
                input_ids=ids,
                pool_mask=[index >= skipped for index in range(len(ids))],
                truncated=_was_cut(tokenizer, text, ids, max_length),
            )
        )
    return items


def _was_cut(tokenizer: Any, text: str, ids: list[int], max_length: int) -> bool:
    if len(ids) < max_length:
        return False
    longer = tokenizer(text, truncation=True, max_length=max_length + 1)["input_ids"]
    return len(longer) > max_length


def max_seq_length(folder: SentenceTransformersFolder, tokenizer: Any, hf_config: dict) -> int:
    """sentence-transformers' cut: ``max_seq_length`` of sentence_bert_config.json, else the
    tokenizer's ``model_max_length`` capped at the config's ``max_position_embeddings``."""
    if folder.max_seq_length is not None:
        return folder.max_seq_length
    length = int(min(tokenizer.model_max_length, 2**62))
    positions = hf_config.get("max_position_embeddings")
    if positions is not None and positions != -1:
        length = min(length, int(positions))
    return length
