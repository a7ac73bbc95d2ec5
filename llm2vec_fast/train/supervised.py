"""Supervised contrastive training on (query, positive, hard negative) records.

The instruction goes on queries only and is not pooled. Queries, positives and negatives of a
batch run through ONE packed forward pass; each query is contrasted with every positive and
every hard negative of the batch, gathered across ranks under ``torchrun``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..model import DecoderModel, forward_and_pool
from ..packed import Packed
from ..text import model_identity
from .config import TrainConfig
from .data import DataReport, encode_texts, read_supervised_records
from .distributed import DistContext, gathered_contrastive_loss


class SupervisedObjective:
    def __init__(
        self, config: TrainConfig, tokenizer: Any, model: DecoderModel, context: DistContext
    ) -> None:
        records, self.report = read_supervised_records(config.data_path, config.max_train_samples)
        kind = model.config.model_type
        # llm2vec's supervised collator applies the model's wrappers (as its encoder does); its
        # SimCSE does not
        name = model_identity(config.model_name_or_path)

        def encode(pairs):
            return encode_texts(tokenizer, pairs, config, kind, self.report, model_name=name)

        self.queries = encode([(r["instruction"], r["query"]) for r in records])
        self.positives = encode([("", r["positive"]) for r in records])
        self.negatives = encode([("", r["negative"]) for r in records])
        by_file: dict[str, list[int]] = {}
        for index, record in enumerate(records):
            by_file.setdefault(record["source"], []).append(index)
        self.groups = list(by_file.values())  # a batch holds one file's (one task's) records
        batch = config.per_device_train_batch_size * context.world
        too_small = (
            [Path(f).name for f, rows in by_file.items() if len(rows) < batch]
            if len(by_file) > 1
            else []
        )
        if too_small:
            self.report.notes.append(
                f"{len(too_small)} file(s) hold fewer records than one batch of {batch} and are"
                f" never trained on: {', '.join(too_small[:5])}"
            )
        model.set_dropout(attention=config.simcse_dropout, hidden=0.0)
        self.config = config
        self.context = context

    def __len__(self) -> int:
        return len(self.queries)

    def loss(self, model: torch.nn.Module, indices: list[int], epoch: int) -> torch.Tensor:
        items = (
            [self.queries[i] for i in indices]
            + [self.positives[i] for i in indices]
            + [self.negatives[i] for i in indices]
        )
        batch = Packed.from_tokenized(items).to(self.context.device)
        pooled = forward_and_pool(
            model, batch, self.config.pooling_mode, causal=self.config.causal
        ).float()  # (3B, hidden)
        size = len(indices)
        return gathered_contrastive_loss(
            pooled[:size],
            pooled[size:],
            scale=float(self.config.loss_scale),
            symmetric=False,
            context=self.context,
        )

    @property
    def data_report(self) -> DataReport:
        return self.report
