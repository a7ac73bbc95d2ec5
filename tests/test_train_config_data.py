"""Training configs (llm2vec's train_configs format) and training data: validation and errors."""

import json
import logging
from types import SimpleNamespace

import pytest
import torch
from model_helpers import tiny_tokenizer

from llm2vec_fast.train.config import config_from_dict, load_config
from llm2vec_fast.train.data import (
    BatchOrder,
    DataReport,
    encode_texts,
    mntp_chunks,
    read_supervised_records,
    read_text_lines,
)

# llm2vec's train_configs/mntp/Mistral.json with local paths.
MISTRAL_MNTP = {
    "model_name_or_path": "models/Mistral-7B-Instruct-v0.2",
    "dataset_name": "wikitext",
    "dataset_config_name": "wikitext-103-raw-v1",
    "dataset_file_path": "wiki.train.raw",
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 32,
    "gradient_accumulation_steps": 1,
    "do_train": True,
    "do_eval": True,
    "max_seq_length": 512,
    "mask_token_type": "blank",
    "data_collator_type": "all_mask",
    "mlm_probability": 0.8,
    "overwrite_output_dir": True,
    "output_dir": "output/mlm/Mistral-7B-Instruct-v0.2",
    "evaluation_strategy": "steps",
    "eval_steps": 100,
    "save_steps": 200,
    "stop_after_n_steps": 1000,
    "lora_r": 16,
    "gradient_checkpointing": True,
    "torch_dtype": "bfloat16",
    "attn_implementation": "flash_attention_2",
}


def test_llm2vec_config_file_loads_and_names_ignored_keys(tmp_path, caplog):
    path = tmp_path / "Mistral.json"
    path.write_text(json.dumps(MISTRAL_MNTP))
    (tmp_path / "wiki.train.raw").write_text("text\n")
    with caplog.at_level(logging.INFO, logger="llm2vec_fast.train.config"):
        config = load_config("mntp", path)
    assert (config.mlm_probability, config.data_collator_type, config.mask_token_type) == (
        0.8,
        "all_mask",
        "blank",
    )
    assert (config.lora_r, config.lora_alpha, config.lora_dropout) == (16, 32, 0.05)
    assert config.data_path == tmp_path / "wiki.train.raw"  # relative to the config's folder
    assert "attn_implementation" in caplog.text and "eval_steps" in caplog.text
    assert config.total_steps == 1000


def test_objective_defaults_follow_the_paper():
    simcse = config_from_dict("simcse", {"model_name_or_path": "m", "output_dir": "o"})
    assert (
        simcse.simcse_dropout,
        simcse.learning_rate,
        simcse.per_device_train_batch_size,
        simcse.max_seq_length,
        simcse.loss_scale,
    ) == (0.3, 3e-5, 128, 128, 20.0)
    supervised = config_from_dict("supervised", {"model_name_or_path": "m", "output_dir": "o"})
    assert (
        supervised.learning_rate,
        supervised.warmup_steps,
        supervised.per_device_train_batch_size,
        supervised.loss_scale,
    ) == (2e-4, 300, 64, 50.0)
    mntp = config_from_dict("mntp", {"model_name_or_path": "m", "output_dir": "o"})
    assert (mntp.mlm_probability, mntp.mask_token_type, mntp.data_collator_type) == (
        0.2,
        "blank",
        "default",
    )


def test_config_errors_are_clear():
    base = {"model_name_or_path": "m", "output_dir": "o"}
    with pytest.raises(ValueError, match="unknown key.*learning_rat\\b"):
        config_from_dict("simcse", dict(base, learning_rat=1e-3))
    with pytest.raises(ValueError, match="dataset_file_path"):
        _ = config_from_dict("simcse", dict(base, dataset_name="Wiki1M")).data_path
    with pytest.raises(ValueError, match="mlm_probability"):
        config_from_dict("mntp", dict(base, mlm_probability=1.5))
    with pytest.raises(ValueError, match="output_dir is required"):
        config_from_dict("mntp", {"model_name_or_path": "m"})
    with pytest.raises(ValueError, match="unknown objective"):
        config_from_dict("mlm", base)
    for key, value, message in [
        (
            "line_by_line",
            "false",
            "line_by_line must be a boolean, got 'false'",
        ),  # a string is not False
        ("bidirectional", 0, "bidirectional must be a boolean"),
        ("learning_rate", "1e-4", "learning_rate must be a number \\(or null\\), got '1e-4'"),
        ("max_steps", 2.5, "max_steps must be an integer, got 2.5"),
        ("seed", "42", "seed must be an integer"),
        ("max_steps", 0, "max_steps must be -1 \\(epochs decide\\) or >= 1"),
        ("lora_alpha", -8, "lora_alpha must be > 0"),
        ("adam_beta2", 1.0, "adam_beta2 must be in \\[0, 1\\)"),
        ("max_train_samples", 0, "max_train_samples must be >= 1"),
    ]:
        with pytest.raises(ValueError, match=f"config: {message}"):
            config_from_dict("mntp", dict(base, **{key: value}))
    assert (
        config_from_dict(
            "mntp", dict(base, learning_rate=1, peft_model_name_or_path=None)
        ).learning_rate
        == 1
    )


