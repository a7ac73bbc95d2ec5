"""Base -> MNTP adapter -> SimCSE adapter through the ``train`` command, loaded back by LLM2Vec."""

import argparse
import json
import random

import pytest
import torch
from model_helpers import save_tiny_folder, tiny_hf_model

from llm2vec_fast import LLM2Vec
from llm2vec_fast.loading import load_model
from llm2vec_fast.packed import Packed
from llm2vec_fast.text import model_identity
from llm2vec_fast.train import run
from llm2vec_fast.train.cli import add_parser


def _train_command(objective: str, config_path) -> int:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", objective, str(config_path)])
    return args.run(args)


def test_mntp_then_simcse_adapters_load_as_an_encoder(tmp_path, caplog):
    base = save_tiny_folder(tiny_hf_model("llama", seed=0, num_hidden_layers=1), tmp_path / "base")
    base_config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(
        json.dumps({**base_config, "_name_or_path": "tiny/llama-base"})
    )
    rng = random.Random(0)
    lines = [
        " ".join(f"w{rng.randrange(3, 96)}" for _ in range(rng.randrange(2, 9))) for _ in range(16)
    ]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
    common = {
        "model_name_or_path": str(base),
        "dataset_file_path": "corpus.txt",
        "per_device_train_batch_size": 4,
        "max_seq_length": 8,
        "stop_after_n_steps": 2,
        "lora_r": 4,
        "learning_rate": 1e-2,
        "attn_implementation": "flash_attention_2",
        "torch_dtype": "bfloat16",
    }
    mntp_config = tmp_path / "mntp.json"
    mntp_config.write_text(
        json.dumps(dict(common, output_dir=str(tmp_path / "mntp"), mask_token_type="eos"))
    )
    assert _train_command("mntp", mntp_config) == 0
    simcse_config = tmp_path / "simcse.json"
    simcse_config.write_text(
        json.dumps(
            dict(
                common,
                output_dir=str(tmp_path / "simcse"),
                peft_model_name_or_path=str(tmp_path / "mntp"),
            )
        )
    )
    assert _train_command("simcse", simcse_config) == 0

    # llm2vec's LLM2Vec.__init__ takes every key of llm2vec_config.json: only its own keys there
    saved = json.loads((tmp_path / "simcse" / "llm2vec_config.json").read_text())
    assert saved == {
        "pooling_mode": "mean",
        "max_length": 8,
        "doc_max_length": 400,
        "skip_instruction": True,
    }
    # each stage carries the base's config.json and identity, as llm2vec's MNTP folders do: loaded
    # the llm2vec way (MNTP folder as the base), the text wrappers are those training used
    for stage in ("mntp", "simcse", "simcse/checkpoint-2"):
        carried = json.loads((tmp_path / stage / "config.json").read_text())
        assert carried["_name_or_path"] == model_identity(base) == "tiny/llama-base"
    assert (
        LLM2Vec.from_pretrained(
            tmp_path / "mntp", peft_model_name_or_path=tmp_path / "simcse"
        ).model_name
        == "tiny/llama-base"
    )
    assert (
        LLM2Vec.from_pretrained(tmp_path / "simcse").enable_bidirectional is True
    )  # from train_config.json
    trained = json.loads((tmp_path / "simcse" / "train_config.json").read_text())
    (tmp_path / "simcse" / "train_config.json").write_text(
        json.dumps({**trained, "bidirectional": False})
    )
    assert LLM2Vec.from_pretrained(tmp_path / "simcse").enable_bidirectional is False

    adapter = json.loads((tmp_path / "simcse" / "adapter_config.json").read_text())
    assert (
        adapter["base_model_name_or_path"] == str((tmp_path / "mntp").resolve())
        and adapter["r"] == 4
    )

    # the llm2vec way of loading the chain, and the adapter folder alone (it names the MNTP folder)
    encoder = LLM2Vec.from_pretrained(
        tmp_path / "mntp", peft_model_name_or_path=tmp_path / "simcse", pooling_mode="mean"
    )
    chained, _ = load_model(tmp_path / "simcse")
    base_model, _ = load_model(base)
    packed = Packed.from_sequences([[5, 9, 13, 40]])
    with torch.no_grad():
        merged = encoder.model(packed)
        torch.testing.assert_close(chained(packed), merged, rtol=1e-5, atol=1e-5)
        # training moved the weights
        assert (base_model(packed) - merged).abs().max() > 1e-4
    assert encoder.encode(lines[:3], show_progress_bar=False).shape == (3, 64)


def test_hub_dataset_without_local_file_is_a_clear_error(tmp_path):
    base = save_tiny_folder(tiny_hf_model("llama", seed=0, num_hidden_layers=1), tmp_path / "base")
    config = {
        "model_name_or_path": str(base),
        "output_dir": str(tmp_path / "out"),
        "dataset_name": "Wiki1M",
    }
    with pytest.raises(ValueError, match="set dataset_file_path"):
        run("simcse", config)
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        run("simcse", dict(config, dataset_file_path=str(tmp_path / "nowhere.txt")))


def test_supervised_trainer_draws_each_batch_from_one_file(tmp_path):
    from llm2vec_fast.train.config import config_from_dict
    from llm2vec_fast.train.distributed import DistContext
    from llm2vec_fast.train.loop import Trainer

    base = save_tiny_folder(tiny_hf_model("llama", seed=0, num_hidden_layers=1), tmp_path / "base")
    (tmp_path / "tasks").mkdir()
    rng = random.Random(1)
    for name, count in (("a.jsonl", 6), ("b.jsonl", 4), ("c.jsonl", 1)):
        records = [
            {
                key: " ".join(f"w{rng.randrange(3, 96)}" for _ in range(3))
                for key in ("query", "positive", "negative")
            }
            for _ in range(count)
        ]
        (tmp_path / "tasks" / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    config = config_from_dict(
        "supervised",
        {
            "model_name_or_path": str(base),
            "output_dir": str(tmp_path / "out"),
            "dataset_file_path": str(tmp_path / "tasks"),
            "per_device_train_batch_size": 2,
            "max_seq_length": 8,
        },
    )
    trainer = Trainer(config, DistContext())
    trainer._build()  # model, objective and batch order, as a run starts
    files = [list(range(0, 6)), list(range(6, 10))]
    assert trainer.order.batches_per_epoch == 5
    for micro in range(10):
        batch = trainer.order.indices(micro, 0)
        assert any(set(batch) <= set(rows) for rows in files), batch
    assert (
        "1 file(s) hold fewer records than one batch of 2 and are never trained on: c.jsonl"
        in trainer.objective.data_report.summary()
    )
