"""Unsupervised SimCSE: each text twice through ONE packed forward pass with independent dropout.

The two copies of text ``i`` are a positive pair; the other texts of the (global) batch are the
negatives. Dropout is the model's attention dropout set to ``simcse_dropout`` (llm2vec sets the
config's ``attention_dropout``); every position draws its own mask, so the copies differ.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import kernels
from ..model import DecoderModel
from .config import TrainConfig
from .data import DataReport, encode_texts, pack_sequences, read_text_lines
from .distributed import DistContext


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
        batch = pack_sequences([item.input_ids for item in items], self.context.device)
        pool_mask = torch.tensor(
            [m for item in items for m in item.pool_mask], device=batch.input_ids.device
        )
        hidden = model(
            batch.input_ids,
            batch.cu_seqlens,
            batch.max_seqlen,
            batch.position_ids,
            causal=not self.config.bidirectional,
        )  # (T, hidden)
        pooled = kernels.masked_pool(
            hidden, batch.cu_seqlens, self.config.pooling_mode, pool_mask
        )  # (2B, hidden)
        first, second = pooled.float().chunk(2)
        return kernels.contrastive_loss(
            first,
            second,
            scale=float(self.config.loss_scale),
            gather_across_ranks=self.context.distributed,
        )

    @property
    def data_report(self) -> DataReport:
        return self.report
