"""The shipped default encoder: SmolLM2-135M with the package's MNTP + SimCSE LoRA adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llm2vec_fast.corpus import embed_corpus, search
from llm2vec_fast.corpus.engine import load_engine
from llm2vec_fast.corpus.nearest import engine_for_job
from llm2vec_fast.corpus.summary import engine_line
from llm2vec_fast.default_encoder import ADAPTER_STAGES, default_adapter_paths
from llm2vec_fast.encoder import LLM2Vec
from llm2vec_fast.evaluation import STSData, evaluate_sts, read_sts
from llm2vec_fast.settings import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE

STSB_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "stsb" / "sts-test.csv"
PAIRS = 120  # enough to tell 60 from 16 apart (the full test set's scores, README)


def test_the_shipped_adapters_are_bf16_lora_on_every_projection():
    paths = default_adapter_paths()
    assert [path.name for path in paths] == list(ADAPTER_STAGES)
    for path in paths:
        config = json.loads((path / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
        assert config["r"] == 16 and config["peft_type"] == "LORA"
        weights = load_file(str(path / ADAPTER_WEIGHTS_FILE))
        # SmolLM2-135M: 30 layers x 7 projections x (A, B)
        assert len(weights) == 30 * 7 * 2
        assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}
        assert all(tensor.abs().max() > 0 for tensor in weights.values())


def test_the_default_engine_is_the_llm2vec_encoder(default_model_folder):
    engine = load_engine(None)
    assert tuple(Path(p) for p in engine.adapters) == default_adapter_paths()
    # the settings STS-B was scored with (llm2vec_config.json beside the SimCSE adapter)
    assert (engine.pooling_mode, engine.max_length, engine.causal) == ("mean", 512, False)
    assert not engine.model.causal
    assert "+ adapters mntp, simcse: mean pooling" in engine_line(engine.describe())
    given = load_engine(None, adapters=[default_adapter_paths()[0]])
    assert tuple(Path(p) for p in given.adapters) == default_adapter_paths()[:1]


def first_pairs(data: STSData, count: int) -> STSData:
    return STSData(data.sentences1[:count], data.sentences2[:count], data.scores[:count])


def test_the_adapters_make_an_encoder_of_the_bidirectional_model(default_model_folder):
    """Bidirectional attention alone breaks the decoder as an encoder (STS-B 16); the shipped
    MNTP + SimCSE adapters are what makes it one (60 on the full test set)."""
    data = first_pairs(read_sts(STSB_TEST), PAIRS)
    bare = LLM2Vec.from_pretrained(default_model_folder, max_length=512)
    trained = LLM2Vec.from_pretrained(default_model_folder, adapters=default_adapter_paths())
    bare_score = evaluate_sts(bare, data)["spearman"]
    trained_score = evaluate_sts(trained, data)["spearman"]
    assert trained_score > bare_score + 20, (bare_score, trained_score)


@pytest.mark.parametrize("stage", ADAPTER_STAGES)
def test_a_missing_adapter_says_what_to_do(monkeypatch, tmp_path, stage):
    import llm2vec_fast.default_encoder as default_encoder

    for name in ADAPTER_STAGES:
        (tmp_path / name).mkdir()
        if name != stage:
            (tmp_path / name / ADAPTER_WEIGHTS_FILE).write_bytes(b"")
    monkeypatch.setattr(default_encoder, "ADAPTERS_ROOT", tmp_path)
    with pytest.raises(FileNotFoundError, match=f"{stage}.*reinstall"):
        default_encoder.default_adapter_paths()


def test_causal_alone_is_the_untouched_decoder(default_model_folder):
    engine = load_engine(None, causal=True)
    assert engine.adapters == () and engine.model.causal


def test_search_finds_the_shipped_adapters_of_a_job_from_another_install(
    default_model_folder, tmp_path
):
    """A job of the default encoder records the adapters' and the model's absolute paths; from
    another checkout or cache those are gone, and search falls back to this install's files,
    which the identity check compares by sha256."""
    inputs = tmp_path / "docs.jsonl"
    inputs.write_text('{"id": "a", "text": "hello there"}\n{"id": "b", "text": "goodbye"}\n')
    embed_corpus(inputs, tmp_path / "job", id_field="id", progress=False, workers=0)
    manifest_path = tmp_path / "job" / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest["engine"]["model"] = "/elsewhere/cache/SmolLM2"
    for adapter in manifest["engine"]["adapters"]:
        adapter["path"] = "/elsewhere/site-packages/" + Path(adapter["path"]).name
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")
    engine = engine_for_job(tmp_path / "job")
    assert tuple(Path(p) for p in engine.adapters) == default_adapter_paths()
    assert [doc for doc, _ in search(tmp_path / "job", "hello there", k=1, engine=engine)] == ["a"]
    manifest["engine"]["adapters"][1]["sha256"] = "0" * 64  # not the shipped weights
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="simcse is gone"):
        engine_for_job(tmp_path / "job")
