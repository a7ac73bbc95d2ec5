"""The small interface the corpus job needs from an encoder, and its two implementations.

The job only ever calls ``tokenize``, ``embed`` and ``describe``, so it can be tested with
:class:`HashEngine` (deterministic, no model, instant) and run with :class:`LLM2VecEngine`
(the real encoder).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from llm2vec_fast.files import sha256_of_path
from llm2vec_fast.settings import DEFAULT_MAX_BATCH_TOKENS, DEFAULT_MAX_LENGTH

Text = str | tuple[str, str]  # a text, or an (instruction, text) pair


@dataclass
class Item:
    """One tokenized text: the ids the model sees and which of them are pooled. ``tokenize``
    gives lists; the job's pipeline hands ``embed`` 1-D numpy views of its flat token arrays."""

    input_ids: Sequence[int]  # a list, or a (tokens,) integer array
    pool_mask: Sequence[bool]  # a list, or a (tokens,) bool array
    truncated: bool = False


class Progress(Protocol):
    def update(self, n: int) -> object: ...  # a tqdm bar, say


class Engine(Protocol):
    def tokenize(self, texts: list[Text]) -> list[Item]: ...

    def embed(self, items: list[Item], progress: Progress | None = None) -> np.ndarray:
        """(n, dim) float32 embeddings of ``items``, in their order; ``progress.update(k)`` as k
        more are done. The engine packs its own batches: the job hands it many items at once."""
        ...

    def describe(self) -> dict:
        """What decides the numbers: model, adapters (with file hashes), pooling, max_length,
        dtype, normalize, dim. Two runs with equal descriptions give the same embeddings."""
        ...


FAKE_PREFIX = "fake:"


SEED_BYTES = 8  # a row's seed: a 64-bit hash of its pooled ids


def seeded_normal_table(dim: int) -> np.ndarray:
    """(SEED_BYTES, 256, dim) float32: one N(0, 1 / SEED_BYTES) vector per value of each byte of
    a seed, fixed for a dim."""
    rng = np.random.default_rng(dim)
    table = rng.standard_normal((SEED_BYTES, 256, dim), dtype=np.float32)
    return table / np.float32(np.sqrt(SEED_BYTES))


def normal_rows(seeds: np.ndarray, table: np.ndarray) -> np.ndarray:
    """(rows, dim) float32, N(0, 1) per dimension: for each row, the sum over its seed's bytes of
    that byte's table vector. Seeds that differ give different rows (the same seed, the same row)
    at the cost of a few vector adds a row, where a numpy generator per row costs microseconds to
    create."""
    seed_bytes = seeds.astype("<u8").view(np.uint8).reshape(-1, SEED_BYTES)  # (rows, 8)
    out = table[0][seed_bytes[:, 0]]  # (rows, dim)
    for byte in range(1, SEED_BYTES):
        out += table[byte][seed_bytes[:, byte]]
    return out