def test_text_lines_count_empty_lines_and_reject_missing_files(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("first\n\n   \nsecond\n")
    texts, report = read_text_lines(path)
    assert texts == ["first", "second"] and report.empty_lines == 2
    assert "2 empty line(s) skipped" in report.summary()
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_text_lines(tmp_path / "nope.txt")
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(ValueError, match="bad.txt:2: not valid UTF-8"):
        read_text_lines(tmp_path / "bad.txt")
    texts, report = read_text_lines(
        tmp_path / "bad.txt", limit=1
    )  # max_train_samples: the first ones only
    assert texts == ["ok"] and "max_train_samples=1" in report.summary()


def test_supervised_records_errors_name_file_and_line(tmp_path):
    good = {"query": "q", "positive": "p", "negative": "n", "instruction": "i"}
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({"query": "q", "positive": "p"}) + "\n")
    with pytest.raises(ValueError, match=r"data.jsonl:3: record lacks field\(s\) negative"):
        read_supervised_records(path)
    path.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(ValueError, match="data.jsonl:2: not valid JSON"):
        read_supervised_records(path)
    path.write_text(json.dumps(dict(good, positive=" ")) + "\n")
    with pytest.raises(ValueError, match="data.jsonl:1: field positive is empty"):
        read_supervised_records(path)
    folder = tmp_path / "e5"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps(good) + "\n\n")
    (folder / "b.jsonl").write_text(
        json.dumps({k: v for k, v in good.items() if k != "instruction"}) + "\n"
    )
    records, report = read_supervised_records(folder)
    assert len(records) == 2 and records[1]["instruction"] == "" and report.empty_lines == 1
    assert "1 record(s) without an instruction" in report.summary()
    assert len(read_supervised_records(folder, limit=1)[0]) == 1


def test_encoding_pools_the_text_only_and_counts_truncation():
    tokenizer = tiny_tokenizer()
    report = DataReport(path=None)
    settings = SimpleNamespace(
        max_seq_length=6, pooling_mode="mean"
    )  # the TrainConfig fields it reads
    encoded = encode_texts(
        tokenizer,
        [("w3 w4", "w5 w6 w7"), ("", "w8"), ("", " ".join(["w9"] * 10))],
        settings,
        "llama",
        report,
    )
    assert encoded[0].input_ids == tokenizer("w3 w4 w5 w6 w7")["input_ids"]
    assert encoded[0].pool_mask == [False, False, True, True, True]
    assert encoded[1].pool_mask == [True]
    assert len(encoded[2].input_ids) == 6 and all(encoded[2].pool_mask)
    assert report.truncated_texts == 1


def test_mntp_blocks_keep_every_token():
    tokenizer = tiny_tokenizer()
    texts = ["w3 w4 w5", "w6 w7", "w8 w9 w10 w11"]
    report = DataReport(path=None)
    blocks = mntp_chunks(tokenizer, texts, 4, line_by_line=False, report=report)
    assert [len(b) for b in blocks] == [4, 4, 1]
    assert sum(blocks, []) == sum((tokenizer(t)["input_ids"] for t in texts), [])
    assert (
        mntp_chunks(tokenizer, texts, 3, line_by_line=True, report=report)[2]
        == tokenizer("w8 w9 w10")["input_ids"]
    )
    assert report.truncated_texts == 1


def test_batch_order_is_a_deterministic_partition_across_ranks():
    single = BatchOrder(num_examples=10, per_device=4, world=1, seed=3)
    split = BatchOrder(num_examples=10, per_device=2, world=2, seed=3)
    assert single.batches_per_epoch == 2 and single.unused_per_epoch == 2
    for micro in range(5):  # crosses epoch boundaries
        assert single.indices(micro, 0) == split.indices(micro, 0) + split.indices(micro, 1)
    epoch0 = single.indices(0, 0) + single.indices(1, 0)
    assert len(set(epoch0)) == 8
    assert single.indices(2, 0) + single.indices(3, 0) != epoch0  # a new permutation each epoch
    assert BatchOrder(10, 4, 1, seed=3).indices(3, 0) == single.indices(3, 0)
    with pytest.raises(ValueError, match="fewer than one batch"):
        BatchOrder(num_examples=3, per_device=2, world=2, seed=0)


def test_grouped_batches_hold_one_group_each_and_cover_its_full_batches():
    """Supervised data from several files: each batch is one file's records (llm2vec's
    per-dataset batches)."""
    groups = [list(range(0, 9)), list(range(9, 15)), [15]]  # 9, 6 and 1 records
    single = BatchOrder(num_examples=16, per_device=2, world=1, seed=5, groups=groups)
    split = BatchOrder(num_examples=16, per_device=1, world=2, seed=5, groups=groups)
    assert single.batches_per_epoch == 4 + 3 + 0
    epochs = []
    for epoch in range(2):
        batches = [single.indices(epoch * 7 + b, 0) for b in range(7)]
        for b, batch in enumerate(batches):
            assert batch == split.indices(epoch * 7 + b, 0) + split.indices(epoch * 7 + b, 1)
            assert any(set(batch) <= set(group) for group in groups), batch
        flat = [i for batch in batches for i in batch]
        assert len(set(flat)) == 14 and sum(i < 9 for i in flat) == 8  # one of the 9 left over
        epochs.append(flat)
    assert epochs[0] != epochs[1]
    with pytest.raises(ValueError, match="in any of its 2 files"):
        BatchOrder(num_examples=4, per_device=3, world=1, seed=0, groups=[[0, 1], [2, 3]])


@pytest.mark.parametrize("kind", ["linear", "constant", "constant_with_warmup", "cosine"])
def test_learning_rate_schedules_equal_transformers(kind):
    from transformers import get_scheduler

    from llm2vec_fast.train.loop import lr_lambda

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = get_scheduler(kind, optimizer, num_warmup_steps=3, num_training_steps=10)
    ours = lr_lambda(kind, warmup=3, horizon=10)
    expected = []
    for _ in range(12):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        theirs.step()
    assert [ours(step) for step in range(12)] == pytest.approx(expected, abs=1e-12)
