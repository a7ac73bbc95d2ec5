"""MNTP, SimCSE and supervised losses against explicit, unpacked computations."""

import json
import random

import pytest
import torch
import torch.nn.functional as F
from model_helpers import runtime_from_hf, tiny_hf_model, tiny_tokenizer

from llm2vec_fast.kernels import reference
from llm2vec_fast.packed import Packed
from llm2vec_fast.train.config import config_from_dict
from llm2vec_fast.train.data import example_generator
from llm2vec_fast.train.distributed import DistContext
from llm2vec_fast.train.mntp import (
    IGNORE_INDEX,
    MNTPObjective,
    mask_block,
    mask_token_id,
    predecessor_rows,
)
from llm2vec_fast.train.simcse import SimCSEObjective
from llm2vec_fast.train.supervised import SupervisedObjective


def _lines(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(f"w{rng.randrange(3, 96)}" for _ in range(rng.randrange(2, 12)))
        for _ in range(count)
    ]


def _alone(model, ids: list[int]) -> torch.Tensor:
    """Hidden states of one sequence run by itself, bidirectional."""
    return model(Packed.from_sequences([ids]))


def test_mask_block_rules():
    special = {1, 2}
    ids = [1] + [7] * 4000 + [2]
    inputs, labels = mask_block(
        ids,
        special,
        0.5,
        False,
        mask_id=3,
        vocab_size=96,
        generator=torch.Generator().manual_seed(0),
    )
    assert labels[0] == labels[-1] == IGNORE_INDEX and inputs[0] == 1 and inputs[-1] == 2
    masked = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert abs(len(masked) / 4000 - 0.5) < 0.05 and all(labels[i] == 7 for i in masked)
    replaced = sum(inputs[i] == 3 for i in masked) / len(masked)
    kept = sum(inputs[i] == 7 for i in masked) / len(masked)
    assert abs(replaced - 0.8) < 0.04 and 0.06 < kept < 0.16  # kept: 10% + random draws of 7
    assert all(inputs[i] == 7 for i in range(len(ids)) if labels[i] == IGNORE_INDEX and ids[i] == 7)
    inputs, labels = mask_block(
        ids,
        special,
        1.0,
        True,
        mask_id=3,
        vocab_size=96,
        generator=torch.Generator().manual_seed(0),
    )
    assert inputs[1:-1] == [3] * 4000 and labels[1:-1] == [7] * 4000
    again = mask_block(ids, special, 0.5, False, 3, 96, torch.Generator().manual_seed(0))
    assert again == mask_block(ids, special, 0.5, False, 3, 96, torch.Generator().manual_seed(0))


def test_mask_token_choice():
    tokenizer = tiny_tokenizer()
    assert mask_token_id(tokenizer, "eos") == 2
    with pytest.raises(ValueError, match="'_' as one token"):
        mask_token_id(tokenizer, "blank")  # the tiny vocabulary has no '_'
    with pytest.raises(ValueError, match="no mask token"):
        mask_token_id(tokenizer, "mask")
    tokenizer.add_tokens(["_"])
    assert mask_token_id(tokenizer, "blank") == tokenizer.convert_tokens_to_ids("_")


def test_predecessor_rows_stay_inside_each_sequence():
    labels = torch.tensor([9, -100, 8, 7, -100, 6])
    cu_seqlens = torch.tensor([0, 3, 6], dtype=torch.int32)
    rows, targets = predecessor_rows(labels, cu_seqlens)
    assert rows.tolist() == [1, 4] and targets.tolist() == [8, 6]  # 9 and 7 open their sequence


def test_mntp_loss_equals_unpacked_cross_entropy(tmp_path):
    (tmp_path / "corpus.txt").write_text("\n".join(_lines(12, seed=0)) + "\n")
    config = config_from_dict(
        "mntp",
        {
            "model_name_or_path": "m",
            "output_dir": "o",
            "dataset_file_path": str(tmp_path / "corpus.txt"),
            "max_seq_length": 9,
            "mask_token_type": "eos",
            "mlm_probability": 0.4,
            "seed": 5,
        },
    )
    model = runtime_from_hf(tiny_hf_model("llama", seed=1))
    objective = MNTPObjective(config, tiny_tokenizer(), model, DistContext())
    indices, epoch = [3, 0, 5, 1], 2
    with torch.no_grad():
        packed = objective.loss(model, indices, epoch)
        total, count = 0.0, 0
        for index in indices:
            inputs, labels = mask_block(
                objective.blocks[index],
                objective.special,
                0.4,
                False,
                2,
                96,
                example_generator(5, epoch, index),
            )
            logits = _alone(model, inputs) @ model.lm_head_weight.T  # (L, V)
            shifted = torch.tensor(labels[1:])  # token i predicted from position i - 1
            total += F.cross_entropy(
                logits[:-1], shifted, ignore_index=IGNORE_INDEX, reduction="sum"
            ).item()
            count += int((shifted != IGNORE_INDEX).sum())
    assert count > 0
    torch.testing.assert_close(packed.item(), total / count, rtol=1e-5, atol=1e-6)