class HashEngine:
    """A deterministic stand-in for a model, for tests and dry runs (``--model fake:dim=16``).

    Tokens are the UTF-8 bytes of the text (the instruction's bytes are not pooled); an embedding
    is a pseudo-random normal vector drawn from a hash of the pooled ids (``normal_rows``), so
    equal texts get equal embeddings in any batch; drawing costs a few vector adds a row, so that
    a dry run measures the job's pipeline rather than the stand-in. ``delay`` seconds per
    ``embed`` call simulate compute (the job makes a call per shard).
    """

    def __init__(
        self,
        dim: int = 16,
        max_length: int = DEFAULT_MAX_LENGTH,
        normalize: bool = False,
        delay: float = 0.0,
    ):
        if dim < 1 or max_length < 1:
            raise ValueError(
                "HashEngine needs dim >= 1 and max_length >= 1,"
                f" got dim={dim}, max_length={max_length}"
            )
        self.dim = dim
        self.max_length = max_length
        self.normalize = normalize
        self.delay = delay

    @cached_property
    def table(self) -> np.ndarray:
        """(SEED_BYTES, 256, dim): built on the first ``embed``, so that tokenizer processes,
        which get a pickled copy of the engine, do not carry it."""
        return seeded_normal_table(self.dim)

    @classmethod
    def from_spec(
        cls, spec: str, max_length: int = DEFAULT_MAX_LENGTH, normalize: bool = False
    ) -> "HashEngine":
        """``fake:`` or ``fake:dim=16,delay=0.01``."""
        options: dict[str, float] = {}
        body = spec[len(FAKE_PREFIX) :]
        for part in filter(None, body.split(",")):
            key, sep, value = part.partition("=")
            if not sep or key not in ("dim", "delay"):
                raise ValueError(f"bad fake model spec {spec!r}: expected fake:dim=N,delay=SECONDS")
            options[key] = float(value)
        return cls(int(options.get("dim", 16)), max_length, normalize, options.get("delay", 0.0))

    def tokenize(self, texts: list[Text]) -> list[Item]:
        items = []
        for text in texts:
            instruction, body = text if isinstance(text, tuple) else ("", text)
            prefix = list(instruction.encode("utf-8"))
            ids = (prefix + list(body.encode("utf-8")))[: self.max_length]
            items.append(
                Item(
                    ids,
                    [i >= len(prefix) for i in range(len(ids))],
                    len(prefix) + len(body.encode("utf-8")) > self.max_length,
                )
            )
        return items

    def embed(self, items: list[Item], progress: Progress | None = None) -> np.ndarray:
        if self.delay:
            time.sleep(self.delay)
        seeds = np.empty(len(items), dtype=np.uint64)
        for row, item in enumerate(items):
            ids = np.asarray(item.input_ids)  # (tokens,): byte values
            pooled = ids[np.asarray(item.pool_mask, dtype=bool)].astype(np.uint8).tobytes()
            seeds[row] = int.from_bytes(hashlib.blake2b(pooled, digest_size=8).digest(), "little")
        out = normal_rows(seeds, self.table)
        if self.normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        if progress is not None:
            progress.update(len(items))
        return out

    def describe(self) -> dict:
        return {
            "model": "fake",
            "adapters": [],
            "pooling": "hash",
            "vectors": "byte tables",  # normal_rows: a job with other fake vectors is refused
            "max_length": self.max_length,
            "dtype": "float32",
            "normalize": self.normalize,
            "dim": self.dim,
        }


@dataclass
class LLM2VecEngine:
    """The real engine: ``llm2vec_fast.LLM2Vec`` behind the job's interface."""

    model_path: str
    adapters: Sequence[str] = ()
    pooling_mode: str | None = None  # None: the folder's llm2vec_config.json, else mean
    max_length: int | None = None  # None: the folder's llm2vec_config.json, else 512
    device: str | None = None
    dtype: str | None = None
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    normalize: bool = False
    causal: bool = False
    cuda_graphs: bool = False
    doc_max_length: int | None = None  # llm2vec's word cut; None: max_length alone decides
    dim: int | None = None  # Matryoshka: keep the first dim dimensions
    prompt: str | None = None  # before every bare text (see LLM2Vec.resolve_prompt)
    prompt_name: str | None = None  # one of the model's prompts; None: prompt, else the default
    model: object = field(init=False, repr=False)
    _description: dict | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        import torch

        from llm2vec_fast.encoder import LLM2Vec

        if self.device in (None, "cuda") and torch.cuda.is_available():
            self.device = (
                f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"  # torchrun: one GPU per process
            )
        self.model = LLM2Vec.from_pretrained(
            self.model_path,
            adapters=list(self.adapters),
            pooling_mode=self.pooling_mode,
            max_length=self.max_length,
            doc_max_length=self.doc_max_length,
            device=self.device,
            dtype=self.dtype,
            max_batch_tokens=self.max_batch_tokens,
            enable_bidirectional=False
            if self.causal
            else None,  # None: as the adapter was trained (else True)
            cuda_graphs=self.cuda_graphs,
            truncate_dim=self.dim,
        )
        self.prompt = self.model.resolve_prompt(self.prompt, self.prompt_name)
        if self.doc_max_length is None:  # max_length alone decides: no llm2vec word cut at 400
            self.model.doc_max_length = self.model.max_length
        self.pooling_mode, self.max_length = self.model.pooling_mode, self.model.max_length

    def tokenize(self, texts: list[Text]) -> list[Item]:
        # TokenizedText: input_ids, pool_mask, truncated
        return self.model.tokenize(texts, prompt=self.prompt)

    def tokenization(self):
        """``tokenize`` alone, picklable (``LLM2Vec.tokenization``): for tokenizer processes."""
        return self.model.tokenization(prompt=self.prompt)

    def resolve_prompt(self, prompt: str | None, prompt_name: str | None) -> str | None:
        """The text a prompt or prompt name stands for with this model."""
        return self.model.resolve_prompt(prompt, prompt_name)

    def embed(self, items: list[Item], progress: Progress | None = None) -> np.ndarray:
        # one call packs many batches: on a GPU they run back to back, the host packing the next
        return self.model.embed_tokenized(
            items, normalize=self.normalize, progress=progress
        ).numpy()  # (n, dim) fp32

    def describe(self) -> dict:
        """Computed once: it hashes the model and adapter files."""
        if self._description is None:
            description = dict(self.model.describe())
            description["adapters"] = [
                {"path": str(Path(a).resolve()), "sha256": sha256_of_path(a)} for a in self.adapters
            ]
            description["pooling"] = description.get("pooling_mode", self.pooling_mode)
            description["normalize"] = self.normalize
            if self.prompt is not None:  # recorded only when one applies: prompt-less jobs match
                description["prompt"] = self.prompt
            self._description = description
        return dict(self._description)


