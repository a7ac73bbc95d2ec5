"""``LLM2Vec``: the encoder, a drop-in for the ``llm2vec`` package (0.2.3) on the packed runtime.

Same calls and the same numbers as ``llm2vec.LLM2Vec`` (see ``tests/data/LLM2VEC_SEMANTICS.md``),
but texts are packed into token-budget batches instead of padded, so no pad token is computed and
results do not depend on how texts are batched.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import st_folder
from . import text as text_layer
from .cuda_graphs import GraphedEncoder
from .files import read_json_object, sha256_file
from .kernels import POOLING_MODES
from .loading import load_model
from .model import DecoderModel, forward_and_pool
from .packed import Packed, pack_batches
from .settings import (
    DEFAULT_MAX_BATCH_TOKENS,
    DEFAULT_MAX_LENGTH,
    DEFAULT_POOLING_MODE,
    LLM2VEC_CONFIG_FILE,
    LLM2VEC_DOC_MAX_LENGTH,
    TRAIN_CONFIG_FILE,
    resolve_dtype,
)

logger = logging.getLogger(__name__)

# encode's outputs, by sentence-transformers' names
OUTPUT_VALUES = ("sentence_embedding", "token_embeddings")

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
            "pooling_mode='bos_token' needs a tokenizer that puts a BOS token first; this one does"
            f" not (bos_token_id={tokenizer.bos_token_id}, 'a' -> {ids}): use mean, weighted_mean,"
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
                f"{path}: {key} = {value!r} is not valid"
                f" (pooling modes: {', '.join(POOLING_MODES)};"
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
        pooling_mode: str = DEFAULT_POOLING_MODE,
        max_length: int = DEFAULT_MAX_LENGTH,
        doc_max_length: int = LLM2VEC_DOC_MAX_LENGTH,
        skip_instruction: bool = True,
        *,
        enable_bidirectional: bool = True,
        model_name: str = "",
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        cuda_graphs: bool = False,
        sentence_head: st_folder.SentenceHead | None = None,
        prompts: dict[str, str] | None = None,
        default_prompt_name: str | None = None,
        truncate_dim: int | None = None,
    ):
        if sentence_head is not None:  # a sentence-transformers folder: its Pooling decides
            pooling_mode = "+".join(sentence_head.pooling_modes)
        elif pooling_mode not in POOLING_MODES:
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
        if truncate_dim is not None:
            text_layer.check_positive_int("truncate_dim", truncate_dim)
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
        self.sentence_head = sentence_head
        self.prompts = dict(prompts or {})
        self.default_prompt_name = default_prompt_name
        self.truncate_dim = truncate_dim
        self._check_truncate_dim(truncate_dim)

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
        truncate_dim: int | None = None,
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
        there, else ``bidirectional`` in llm2vec_config.json, else True.
        ``cuda_graphs``: on a CUDA device, replay each batch's forward pass from a CUDA graph
        (see ``llm2vec_fast.cuda_graphs``; pays for small models, where launches dominate).

        A sentence-transformers folder (``modules.json``) runs as ``SentenceTransformer`` would:
        its Pooling, Dense and Normalize modules, prompts and ``max_seq_length`` (``max_length``
        overrides it), causal attention (see ``llm2vec_fast.st_folder``).
        ``truncate_dim``: keep the first dimensions of every embedding (Matryoshka).
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
        if st_folder.is_sentence_transformers_folder(base_model_name_or_path):
            folder = st_folder.read_folder(base_model_name_or_path)
            own_mode = "+".join(folder.head.pooling_modes)
            if pooling_mode not in (None, own_mode) or skip_instruction is not None:
                raise ValueError(
                    f"a sentence-transformers folder pools as its Pooling module says ({own_mode}):"
                    " pooling_mode and skip_instruction do not apply"
                )
            model, tokenizer = load_model(
                folder.transformer_path, adapters=chain, dtype=compute_dtype, device=target
            )
            if folder.do_lower_case:
                st_folder.lowercase_tokenizer(tokenizer)
            length = max_length or st_folder.max_seq_length(
                folder, tokenizer, model.loaded_from.hf_config
            )
            return cls(
                model,
                tokenizer,
                max_length=length,
                doc_max_length=length,
                enable_bidirectional=not folder.causal
                if enable_bidirectional is None
                else enable_bidirectional,
                model_name=text_layer.model_identity(folder.transformer_path),
                max_batch_tokens=max_batch_tokens,
                cuda_graphs=cuda_graphs,
                sentence_head=folder.head.to(target),
                prompts=folder.prompts,
                default_prompt_name=folder.default_prompt_name,
                truncate_dim=truncate_dim,
            )
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
        prompts, default_prompt_name = st_folder.read_prompts(base_model_name_or_path)
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
            prompts=prompts,
            default_prompt_name=default_prompt_name,
            truncate_dim=truncate_dim,
        )

    @staticmethod
    def _saved_settings(folder: Path) -> dict:
        """llm2vec_config.json's settings, and ``bidirectional`` as our trainer records it in
        train_config.json (else as llm2vec_config.json gives it)."""
        keys = ("pooling_mode", "max_length", "doc_max_length", "skip_instruction", "bidirectional")
        settings = _read_settings(folder / LLM2VEC_CONFIG_FILE, keys)
        if "bidirectional" not in settings:
            settings.update(_read_settings(folder / TRAIN_CONFIG_FILE, ("bidirectional",)))
        return settings

    # ------------------------------------------------------------------ properties

    @property
    def causal(self) -> bool:
        """The runtime's attention direction (llm2vec's ``enable_bidirectional``, negated)."""
        return not self.enable_bidirectional

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def pooled_dim(self) -> int:
        """The width of an embedding before any ``truncate_dim``."""
        hidden = self.model.config.hidden_size
        return hidden if self.sentence_head is None else self.sentence_head.output_dim(hidden)

    @property
    def embedding_dim(self) -> int:
        """The width of the embeddings ``encode`` returns (``truncate_dim`` applied)."""
        return min(self.truncate_dim or self.pooled_dim, self.pooled_dim)

    def _check_truncate_dim(self, truncate_dim: int | None) -> None:
        if truncate_dim is not None and truncate_dim > self.pooled_dim:
            raise ValueError(
                f"truncate_dim={truncate_dim} is more than the {self.pooled_dim} dimensions of"
                " this model's embeddings"
            )

    def to(self, device: str | torch.device) -> "LLM2Vec":
        self.model.to(torch.device(device))
        if self.sentence_head is not None:
            self.sentence_head.to(torch.device(device))
        return self

    def resolve_prompt(
        self, prompt: str | None = None, prompt_name: str | None = None
    ) -> str | None:
        """The prompt text ``encode`` puts before each text: ``prompt``, else
        ``prompts[prompt_name]``, else the default prompt (sentence-transformers' rule); None
        when none applies. A model without prompts (an llm2vec folder) knows no names."""
        return st_folder.resolve_prompt(self.prompts, self.default_prompt_name, prompt, prompt_name)

    def describe(self) -> dict:
        """What produced these embeddings: model files with their sha256, settings, dimension."""
        loaded = getattr(self.model, "loaded_from", None)
        read = [] if loaded is None else list(loaded.files)
        if self.sentence_head is not None:
            read += self.sentence_head.files
        files = [{"path": str(Path(p).resolve()), "sha256": sha256_file(p)} for p in read]
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
        } | (
            {}
            if self.sentence_head is None
            else {"sentence_transformers": self.sentence_head.describe()}
        )

    # ------------------------------------------------------------------ encoding

    def tokenize(
        self,
        sentences: Sequence[str | Sequence[str]],
        prompt: str | None = None,
        prompt_name: str | None = None,
    ) -> list[text_layer.TokenizedText]:
        """Token ids and pooled-token masks, exactly as llm2vec (for a sentence-transformers
        folder: sentence-transformers) would build them.

        The prompt (see ``resolve_prompt``) goes before each bare text as its instruction; an
        ``[instruction, text]`` pair keeps its own. For a sentence-transformers folder an
        instruction is a prompt, put before the text as is.
        """
        return self.tokenization(prompt, prompt_name).tokenize(sentences)

    def tokenization(
        self, prompt: str | None = None, prompt_name: str | None = None
    ) -> "TextTokenization":
        """This encoder's ``tokenize`` alone, without the weights: picklable, for processes
        that tokenize while another embeds."""
        return TextTokenization(
            self.tokenizer,
            max_length=self.max_length,
            doc_max_length=self.doc_max_length,
            skip_instruction=self.skip_instruction,
            pooling_mode=self.pooling_mode,
            model_name=self.model_name,
            model_type=self.model.config.model_type,
            prompt=self.resolve_prompt(prompt, prompt_name),
            include_prompt=None
            if self.sentence_head is None
            else self.sentence_head.include_prompt,
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
        truncate_dim: int | None = None,
    ) -> torch.Tensor:
        """Embeddings ``(n, dim)`` fp32 on the CPU for tokenized items, in their order.

        ``truncate_dim`` (default: the encoder's) keeps the first dimensions, renormalized when
        ``normalize`` or the folder's Normalize module asks for unit vectors (sentence-transformers
        truncates after its modules; use ``normalize`` for unit vectors there too).

        On a GPU the packed batches travel from pinned memory asynchronously and the results stay
        on the device until the end, so the host prepares batch i+1 while the GPU runs batch i.
        """
        max_batch_tokens = int(max_batch_tokens or self.max_batch_tokens)
        if truncate_dim is not None:
            text_layer.check_positive_int("truncate_dim", truncate_dim)
            self._check_truncate_dim(truncate_dim)
        kept = min(truncate_dim or self.truncate_dim or self.pooled_dim, self.pooled_dim)
        device = self.device
        out = torch.empty(len(items), kept, dtype=torch.float32, device=device)
        # Triton launches on the current device: make it the model's (cuda:1, a torchrun rank's)
        on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
        with on_device:
            self._embed_batches(items, max_batch_tokens, max_batch_size, normalize, out, progress)
        return out.cpu()

    def _embed_batches(
        self,
        items: Sequence[text_layer.TokenizedText],
        max_batch_tokens: int,
        max_batch_size: int | None,
        normalize: bool,
        out: torch.Tensor,
        progress: tqdm | None,
    ) -> None:
        """Fill ``out`` (n, dim) with the embeddings, one packed batch at a time; dim under the
        pooled width keeps the first dim columns, renormalized where unit vectors are due."""
        causal = self.causal
        graphed = self._graphed_encoder()
        cut = out.shape[1] < self.pooled_dim
        renormalize = normalize or (self.sentence_head is not None and self.sentence_head.normalize)
        normalize_pooled = normalize and not cut
        for packed in _packed_batches(items, max_batch_tokens, max_batch_size):
            # checked on the host: on a GPU, reading token ids back would wait for the last batch
            self.model.check_inputs(packed)
            pooled = None
            if graphed is not None:
                pooled = graphed.pooled(
                    packed,
                    causal=causal,
                    pooling_mode=self.pooling_mode,
                    normalize=normalize_pooled,
                )  # (B, hidden), or None: this batch runs eagerly
            if pooled is None and self.sentence_head is not None:
                on_device = packed.to(self.device)
                hidden = self.model.forward_unchecked(on_device, causal=causal)  # (T, hidden)
                pooled = self.sentence_head(hidden, on_device)  # (B, pooled_dim)
                if normalize_pooled:
                    pooled = F.normalize(pooled, p=2, dim=-1)
                indices = on_device.indices
            elif pooled is None:
                on_device = packed.to(self.device)
                pooled = forward_and_pool(
                    self.model.forward_unchecked,
                    on_device,
                    self.pooling_mode,
                    causal=causal,
                    normalize=normalize_pooled,
                )  # (B, hidden)
                indices = on_device.indices
            else:  # the graph read the batch on the host: only its indices travel
                indices = packed.indices.pin_memory().to(self.device, non_blocking=True)
            if cut:
                pooled = pooled[:, : out.shape[1]]  # (B, dim)
                if renormalize:
                    pooled = F.normalize(pooled.float(), p=2, dim=-1)
            out[indices] = pooled.float()
            if progress is not None:
                progress.update(packed.batch_size)

    @torch.inference_mode()
    def token_embeddings_tokenized(
        self,
        items: Sequence[text_layer.TokenizedText],
        *,
        max_batch_tokens: int | None = None,
        progress: tqdm | None = None,
    ) -> list[torch.Tensor]:
        """Each item's last hidden states at the tokens its pool_mask marks (the text, not the
        instruction), as ``(n_pooled, hidden)`` fp32 CPU tensors in the items' order.

        The same packed batches and forward pass as ``embed_tokenized``, stopped before pooling.
        """
        max_batch_tokens = int(max_batch_tokens or self.max_batch_tokens)
        causal = self.causal
        states: list[torch.Tensor] = [torch.empty(0)] * len(items)
        device = self.device
        current = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
        with current:
            for packed in _packed_batches(items, max_batch_tokens, None):
                self.model.check_inputs(packed)
                on_device = packed.to(device)
                hidden = self.model.forward_unchecked(on_device, causal=causal)  # (T, H)
                pooled = hidden[on_device.pool_mask].float().cpu()  # (P, H), P pooled tokens
                lengths = torch.diff(packed.cu_seqlens.long()).tolist()  # (B,)
                counts = [int(mask.sum()) for mask in packed.pool_mask.split(lengths)]
                for index, part in zip(packed.indices.tolist(), pooled.split(counts)):
                    states[index] = part.clone()
                if progress is not None:
                    progress.update(packed.batch_size)
        return states

    def word_start_indices(self, sentences: Sequence[str | Sequence[str]]) -> list[list[int]]:
        """For each input, the index of the first sub-token of each word of its text within
        its ``token_embeddings`` (the first-sub-token alignment of word-level probes).

        A word is a maximal run of non-whitespace characters of the text (``str.split()``; the
        instruction has none), so ``" ".join(words)`` of a CoNLL sentence aligns one index to
        each of its words. A text cut by ``doc_max_length`` or ``max_length`` keeps its leading
        words only: the list then covers the first ``len(list)`` words. Needs a fast tokenizer
        (its character offsets).
        """
        if self.sentence_head is not None:
            raise ValueError("word_start_indices follows llm2vec's tokenization, not a folder's")
        if not getattr(self.tokenizer, "is_fast", False):
            raise TypeError("word_start_indices needs a fast tokenizer (character offsets)")
        pairs = text_layer.as_instruction_pairs(sentences)
        if not pairs:
            return []
        items = self.tokenize(sentences)
        texts = text_layer.truncate_texts(
            self.tokenizer, [text for _, text in pairs], self.max_length, self.doc_max_length
        )
        full_texts, text_starts = [], []
        for (instruction, _), text in zip(pairs, texts):
            formatted = text_layer.format_for_tokenization(
                instruction, text, self.pooling_mode, self.model_name, self.model.config.model_type
            )
            parts = formatted.split(text_layer.SEPARATOR)
            full_texts.append("".join(parts))
            text_starts.append(len(parts[0]))
        offsets = self.tokenizer(
            full_texts,
            truncation=True,
            max_length=self.max_length,
            return_offsets_mapping=True,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["offset_mapping"]
        return [
            _word_starts(text, start, spans, item.pool_mask)
            for text, start, spans, item in zip(texts, text_starts, offsets, items)
        ]

    def _graphed_encoder(self) -> GraphedEncoder | None:
        """The CUDA-graph runner when ``cuda_graphs`` is on and can work here, else None (with a
        warning saying why: a CPU model, or the reference backend)."""
        if not self.cuda_graphs:
            return None
        if self.sentence_head is not None:
            warnings.warn(
                "CUDA graphs cover llm2vec's pooling only; this sentence-transformers folder"
                " encodes eagerly",
                stacklevel=5,
            )
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
        output_value: str = "sentence_embedding",
        prompt_name: str | None = None,
        prompt: str | None = None,
        truncate_dim: int | None = None,
    ) -> torch.Tensor | np.ndarray | list[torch.Tensor] | list[np.ndarray]:
        """Embed texts or ``[instruction, text]`` pairs (mixed freely); returns fp32
        ``(n, dim)``.

        ``prompt`` / ``prompt_name`` as in sentence-transformers (``resolve_prompt``): the
        prompt goes before every bare text (for an llm2vec model: as its instruction).
        ``truncate_dim`` (default: the encoder's) keeps the first dimensions (Matryoshka),
        renormalized where the model or ``normalize_embeddings`` asks for unit vectors.

        Batches are packed up to ``max_batch_tokens`` tokens (no padding), so batching never changes
        the numbers; ``batch_size`` is accepted for llm2vec compatibility and does not limit a
        batch (token budgets bound memory better). A single string gives a ``(1, hidden)`` result
        (llm2vec would embed each of its characters). Returns a CPU tensor, or a numpy array with
        ``convert_to_numpy``.

        ``output_value="token_embeddings"`` (sentence-transformers' name) returns instead, per
        input, the last hidden states of the tokens pooling reads: ``(n_tokens, hidden)`` fp32,
        a list of CPU tensors (numpy arrays with ``convert_to_numpy``). With
        ``skip_instruction`` (the default) those are the text's tokens, without the instruction
        and BOS, so an empty text gives ``(0, hidden)``. ``word_start_indices`` aligns words to
        them.
        """
        if output_value not in OUTPUT_VALUES:
            raise ValueError(
                f"output_value must be one of {', '.join(OUTPUT_VALUES)}, got {output_value!r}"
            )
        if output_value == "token_embeddings" and normalize_embeddings:
            raise ValueError("normalize_embeddings applies to sentence embeddings only")
        if isinstance(sentences, str):
            sentences = [sentences]
        text_layer.check_positive_int("batch_size", batch_size)
        if max_batch_tokens is not None:
            text_layer.check_positive_int("max_batch_tokens", max_batch_tokens)
        if device is not None and torch.device(device) != self.device:
            self.to(device)
        items = self.tokenize(sentences, prompt, prompt_name)
        with tqdm(
            total=len(items), desc="Encoding", unit="text", disable=not show_progress_bar
        ) as bar:
            if output_value == "token_embeddings":
                states = self.token_embeddings_tokenized(
                    items, max_batch_tokens=max_batch_tokens, progress=bar
                )
                return [part.numpy() for part in states] if convert_to_numpy else states
            embeddings = self.embed_tokenized(
                items,
                normalize=normalize_embeddings,
                max_batch_tokens=max_batch_tokens,
                progress=bar,
                truncate_dim=truncate_dim,
            )
        if convert_to_numpy and not convert_to_tensor:
            return embeddings.numpy()
        return embeddings

    def encode_query(
        self,
        sentences: str | Sequence[str | Sequence[str]],
        prompt_name: str | None = None,
        prompt: str | None = None,
        **kwargs: Any,
    ) -> torch.Tensor | np.ndarray | list[torch.Tensor] | list[np.ndarray]:
        """``encode`` with the model's ``query`` prompt unless a prompt is given (an empty
        query prompt then keeps the default prompt away), as sentence-transformers does."""
        if prompt_name is None and prompt is None and "query" in self.prompts:
            prompt_name = "query"
        return self.encode(sentences, prompt_name=prompt_name, prompt=prompt, **kwargs)

    def encode_document(
        self,
        sentences: str | Sequence[str | Sequence[str]],
        prompt_name: str | None = None,
        prompt: str | None = None,
        **kwargs: Any,
    ) -> torch.Tensor | np.ndarray | list[torch.Tensor] | list[np.ndarray]:
        """``encode`` with the first of the model's ``document``, ``passage`` and ``corpus``
        prompts unless a prompt is given, as sentence-transformers does."""
        if prompt_name is None and prompt is None:
            prompt_name = next(
                (name for name in st_folder.DOCUMENT_PROMPT_NAMES if name in self.prompts), None
            )
        return self.encode(sentences, prompt_name=prompt_name, prompt=prompt, **kwargs)


@dataclass
class TextTokenization:
    """How an ``LLM2Vec`` tokenizes: llm2vec's rules, or a sentence-transformers folder's
    (``include_prompt`` set: its Pooling's setting), with ``prompt`` before each bare text."""

    tokenizer: Any
    max_length: int
    doc_max_length: int
    skip_instruction: bool
    pooling_mode: str
    model_name: str
    model_type: str
    prompt: str | None = None
    include_prompt: bool | None = None

    def tokenize(self, sentences: Sequence[str | Sequence[str]]) -> list[text_layer.TokenizedText]:
        if self.prompt and not isinstance(sentences, str):
            sentences = [
                (self.prompt, item) if isinstance(item, str) else item for item in sentences
            ]
        if self.include_prompt is not None:
            return st_folder.tokenize(
                self.tokenizer,
                sentences,
                max_length=self.max_length,
                include_prompt=self.include_prompt,
            )
        return text_layer.tokenize(
            self.tokenizer,
            sentences,
            max_length=self.max_length,
            doc_max_length=self.doc_max_length,
            skip_instruction=self.skip_instruction,
            pooling_mode=self.pooling_mode,
            model_name=self.model_name,
            model_type=self.model_type,
        )


def _packed_batches(
    items: Sequence[text_layer.TokenizedText], max_batch_tokens: int, max_batch_size: int | None
) -> Iterator[Packed]:
    """The items in token-budget batches with their pool masks, longest first."""
    return pack_batches(
        [item.input_ids for item in items],
        max_batch_tokens,
        pool_masks=[item.pool_mask for item in items],
        max_batch_size=max_batch_size,
    )


def _word_starts(
    text: str, text_start: int, spans: Sequence[tuple[int, int]], pool_mask: Sequence[bool]
) -> list[int]:
    """Index among the pooled tokens of the first token overlapping each word of ``text``, which
    begins at character ``text_start`` of the tokenized string whose token ``spans`` are given."""
    first_pooled = pool_mask.index(True) if True in pool_mask else len(pool_mask)
    starts: list[int] = []
    token = 0
    for word in re.finditer(r"\S+", text):
        begin, end = text_start + word.start(), text_start + word.end()
        while token < len(spans) and (
            spans[token][1] <= begin or spans[token][0] == spans[token][1]
        ):
            token += 1  # tokens before the word, and special tokens (empty spans)
        if token == len(spans) or spans[token][0] >= end:
            break  # the rest of the text was cut at max_length
        # the pooled count is the text's own token count, which can differ by one from its
        # tokens inside the joined string: a word starting before the pooled tokens gets the first
        starts.append(max(token - first_pooled, 0))
    return starts
