"""Masked next-token prediction (MNTP), LLM2Vec's first training stage.

Tokens of packed blocks are masked as BERT's masked-LM does (never special tokens); the model
runs bidirectionally, and each masked token ``i`` is predicted from the hidden state at ``i - 1``
of the same sequence (a masked first token has no predecessor and is not predicted). Only those
rows reach ``mntp_loss``, so the full ``T x vocab`` logits never exist.

Masking modes (llm2vec's ``data_collator_type``): ``default`` replaces 80% of the masked tokens
by the mask token, 10% by a random token and keeps 10%; ``all_mask`` replaces all of them.
The mask token is chosen as llm2vec's ``run_mntp.py`` chooses it (``mask_token_id``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .. import kernels
from ..model import DecoderModel
from ..packed import Packed
from .config import TrainConfig
from .data import (
    DataReport,
    example_generator,
    mntp_chunks,
    read_text_lines,
    special_token_ids,
)
from .distributed import DistContext, all_reduce_sum

IGNORE_INDEX = -100
logger = logging.getLogger("llm2vec_fast.train")


def mask_token_id(tokenizer: Any, mask_token_type: str) -> int:
    """The id that replaces masked tokens, as llm2vec's ``run_mntp.py`` picks it.

    A tokenizer with a mask token of its own keeps it whatever ``mask_token_type`` says: llm2vec
    only sets one where the tokenizer has none. transformers' ``GemmaTokenizer`` gives Gemma and
    Gemma 3 ``<mask>`` (id 4). Llama's, Mistral's, Qwen2's and Qwen3's have none, and take ``_``
    (``blank``, one entry of each of their vocabularies) or the EOS token (``eos``). ``mask`` on
    such a tokenizer would need a new token and a resized embedding matrix, which LoRA training
    does not do, so it is refused.
    """
    if tokenizer.mask_token_id is not None:
        return int(tokenizer.mask_token_id)
    if mask_token_type == "eos":
        token_id = tokenizer.eos_token_id
        if token_id is None:
            raise ValueError("mask_token_type='eos' but the tokenizer has no EOS token")
        return int(token_id)
    if mask_token_type == "mask":
        raise ValueError(
            "mask_token_type='mask' but the tokenizer has no mask token; use 'blank' or 'eos'"
        )
    token_id = tokenizer.get_vocab().get("_")
    if token_id is None:
        raise ValueError(
            "mask_token_type='blank' needs '_' as one token of the vocabulary, which this"
            " tokenizer lacks; use 'eos'"
        )
    return int(token_id)


def mask_block(
    ids: list[int],
    special: set[int],
    probability: float,
    all_mask: bool,
    mask_id: int,
    vocab_size: int,
    generator: torch.Generator,
) -> tuple[list[int], list[int]]:
    """``(inputs, labels)`` of one block: labels hold the original id where masked, else -100."""
    original = torch.tensor(ids, dtype=torch.long)  # (L,)
    maskable = torch.tensor([token not in special for token in ids], dtype=torch.bool)
    masked = (torch.rand(len(ids), generator=generator) < probability) & maskable
    labels = torch.where(masked, original, torch.full_like(original, IGNORE_INDEX))
    inputs = original.clone()
    if all_mask:
        inputs[masked] = mask_id
    else:
        draw = torch.rand(len(ids), generator=generator)
        random_ids = torch.randint(vocab_size, (len(ids),), generator=generator)
        inputs = torch.where(masked & (draw < 0.8), torch.full_like(inputs, mask_id), inputs)
        inputs = torch.where(masked & (draw >= 0.8) & (draw < 0.9), random_ids, inputs)
    return inputs.tolist(), labels.tolist()


def predecessor_rows(
    labels: torch.Tensor, cu_seqlens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``i - 1`` whose hidden state predicts masked token ``i``, and those tokens' labels.

    A masked token at the start of a sequence is dropped: its predecessor is another sequence.
    """
    starts = torch.zeros_like(labels, dtype=torch.bool)
    starts[cu_seqlens[:-1].long().clamp_max(max(labels.numel() - 1, 0))] = True
    targets = torch.nonzero((labels != IGNORE_INDEX) & ~starts).squeeze(1)  # (N,)
    return targets - 1, labels[targets]


class MNTPObjective:
    def __init__(
        self, config: TrainConfig, tokenizer: Any, model: DecoderModel, context: DistContext
    ) -> None:
        texts, self.report = read_text_lines(config.data_path)
        self.blocks = mntp_chunks(
            tokenizer, texts, config.max_seq_length, config.line_by_line, self.report
        )
        if (
            config.max_train_samples is not None
        ):  # like llm2vec's run_mntp.py: of the blocks, not the lines
            self.blocks = self.blocks[: config.max_train_samples]
            self.report.notes.append(f"max_train_samples={config.max_train_samples} block(s)")
        self.special = special_token_ids(tokenizer)
        self.mask_id = mask_token_id(tokenizer, config.mask_token_type)
        if context.is_main:
            logger.info(
                "MNTP mask token: %r (id %d)",
                tokenizer.convert_ids_to_tokens(self.mask_id),
                self.mask_id,
            )
        self.vocab_size = min(len(tokenizer), model.config.vocab_size)
        self.lm_head_weight = (
            model.lm_head_weight
        )  # (vocab, hidden), frozen; the loss gets a DDP wrapper
        self.config = config
        self.context = context

    def __len__(self) -> int:
        return len(self.blocks)

    def loss(self, model: torch.nn.Module, indices: list[int], epoch: int) -> torch.Tensor:
        """This rank's share: the sum of its token losses / the masked count of all ranks x world,
        so that the mean over ranks is the mean loss over every masked token of the batch."""
        inputs, labels = [], []
        for index in indices:
            masked, target = mask_block(
                self.blocks[index],
                self.special,
                self.config.mlm_probability,
                self.config.data_collator_type == "all_mask",
                self.mask_id,
                self.vocab_size,
                example_generator(self.config.seed, epoch, index),
            )
            inputs.append(masked)
            labels.append(target)
        batch = Packed.from_sequences(inputs).to(self.context.device)
        flat_labels = torch.tensor(
            [t for seq in labels for t in seq], dtype=torch.long, device=batch.device
        )
        rows, targets = predecessor_rows(flat_labels, batch.cu_seqlens)
        hidden = model(batch)  # (T, hidden)
        local = torch.tensor(float(targets.numel()), device=hidden.device)
        total = all_reduce_sum(local, self.context)
        mean = kernels.mntp_loss(hidden[rows], self.lm_head_weight, targets)
        return mean * local * self.context.world / total.clamp_min(1.0)

    @property
    def data_report(self) -> DataReport:
        return self.report