def load_engine(
    model: str | None,
    adapters: Sequence[str] = (),
    *,
    pooling_mode: str | None = None,
    max_length: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    normalize: bool = False,
    causal: bool = False,
    cuda_graphs: bool = False,
    doc_max_length: int | None = None,
    dim: int | None = None,
    prompt: str | None = None,
    prompt_name: str | None = None,
) -> Engine:
    """The engine for ``--model``: ``fake:...`` gives a :class:`HashEngine`; None the default
    encoder (``default_encoder``: the embedded SmolLM2 with the shipped LLM2Vec adapters, unless
    ``adapters`` are given or ``causal`` asks for the untouched decoder).

    ``doc_max_length``: llm2vec's rule that drops a text's trailing words past that many tokens;
    None leaves ``max_length`` alone to decide (a text keeps its first max_length tokens). A job
    that recorded a value reloads with it.

    ``causal`` keeps the model's causal attention (llm2vec's ``enable_bidirectional=False``): the
    better choice for a base model that has not been trained the LLM2Vec way. ``cuda_graphs``
    replays each batch from a CUDA graph on a GPU (see ``llm2vec_fast.cuda_graphs``).
    ``dim`` keeps the first dimensions of each embedding (Matryoshka); ``prompt`` /
    ``prompt_name`` choose the prompt put before every text, as ``LLM2Vec.encode`` does.
    """
    if model is not None and str(model).startswith(FAKE_PREFIX):
        if adapters:
            raise ValueError("the fake model takes no adapters")
        if dim is not None or prompt is not None or prompt_name is not None:
            raise ValueError("the fake model takes no dim or prompt (its dimension: fake:dim=N)")
        return HashEngine.from_spec(
            str(model), max_length=max_length or DEFAULT_MAX_LENGTH, normalize=normalize
        )
    if model is None:
        from llm2vec_fast.default_encoder import default_adapter_paths
        from llm2vec_fast.default_model import default_model_path

        model = str(default_model_path())
        if not adapters and not causal:  # --causal alone: the untouched decoder (STS-B 37)
            adapters = default_adapter_paths()
    return LLM2VecEngine(
        str(model),
        tuple(str(a) for a in adapters),
        pooling_mode,
        max_length,
        device,
        dtype,
        max_batch_tokens,
        normalize,
        causal,
        cuda_graphs,
        doc_max_length,
        dim=dim,
        prompt=prompt,
        prompt_name=prompt_name,
    )
