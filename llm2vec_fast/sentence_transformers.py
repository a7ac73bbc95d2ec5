"""A sentence-transformers module that runs ``LLM2Vec`` on the packed runtime.

``llm2vec-fast export`` writes folders whose ``modules.json`` names ``LLM2VecModule`` by its
import path. sentence-transformers 6 imports a module class from outside its own package only
with ``trust_remote_code=True``, even from a local folder; the folder holds no code, so the flag
only lets it import this installed module. Without the flag, ``load_sentence_transformer(DIR)``
builds the same model through sentence-transformers' public constructor.

A prompt (``encode_query``, ``encode(..., prompt=...)``) reaches the encoder as the llm2vec
instruction of each text, so with ``skip_instruction`` it is read by the model but not pooled.
The module encodes only (under ``torch.inference_mode``): it cannot be trained through
sentence-transformers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import InputModule

from . import text as text_layer
from .encoder import LLM2Vec
from .export import encoder_settings, write_model_folder
from .settings import LLM2VEC_CONFIG_FILE

# sentence-transformers' model-level settings file (prompts, similarity function)
MODEL_SETTINGS_FILE = "config_sentence_transformers.json"


class LLM2VecModule(InputModule):
    """sentence-transformers' input module holding an ``LLM2Vec`` encoder.

    ``preprocess`` tokenizes as llm2vec does (the prompt as instruction), ``forward`` packs the
    batch and returns ``sentence_embedding`` ``(B, hidden)``. Saved as a transformers folder at
    the model's root, with the settings in ``llm2vec_config.json``.
    """

    config_file_name = LLM2VEC_CONFIG_FILE
    save_in_root = True

    def __init__(self, encoder: LLM2Vec) -> None:
        if encoder.sentence_head is not None:
            raise ValueError(
                "this encoder was read from a sentence-transformers folder with its own modules:"
                " load that folder with SentenceTransformer directly"
            )
        super().__init__()
        self.encoder = encoder
        self.model = encoder.model  # a submodule: SentenceTransformer.to(device) moves it
        self.tokenizer = encoder.tokenizer

    def __repr__(self) -> str:
        settings = ", ".join(
            f"{key}={value!r}" for key, value in encoder_settings(self.encoder).items()
        )
        return f"LLM2VecModule({settings})"

    @property
    def max_seq_length(self) -> int:
        return self.encoder.max_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        text_layer.check_positive_int("max_seq_length", value)
        self.encoder.max_length = value
        self.encoder.max_batch_tokens = max(self.encoder.max_batch_tokens, value)

    def get_config_dict(self) -> dict[str, Any]:
        return encoder_settings(self.encoder)

    def get_sentence_embedding_dimension(self) -> int:
        return self.encoder.embedding_dim

    def preprocess(
        self,
        inputs: Sequence[str | Sequence[str]],
        prompt: str | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        """Token ids ``(B, L)`` right-padded, their ``attention_mask`` and the ``pool_mask`` of the
        tokens pooling reads. ``inputs``: texts, or ``[instruction, text]`` pairs when no prompt
        is given."""
        if prompt:
            not_text = [i for i, item in enumerate(inputs) if not isinstance(item, str)]
            if not_text:  # not a TypeError: sentence-transformers retries those without prompt
                raise ValueError(
                    f"inputs[{not_text[0]}] is an [instruction, text] pair: with a prompt, give"
                    " plain texts (the prompt is their instruction)"
                )
            inputs = [[prompt, text] for text in inputs]
        items = self.encoder.tokenize(list(inputs))
        width = max((len(item.input_ids) for item in items), default=0)
        input_ids = torch.zeros(len(items), width, dtype=torch.long)
        attention_mask = torch.zeros(len(items), width, dtype=torch.long)
        pool_mask = torch.zeros(len(items), width, dtype=torch.bool)
        for row, item in enumerate(items):
            length = len(item.input_ids)
            input_ids[row, :length] = torch.tensor(item.input_ids, dtype=torch.long)
            attention_mask[row, :length] = 1
            pool_mask[row, :length] = torch.tensor(item.pool_mask, dtype=torch.bool)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pool_mask": pool_mask}

    def forward(self, features: dict[str, torch.Tensor], **kwargs: Any) -> dict[str, torch.Tensor]:
        """Add ``sentence_embedding`` ``(B, hidden)`` fp32, from one packed run of the batch."""
        lengths = features["attention_mask"].sum(dim=1).tolist()  # (B,)
        ids = features["input_ids"].tolist()
        pool_masks = features["pool_mask"].tolist()
        items = [
            text_layer.TokenizedText(row_ids[:length], row_mask[:length])
            for row_ids, row_mask, length in zip(ids, pool_masks, lengths)
        ]
        embeddings = self.encoder.embed_tokenized(items)  # (B, hidden) on the CPU
        features["sentence_embedding"] = embeddings.to(features["input_ids"].device)
        return features

    def save(self, output_path: str, *args: Any, **kwargs: Any) -> None:
        write_model_folder(self.encoder, Path(output_path))

    @classmethod
    def load(
        cls,
        model_name_or_path: str,
        subfolder: str = "",
        token: bool | str | None = None,
        cache_folder: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> LLM2VecModule:
        """The encoder of the folder, through ``LLM2Vec.from_pretrained``; ``model_kwargs`` are
        its keywords (``dtype``, ``device``, ``max_batch_tokens``, ``cuda_graphs``, ...)."""
        folder = cls.load_dir_path(
            model_name_or_path,
            subfolder=subfolder,
            token=token,
            cache_folder=cache_folder,
            revision=revision,
            local_files_only=local_files_only,
        )
        return cls(LLM2Vec.from_pretrained(folder, **(model_kwargs or {})))


def load_sentence_transformer(
    folder: str | Path,
    *,
    model_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> SentenceTransformer:
    """A ``SentenceTransformer`` of an exported folder without ``trust_remote_code``: the module
    is built here and the folder's prompts and similarity function are passed on.

    ``kwargs`` go to ``SentenceTransformer`` (``device``, ``truncate_dim``, ``prompts``, ...);
    ``model_kwargs`` to ``LLM2Vec.from_pretrained``.
    """
    folder = Path(folder)
    settings_path = folder / MODEL_SETTINGS_FILE
    settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
    for key in ("prompts", "default_prompt_name", "similarity_fn_name"):
        if settings.get(key) is not None:
            kwargs.setdefault(key, settings[key])
    module = LLM2VecModule.load(str(folder), model_kwargs=model_kwargs)
    return SentenceTransformer(modules=[module], **kwargs)
