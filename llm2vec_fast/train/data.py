"""Training data from local files: reading, validation, tokenization, and a resumable batch order.

- MNTP and SimCSE read plain text, one text per line (``wiki1m_for_simcse.txt``, WikiText raw).
- Supervised training reads JSONL records ``{"query", "positive", "negative", "instruction"}``
  from a file or from every ``*.jsonl`` file of a folder (the layout of llm2vec's E5 data).

Bad data never disappears silently: an unreadable file, invalid JSON or a record missing a
field raises with the file and line; empty lines are skipped and counted; texts longer than
``max_seq_length`` are truncated (as llm2vec does) and counted. ``DataReport`` carries the counts
that the training log prints.

The batch order depends only on the seed and the position in the run: epoch ``e`` visits the
examples in ``randperm(N)`` drawn from ``seed + e``, so a resumed or a distributed run sees the
same batches as an uninterrupted single-process one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..text import TokenizedText, tokenize
from .config import TrainConfig

SUPERVISED_FIELDS = ("query", "positive", "negative")


@dataclass
class DataReport:
    """What reading and tokenizing the data skipped or changed, for the log."""

    path: Path | None
    records: int = 0
    empty_lines: int = 0
    truncated_texts: int = 0
    dropped_tail_examples: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [
            f"{self.records} record(s) from {self.path}",
            f"{self.empty_lines} empty line(s) skipped",
            f"{self.truncated_texts} text(s) truncated to max_seq_length",
        ]
        if self.dropped_tail_examples:
            parts.append(
                f"{self.dropped_tail_examples} example(s) past the last full batch of each epoch"
                " unused"
            )
        return "; ".join(parts + self.notes)


def _data_files(path: Path, suffix: str | None) -> list[Path]:
    if not path.exists():
        raise FileNotFoundError(
            f"training data not found: {path} (dataset_file_path in the config)"
        )
    if path.is_file():
        return [path]
    files = sorted(
        p for p in path.iterdir() if p.is_file() and (suffix is None or p.suffix == suffix)
    )
    if not files:
        raise FileNotFoundError(f"no {suffix or ''} files in the data folder {path}")
    return files


def _lines(path: Path):
    """``(line number, text without the newline)``; undecodable bytes raise with the line."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid UTF-8 ({error})") from error


def read_text_lines(path: str | Path, limit: int | None = None) -> tuple[list[str], DataReport]:
    """Non-empty lines of a text file (or of every file in a folder), the first ``limit`` of them
    (``max_train_samples``) when given; empty lines are counted."""
    path = Path(path)
    report = DataReport(path)
    texts = []
    for file in _data_files(path, None):
        if limit is not None and len(texts) == limit:
            break
        for _, line in _lines(file):
            if not line.strip():
                report.empty_lines += 1
                continue
            texts.append(line)
            if limit is not None and len(texts) == limit:
                break
    report.records = len(texts)
    if limit is not None:
        report.notes.append(f"max_train_samples={limit}")
    if not texts:
        raise ValueError(f"{path}: no text (every line is empty)")
    return texts, report


def read_supervised_records(
    path: str | Path, limit: int | None = None
) -> tuple[list[dict[str, str]], DataReport]:
    """Records ``{query, positive, negative, instruction}`` from a JSONL file or folder of them, the
    first ``limit`` when given. Each record carries its own instruction (llm2vec's E5 files take
    theirs from a table keyed by file name, which this reader does not have): the log counts the
    records without one."""
    path = Path(path)
    report = DataReport(path)
    records = []
    for file in _data_files(path, ".jsonl"):
        if limit is not None and len(records) == limit:
            break
        for number, line in _lines(file):
            if not line.strip():
                report.empty_lines += 1
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{file}:{number}: not valid JSON ({error.msg})") from error
            if not isinstance(record, dict):
                raise ValueError(
                    f"{file}:{number}: a record must be a JSON object, got {type(record).__name__}"
                )
            missing = [name for name in SUPERVISED_FIELDS if name not in record]
            if missing:
                raise ValueError(
                    f"{file}:{number}: record lacks field(s) {', '.join(missing)} (needs"
                    f" {', '.join(SUPERVISED_FIELDS)}, optional instruction)"
                )
            for name in (*SUPERVISED_FIELDS, "instruction"):
                value = record.get(name, "")
                if not isinstance(value, str):
                    raise ValueError(
                        f"{file}:{number}: field {name} must be a string,"
                        f" got {type(value).__name__}"
                    )
            for name in SUPERVISED_FIELDS:
                if not record[name].strip():
                    raise ValueError(f"{file}:{number}: field {name} is empty")
            records.append(
                {
                    **{name: record.get(name, "") for name in (*SUPERVISED_FIELDS, "instruction")},
                    "source": str(file),
                }
            )
            if limit is not None and len(records) == limit:
                break
    report.records = len(records)
    if limit is not None:
        report.notes.append(f"max_train_samples={limit}")
    without = sum(not record["instruction"] for record in records)
    if without:
        report.notes.append(
            f"{without} record(s) without an instruction (their queries are embedded bare)"
        )
    if not records:
        raise ValueError(f"{path}: no records")
    return records, report


