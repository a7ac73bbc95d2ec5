"""Unsupervised SimCSE: each text twice through ONE packed forward pass with independent dropout.

The two copies of text ``i`` are a positive pair; the other texts of the (global) batch are the
negatives. Dropout is the model's attention dropout set to ``simcse_dropout`` (llm2vec sets the
config's ``attention_dropout``); every position draws its own mask, so the copies differ.
"""

from __future__ import annotations

from typing import Any

import torch

from ..model import DecoderModel, forward_and_pool
from ..packed import Packed
from .config import TrainConfig
from .data import DataReport, encode_texts, read_text_lines
from .distributed import DistContext, gathered_contrastive_loss


class SimCSEObjective:
    def __init__(
        self, config: TrainConfig, tokenizer: Any, model: DecoderModel, context: DistContext
    ) -> None:
        texts, self.report = read_text_lines(config.data_path, config.max_train_samples)
        self.encoded = encode_texts(
            tokenizer, [("", text) for text in texts], config, model.config.model_type, self.report
        )
        model.set_dropout(attention=config.simcse_dropout, hidden=0.0)
        self.config = config
        self.context = context

    def __len__(self) -> int:
        return len(self.encoded)

    def loss(self, model: torch.nn.Module, indices: list[int], epoch: int) -> torch.Tensor:
        items = [self.encoded[i] for i in indices] * 2
        batch = Packed.from_tokenized(items).to(self.context.device)
        pooled = forward_and_pool(
            model, batch, self.config.pooling_mode, causal=self.config.causal
        )  # (2B, hidden)
        first, second = pooled.float().chunk(2)
        return gathered_contrastive_loss(
            first,
            second,
            scale=float(self.config.loss_scale),
            symmetric=False,
            context=self.context,
        )

    @property
    def data_report(self) -> DataReport:
        return self.report