def _embed(model, tokenizer, instruction: str, text: str, mode: str = "mean") -> torch.Tensor:
    full = f"{instruction} {text}" if instruction else text
    ids = tokenizer(full)["input_ids"]
    pooled = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    hidden = _alone(model, ids)[len(ids) - pooled :]  # the instruction is not pooled
    return hidden.mean(0) if mode == "mean" else hidden[-1]


def test_simcse_loss_is_one_packed_pass_over_both_copies(tmp_path):
    texts = _lines(6, seed=1)
    (tmp_path / "corpus.txt").write_text("\n".join(texts) + "\n")
    values = {
        "model_name_or_path": "m",
        "output_dir": "o",
        "dataset_file_path": str(tmp_path / "corpus.txt"),
        "loss_scale": 5.0,
    }
    model = runtime_from_hf(tiny_hf_model("qwen2", seed=2)).train()
    tokenizer = tiny_tokenizer()
    objective = SimCSEObjective(
        config_from_dict("simcse", dict(values, simcse_dropout=0.0)),
        tokenizer,
        model,
        DistContext(),
    )
    indices = [4, 1, 2]
    with torch.no_grad():
        embeddings = torch.stack([_embed(model, tokenizer, "", texts[i]) for i in indices])
        expected = reference.contrastive_loss(embeddings, embeddings, scale=5.0)
        torch.testing.assert_close(
            objective.loss(model, indices, 0), expected, rtol=1e-5, atol=1e-6
        )
        SimCSEObjective(
            config_from_dict("simcse", values), tokenizer, model, DistContext()
        )  # dropout 0.3
        torch.manual_seed(0)
        with_dropout = [objective.loss(model, indices, 0).item() for _ in range(2)]
    assert with_dropout[0] != with_dropout[1] and with_dropout[0] > expected.item()


def test_supervised_loss_pools_queries_without_instruction(tmp_path):
    texts = _lines(12, seed=2)
    records = [
        {
            "query": texts[i],
            "positive": texts[i + 4],
            "negative": texts[i + 8],
            "instruction": "w90 w91",
        }
        for i in range(4)
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = config_from_dict(
        "supervised",
        {
            "model_name_or_path": "m",
            "output_dir": "o",
            "dataset_file_path": str(tmp_path / "train.jsonl"),
            "pooling_mode": "last_token",
        },
    )
    model = runtime_from_hf(tiny_hf_model("mistral", seed=3)).train()
    tokenizer = tiny_tokenizer()
    objective = SupervisedObjective(config, tokenizer, model, DistContext())
    indices = [2, 0, 3]
    with torch.no_grad():
        queries = torch.stack(
            [_embed(model, tokenizer, "w90 w91", records[i]["query"], "last") for i in indices]
        )
        docs = torch.stack(
            [
                _embed(model, tokenizer, "", records[i][field], "last")
                for field in ("positive", "negative")
                for i in indices
            ]
        )
        expected = reference.contrastive_loss(queries, docs, scale=50.0)
        torch.testing.assert_close(
            objective.loss(model, indices, 0), expected, rtol=1e-5, atol=1e-5
        )
    assert objective.queries[0].pool_mask[:2] == [False, False]


def test_supervised_texts_get_the_models_wrappers_as_llm2vec_trains_them(tmp_path):
    """llm2vec's supervised collator runs its prepare_for_tokenization: a Mistral-Instruct base
    (by config.json's _name_or_path) trains on "[INST] ... [/INST]", as the encoder then reads."""
    from llm2vec_fast.text import tokenize

    base = tmp_path / "base"
    base.mkdir()
    name = "mistralai/Mistral-7B-Instruct-v0.2"
    (base / "config.json").write_text(json.dumps({"_name_or_path": name}))
    texts = _lines(3, seed=4)
    (tmp_path / "train.jsonl").write_text(
        json.dumps(
            {
                "query": texts[0],
                "positive": texts[1],
                "negative": texts[2],
                "instruction": "w90 w91",
            }
        )
        + "\n"
    )
    config = config_from_dict(
        "supervised",
        {
            "model_name_or_path": str(base),
            "output_dir": "o",
            "dataset_file_path": str(tmp_path / "train.jsonl"),
        },
    )
    tokenizer = tiny_tokenizer()
    objective = SupervisedObjective(
        config, tokenizer, runtime_from_hf(tiny_hf_model("mistral", seed=3)), DistContext()
    )
    options = dict(
        max_length=config.max_seq_length, doc_max_length=config.max_seq_length, model_type="mistral"
    )
    wrapped = tokenize(tokenizer, [("w90 w91", texts[0]), texts[1]], model_name=name, **options)
    bare = tokenize(tokenizer, [("w90 w91", texts[0])], **options)
    assert objective.queries[0] == wrapped[0] and objective.positives[0] == wrapped[1]
    assert wrapped[0].input_ids != bare[0].input_ids
