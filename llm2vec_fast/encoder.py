"""``LLM2Vec``: the encoder, a drop-in for the ``llm2vec`` package (0.2.3) on the packed runtime.

Same calls and the same numbers as ``llm2vec.LLM2Vec`` (see ``tests/data/LLM2VEC_SEMANTICS.md``),
but texts are packed into token-budget batches instead of padded, so no pad token is computed and
results do not depend on how texts are batched.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import text as text_layer
from .batching import plan_batches
from .cuda_graphs import GraphedEncoder
from .files import read_json_object, sha256_file
from .kernels import POOLING_MODES, masked_pool
from .kernels import attention as attention_kernels
from .loading import load_model
from .model import DecoderModel
from .settings import (
    DEFAULT_MAX_BATCH_TOKENS,
    LLM2VEC_CONFIG_FILE,
    LLM2VEC_DOC_MAX_LENGTH,
    TRAIN_CONFIG_FILE,
    resolve_dtype,
)

logger = logging.getLogger(__name__)

# from_pretrained keywords that transformers users pass out of habit: accepted, with no effect here.
_IGNORED_HF_KWARGS = (
    "device_map",
    "attn_implementation",
    "low_cpu_mem_usage",
    "trust_remote_code",
    "cache_dir",
)


def _check_tokenizer_adds_bos(tokenizer: Any) -> None:
    """bos_token pooling reads the state of the BOS token the tokenizer puts first (llm2vec fails
    without one); a tokenizer that adds none would silently pool the first word instead."""
    ids = tokenizer("a")["input_ids"]
    if tokenizer.bos_token_id is None or not ids or ids[0] != tokenizer.bos_token_id:
        raise ValueError(
            "pooling_mode='bos_token' needs a tokenizer that puts a BOS token first; this one does not"
            f" (bos_token_id={tokenizer.bos_token_id}, 'a' -> {ids}): use mean, weighted_mean,"
            " eos_token or last_token"
        )


def _read_settings(path: Path, keys: Sequence[str]) -> dict:
    """The ``keys`` present in the JSON file at ``path`` (none if it is missing), checked."""
    if not path.is_file():
        return {}
    saved = read_json_object(path)
    settings = {key: saved[key] for key in keys if key in saved}
    for key, value in settings.items():
        if not _valid_setting(key, value):
            raise ValueError(
                f"{path}: {key} = {value!r} is not valid (pooling modes: {', '.join(POOLING_MODES)};"
                " lengths: positive ints; skip_instruction, bidirectional: true or false)"
            )
    return settings


def _valid_setting(key: str, value: Any) -> bool:
    """Whether an llm2vec_config.json value has the type and range llm2vec gives it."""
    if key == "pooling_mode":
        return value in POOLING_MODES
    if key in ("skip_instruction", "bidirectional"):
        return isinstance(value, bool)
    return text_layer.is_positive_int(value)  # the lengths


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class LLM2Vec:
    """A decoder LLM used as a text encoder: tokenize, pack, run the runtime, pool."""

    def __init__(
        self,
        model: DecoderModel,
        tokenizer: Any,
        pooling_mode: str = "mean",
        max_length: int = 512,
        doc_max_length: int = LLM2VEC_DOC_MAX_LENGTH,
        skip_instruction: bool = True,
        *,
        enable_bidirectional: bool = True,
        model_name: str = "",
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        cuda_graphs: bool = False,
    ):
        if pooling_mode not in POOLING_MODES:
            raise ValueError(
                f"unknown pooling mode {pooling_mode!r}; expected one of {', '.join(POOLING_MODES)}"
            )
        for name, value in (
            ("max_length", max_length),
            ("doc_max_length", doc_max_length),
            ("max_batch_tokens", max_batch_tokens),
        ):
            text_layer.check_positive_int(name, value)
        if not isinstance(skip_instruction, bool):
            raise TypeError(f"skip_instruction must be True or False, got {skip_instruction!r}")
        if pooling_mode == "bos_token" and tokenizer is not None:
            _check_tokenizer_adds_bos(tokenizer)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.pooling_mode = pooling_mode
        self.max_length = int(max_length)
        self.doc_max_length = int(doc_max_length)
        self.skip_instruction = bool(skip_instruction)
        self.enable_bidirectional = bool(enable_bidirectional)
        self.model_name = model_name
        self.max_batch_tokens = max(int(max_batch_tokens), self.max_length)
        self.cuda_graphs = bool(cuda_graphs)
        self._graphed: GraphedEncoder | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(
        cls,
        base_model_name_or_path: str | Path,
        peft_model_name_or_path: str | Path | None = None,
        merge_peft: bool = True,
        enable_bidirectional: bool | None = None,
        *,
        pooling_mode: str | None = None,
        max_length: int | None = None,
        doc_max_length: int | None = None,
        skip_instruction: bool | None = None,
        torch_dtype: str | torch.dtype | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        adapters: Sequence[str | Path] = (),
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        cuda_graphs: bool = False,
        **hf_kwargs: Any,
    ) -> "LLM2Vec":
        """Load like ``llm2vec.LLM2Vec.from_pretrained``, from local files only.

        ``base_model_name_or_path``: a transformers folder, a ``.gguf`` file, or an LLM2Vec MNTP
        folder (a LoRA adapter that names its base; merged first). ``peft_model_name_or_path``: a
        further LoRA adapter (SimCSE or supervised) merged on top; ``adapters`` appends more.
        Adapters are always merged (``merge_peft`` is accepted for compatibility: merging gives the
        same numbers and runs faster). Encoder settings not given come from an
        ``llm2vec_config.json`` beside the last adapter (else the base), then llm2vec's defaults;
        ``enable_bidirectional`` not given comes from the ``train_config.json`` our trainer writes
        there (adapters of older versions: llm2vec_config.json), else True.
        ``cuda_graphs``: on a CUDA device, replay each batch's forward pass from a CUDA graph
        (see ``llm2vec_fast.cuda_graphs``; pays for small models, where launches dominate).
        """
        unknown = sorted(set(hf_kwargs) - set(_IGNORED_HF_KWARGS))
        if unknown:
            raise TypeError(
                f"LLM2Vec.from_pretrained got unexpected keyword arguments: {', '.join(unknown)}"
            )
        if hf_kwargs:
            logger.info(
                "ignoring %s: the packed runtime needs none of them", ", ".join(sorted(hf_kwargs))
            )
        target = torch.device(device) if device is not None else default_device()
        compute_dtype = resolve_dtype(dtype if dtype is not None else torch_dtype, target)
        if (
            torch_dtype is not None
            and dtype is not None
            and resolve_dtype(torch_dtype, target) != compute_dtype
        ):
            raise ValueError(
                f"torch_dtype={torch_dtype!r} and dtype={dtype!r} disagree; give one of them"
            )
        if isinstance(adapters, (str, Path)):
            adapters = [adapters]
        chain = [
            Path(p)
            for p in ([peft_model_name_or_path] if peft_model_name_or_path else []) + list(adapters)
        ]
        model, tokenizer = load_model(
            base_model_name_or_path, adapters=chain, dtype=compute_dtype, device=target
        )

        settings = cls._saved_settings(Path(chain[-1]) if chain else Path(base_model_name_or_path))
        given = {
            "pooling_mode": pooling_mode,
            "max_length": max_length,
            "doc_max_length": doc_max_length,
            "skip_instruction": skip_instruction,
        }
        settings.update({key: value for key, value in given.items() if value is not None})
        saved_bidirectional = settings.pop("bidirectional", True)
        return cls(
            model,
            tokenizer,
            **settings,
            enable_bidirectional=saved_bidirectional
            if enable_bidirectional is None
            else enable_bidirectional,
            model_name=text_layer.model_identity(base_model_name_or_path),
            max_batch_tokens=max_batch_tokens,
            cuda_graphs=cuda_graphs,
        )

    @staticmethod
    def _saved_settings(folder: Path) -> dict:
        """llm2vec_config.json's settings, and ``bidirectional`` as our trainer recorded it (in
        train_config.json; adapters of older versions have it in llm2vec_config.json)."""
        keys = ("pooling_mode", "max_length", "doc_max_length", "skip_instruction", "bidirectional")
        settings = _read_settings(folder / LLM2VEC_CONFIG_FILE, keys)
        if "bidirectional" not in settings:
            settings.update(_read_settings(folder / TRAIN_CONFIG_FILE, ("bidirectional",)))
        return settings

    # ------------------------------------------------------------------ properties

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def embedding_dim(self) -> int:
        return self.model.config.hidden_size

    def to(self, device: str | torch.device) -> "LLM2Vec":
        self.model.to(torch.device(device))
        return self

    def describe(self) -> dict:
        """What produced these embeddings: model files with their sha256, settings, dimension."""
        loaded = getattr(self.model, "loaded_from", None)
        files = (
            []
            if loaded is None
            else [{"path": str(Path(p).resolve()), "sha256": sha256_file(p)} for p in loaded.files]
        )
        adapters = [] if loaded is None else [str(Path(p).resolve()) for p in loaded.adapters]
        return {
            "model": None if loaded is None else str(loaded.source),
            "files": files,
            "adapters": adapters,
            "pooling_mode": self.pooling_mode,
            "max_length": self.max_length,
            "doc_max_length": self.doc_max_length,
            "skip_instruction": self.skip_instruction,
            "bidirectional": self.enable_bidirectional,
            "dtype": str(self.dtype).removeprefix("torch."),
            "dim": self.embedding_dim,
        }

    # ------------------------------------------------------------------ encoding

    def tokenize(self, sentences: Sequence[str | Sequence[str]]) -> list[text_layer.TokenizedText]:
        """Token ids and pooled-token masks, exactly as llm2vec would build them."""
        return text_layer.tokenize(
            self.tokenizer,
            sentences,
            max_length=self.max_length,
            doc_max_length=self.doc_max_length,
            skip_instruction=self.skip_instruction,
            pooling_mode=self.pooling_mode,
            model_name=self.model_name,
            model_type=self.model.config.model_type,
        )

    @torch.inference_mode()
    def embed_tokenized(
        self,
        items: Sequence[text_layer.TokenizedText],
        *,
        normalize: bool = False,
        max_batch_tokens: int | None = None,
        max_batch_size: int | None = None,
        progress: tqdm | None = None,
    ) -> torch.Tensor:
        """Embeddings ``(n, hidden)`` fp32 on the CPU for tokenized items, in their order.

        On a GPU the packed batches travel from pinned memory asynchronously and the results stay
        on the device until the end, so the host prepares batch i+1 while the GPU runs batch i.
        """
        budget = int(max_batch_tokens or self.max_batch_tokens)
        device = self.device
        out = torch.empty(len(items), self.embedding_dim, dtype=torch.float32, device=device)
        # Triton launches on the current device: make it the model's (cuda:1, or a torchrun rank's GPU)
        on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
        with on_device:
            self._embed_batches(items, budget, max_batch_size, normalize, out, progress)
        return out.cpu()

    def _embed_batches(
        self,
        items: Sequence[text_layer.TokenizedText],
        budget: int,
        max_batch_size: int | None,
        normalize: bool,
        out: torch.Tensor,
        progress: tqdm | None,
    ) -> None:
        """Fill ``out`` (n, hidden) with the pooled embeddings, one packed batch at a time."""
        device = self.device
        causal = not self.enable_bidirectional
        graphed = self._graphed_encoder()

        def to_device(tensor: torch.Tensor) -> torch.Tensor:
            if device.type != "cuda":
                return tensor
            return tensor.pin_memory().to(device, non_blocking=True)

        # the attention kernel takes at most MAX_SEQUENCES per launch: many short or empty texts
        # fit a token budget in more sequences than that
        size_limit = min(
            max_batch_size or attention_kernels.MAX_SEQUENCES, attention_kernels.MAX_SEQUENCES
        )
        for plan in plan_batches([len(i.input_ids) for i in items], budget, size_limit):
            members = [items[j] for j in plan.indices.tolist()]
            input_ids = torch.tensor(
                [t for item in members for t in item.input_ids], dtype=torch.long
            )  # (T,)
            pool_mask = torch.tensor(
                [m for item in members for m in item.pool_mask], dtype=torch.bool
            )  # (T,)
            # checked on the host copies: on a GPU, reading cu_seqlens back would wait for the last batch
            self.model.check_inputs(
                input_ids, plan.cu_seqlens, plan.max_seqlen, plan.position_ids, causal
            )
            pooled = None
            if graphed is not None:
                pooled = graphed.pooled(
                    input_ids,
                    pool_mask,
                    plan.cu_seqlens,
                    causal=causal,
                    mode=self.pooling_mode,
                    normalize=normalize,
                )  # (B, hidden), or None: this batch runs eagerly
            if pooled is None:
                cu_seqlens = to_device(plan.cu_seqlens)  # (B + 1,)
                hidden = self.model.forward_unchecked(
                    to_device(input_ids),
                    cu_seqlens,
                    plan.max_seqlen,
                    to_device(plan.position_ids),
                    causal=causal,
                )  # (T, hidden)
                pooled = masked_pool(
                    hidden,
                    cu_seqlens,
                    self.pooling_mode,
                    to_device(pool_mask),
                    normalize,
                    check_cu_seqlens=False,
                )  # (B, hidden)
            out[to_device(plan.indices)] = pooled.float()
            if progress is not None:
                progress.update(len(members))

    def _graphed_encoder(self) -> GraphedEncoder | None:
        """The CUDA-graph runner when ``cuda_graphs`` is on and can work here, else None (with a
        warning saying why: a CPU model, or the reference backend)."""
        if not self.cuda_graphs:
            return None
        if self._graphed is None or not self._graphed.still_valid(self.model):
            try:
                self._graphed = GraphedEncoder(self.model)
            except ValueError as why:
                # stacklevel: the caller of embed_tokenized (past its inference_mode wrapper)
                warnings.warn(f"{why}; encoding runs eagerly", stacklevel=5)
                return None
        return self._graphed

    def encode(
        self,
        sentences: str | Sequence[str | Sequence[str]],
        batch_size: int = 32,
        show_progress_bar: bool = True,
        convert_to_numpy: bool = False,
        convert_to_tensor: bool = False,
        device: str | torch.device | None = None,
        *,
        normalize_embeddings: bool = False,
        max_batch_tokens: int | None = None,
    ) -> torch.Tensor | np.ndarray:
        """Embed texts or ``[instruction, text]`` pairs (mixed freely); returns fp32 ``(n, hidden)``.

        Batches are packed up to ``max_batch_tokens`` tokens (no padding), so batching never changes
        the numbers; ``batch_size`` is accepted for llm2vec compatibility and does not limit a
        batch (token budgets bound memory better). A single string gives a ``(1, hidden)`` result
        (llm2vec would embed each of its characters). Returns a CPU tensor, or a numpy array with
        ``convert_to_numpy``.
        """
        if isinstance(sentences, str):
            sentences = [sentences]
        text_layer.check_positive_int("batch_size", batch_size)
        if max_batch_tokens is not None:
            text_layer.check_positive_int("max_batch_tokens", max_batch_tokens)
        if device is not None and torch.device(device) != self.device:
            self.to(device)
        items = self.tokenize(sentences)
        with tqdm(
            total=len(items), desc="Encoding", unit="text", disable=not show_progress_bar
        ) as bar:
            embeddings = self.embed_tokenized(
                items,
                normalize=normalize_embeddings,
                max_batch_tokens=max_batch_tokens,
                progress=bar,
            )
        if convert_to_numpy and not convert_to_tensor:
            return embeddings.numpy()
        return embeddings