def encode_texts(
    tokenizer: Any,
    pairs: list[tuple[str, str]],
    config: TrainConfig,
    model_type: str,
    report: DataReport | None = None,
    model_name: str = "",
) -> list[TokenizedText]:
    """Tokenize ``(instruction, text)`` pairs exactly as the encoder will at inference time.

    ``text.tokenize`` (llm2vec's rules): the model reads ``instruction + " " + text`` and pools
    only the text's own tokens; ``model_name`` (llm2vec's ``_name_or_path``) selects its
    model-specific wrappers (``[INST] ... [/INST]`` for Mistral-Instruct, say). Texts longer than
    ``max_seq_length`` tokens keep their first tokens (``doc_max_length = max_seq_length``: no
    llm2vec word cut); each cut is counted in ``report``.
    """
    items = tokenize(
        tokenizer,
        pairs,
        max_length=config.max_seq_length,
        doc_max_length=config.max_seq_length,
        skip_instruction=True,
        pooling_mode=config.pooling_mode,
        model_name=model_name,
        model_type=model_type,
    )
    if report is not None:
        report.truncated_texts += sum(item.truncated for item in items)
    return items


def special_token_ids(tokenizer: Any) -> set[int]:
    return {int(i) for i in tokenizer.all_special_ids}


def mntp_chunks(
    tokenizer: Any, texts: list[str], max_length: int, line_by_line: bool, report: DataReport
) -> list[list[int]]:
    """Token blocks for MNTP, close to transformers' ``run_mlm`` (llm2vec's ``run_mntp`` adapts
    it).

    ``line_by_line=False``: all lines tokenized (with special tokens), concatenated and cut into
    blocks of ``max_length`` tokens. Unlike run_mlm, which cuts each group of 1,000 lines apart
    and drops each group's short remainder, the stream is one group and its last, shorter block
    is kept. ``True``: one block per line, truncated to ``max_length`` (counted in the report).
    """
    ids = tokenizer(texts, add_special_tokens=True, return_attention_mask=False)["input_ids"]
    if line_by_line:
        blocks = []
        for seq in ids:
            if len(seq) > max_length:
                report.truncated_texts += 1
            blocks.append(list(seq[:max_length]))
        return blocks
    stream = [token for seq in ids for token in seq]
    return [stream[start : start + max_length] for start in range(0, len(stream), max_length)]


class BatchOrder:
    """Which examples micro-batch ``m`` of the run holds, on this rank.

    A micro-batch is ``per_device * world`` examples of the epoch's permutation; rank ``r``
    takes the ``r``-th slice of ``per_device``. Examples past the last full micro-batch of an
    epoch are unused in that epoch (another permutation uses them in the next).

    ``groups`` (lists of example indices): a micro-batch holds examples of one group only, as
    llm2vec's supervised runs draw each batch from one dataset (in-batch negatives of the same
    task are the hard ones); each group's remainder is unused in that epoch.
    """

    def __init__(
        self,
        num_examples: int,
        per_device: int,
        world: int,
        seed: int,
        groups: Sequence[Sequence[int]] | None = None,
    ) -> None:
        self.num_examples = num_examples
        self.per_device = per_device
        self.world = world
        self.seed = seed
        self.global_batch = per_device * world
        self.groups = (
            [list(group) for group in groups] if groups is not None and len(groups) > 1 else None
        )
        sizes = [len(group) for group in self.groups] if self.groups else [num_examples]
        self.batches_per_epoch = sum(size // self.global_batch for size in sizes)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the data has {num_examples} example(s), fewer than one batch of"
                f" {self.global_batch} (per_device_train_batch_size={per_device} x {world}"
                " process(es))"
                + (
                    f" in any of its {len(sizes)} files (a batch holds one file's records)"
                    if self.groups
                    else ""
                )
            )
        self._epoch = -1
        self._permutation = torch.empty(0, dtype=torch.long)

    @property
    def unused_per_epoch(self) -> int:
        return self.num_examples - self.batches_per_epoch * self.global_batch

    def epoch_of(self, micro_batch: int) -> int:
        return micro_batch // self.batches_per_epoch

    def indices(self, micro_batch: int, rank: int) -> list[int]:
        epoch = self.epoch_of(micro_batch)
        if epoch != self._epoch:
            self._permutation = self._epoch_order(epoch)
            self._epoch = epoch
        start = (micro_batch % self.batches_per_epoch) * self.global_batch + rank * self.per_device
        return self._permutation[start : start + self.per_device].tolist()

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        """The epoch's examples in batch order: a permutation, or each group's full batches
        shuffled."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        if self.groups is None:
            return torch.randperm(self.num_examples, generator=generator)
        batches = []
        for group in self.groups:
            shuffled = torch.tensor(group)[torch.randperm(len(group), generator=generator)]
            full = len(group) // self.global_batch * self.global_batch
            batches += list(shuffled[:full].view(-1, self.global_batch))
        return torch.cat(
            [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        )


def example_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator private to one example in one epoch: its random masking never depends on
    which rank or batch it lands in, nor on what ran before."""
    return torch.Generator().manual_seed(
        ((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % 2**63
    )
