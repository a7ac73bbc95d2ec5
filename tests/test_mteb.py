"""MTEB through ``llm2vec_fast.mteb``: real ``mteb.evaluate`` runs on local tasks, offline.

The encoder is the tiny reference Llama (tests/data/llm2vec_reference/llama, a real BPE
tokenizer); the STS pairs are the first 50 of the STS Benchmark test split in ../shared/data.
"""

import json
import socket
from functools import cache
from pathlib import Path

import mteb
import numpy as np
import pytest
import torch
from mteb.types import PromptType

from llm2vec_fast import LLM2Vec
from llm2vec_fast.cli import main
from llm2vec_fast.mteb import (
    LLM2VEC_TASK_INSTRUCTIONS,
    MTEBModel,
    folder_prompts,
    load_local_task,
    resolve_tasks,
)

REFERENCE = Path(__file__).parent / "data" / "llm2vec_reference"
STSB_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "stsb" / "sts-test.csv"
STS_PAIRS = 50

DOCUMENTS = {
    "d0": ("Paris", "Paris is the capital and largest city of France."),
    "d1": ("", "The Eiffel Tower was built for the 1889 World's Fair."),
    "d2": ("Photosynthesis", "Plants turn sunlight, water and carbon dioxide into sugar."),
    "d3": ("", "Mitochondria produce most of the energy a cell uses."),
    "d4": ("Python", "Python is a programming language that stresses readable code."),
    "d5": ("", "A hash function maps data of any size to values of a fixed size."),
    "d6": ("Football", "The World Cup is held every four years."),
    "d7": ("", "Marathon runners cover a distance of about 42 kilometres."),
    "d8": ("Coffee", "Coffee is brewed from the roasted seeds of the coffee plant."),
    "d9": ("", "Green tea is made from leaves that were not oxidised."),
}
QUERIES = {
    "q0": ("What is the capital of France?", "d0"),
    "q1": ("How do plants make sugar from light?", "d2"),
    "q2": ("Which language is known for readable code?", "d4"),
}
INSTRUCTION = "Given a question, retrieve passages that answer it:"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Local tasks must never reach the hub: any connection attempt fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the MTEB run tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@cache
def reference_encoder() -> LLM2Vec:
    return LLM2Vec.from_pretrained(REFERENCE / "llama", torch_dtype=torch.float32, device="cpu")


class RecordingEncoder:
    """An ``LLM2Vec`` that records what each ``encode`` call receives."""

    def __init__(self, encoder: LLM2Vec) -> None:
        self.encoder = encoder
        self.model = encoder.model
        self.calls: list[list] = []

    def __getattr__(self, name):
        return getattr(self.encoder, name)

    def encode(self, inputs, **kwargs):
        self.calls.append([list(item) for item in inputs])
        return self.encoder.encode(inputs, **kwargs)


def sts_task_file(folder: Path) -> Path:
    assert STSB_TEST.is_file(), f"no STS Benchmark at {STSB_TEST}"
    lines = STSB_TEST.read_text(encoding="utf-8").splitlines(keepends=True)[:STS_PAIRS]
    (folder / "sts-pairs.tsv").write_text("".join(lines), encoding="utf-8")
    definition = {"type": "STS", "name": "LocalSTSB", "data": "sts-pairs.tsv"}
    (folder / "sts.json").write_text(json.dumps(definition))
    return folder / "sts.json"


def retrieval_task_file(folder: Path, **extra) -> Path:
    with open(folder / "corpus.jsonl", "w") as handle:
        for doc_id, (title, text) in DOCUMENTS.items():
            handle.write(json.dumps({"_id": doc_id, "title": title, "text": text}) + "\n")
    with open(folder / "queries.jsonl", "w") as handle:
        for query_id, (text, _) in QUERIES.items():
            handle.write(json.dumps({"_id": query_id, "text": text}) + "\n")
    qrels = "".join(f"{query_id}\t{doc}\t1\n" for query_id, (_, doc) in QUERIES.items())
    (folder / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n" + qrels)
    definition = {
        "type": "Retrieval",
        "name": "TinyRetrieval",
        "corpus": "corpus.jsonl",
        "queries": "queries.jsonl",
        "qrels": "qrels.tsv",
        **extra,
    }
    (folder / "retrieval.json").write_text(json.dumps(definition))
    return folder / "retrieval.json"


def scores_of(model, task, **encode_kwargs) -> dict:
    """The test split's scores of one mteb.evaluate run (no results cache)."""
    result = mteb.evaluate(
        model,
        [task],
        cache=None,
        encode_kwargs={"show_progress_bar": False, **encode_kwargs},
        show_progress_bar=False,
    )
    (task_result,) = result.task_results
    (scores,) = task_result.scores["test"]
    return scores


def test_eval_mteb_on_a_local_sts_task_scores_as_eval_sts(tmp_path, capsys):
    task_file = sts_task_file(tmp_path)
    model = str(REFERENCE / "llama")
    output = tmp_path / "results"
    command = ["eval", "mteb", "--model", model, "--dtype", "float32"]
    assert main([*command, "--tasks", str(task_file), "--output", str(output)]) == 0
    mteb_line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    data = str(tmp_path / "sts-pairs.tsv")
    assert main(["eval", "sts", "--model", model, "--dtype", "float32", "--data", data]) == 0
    sts_line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    assert sts_line["pairs"] == STS_PAIRS and mteb_line["task"] == "LocalSTSB"
    assert 100 * mteb_line["main_score"] == pytest.approx(sts_line["spearman"], abs=1e-6)
    (saved,) = output.glob("results/llm2vec-fast__llama/local/experiments/*/LocalSTSB.json")
    assert "causal_False" in saved.parent.name and "pooling_mode_mean" in saved.parent.name
    (test_scores,) = json.loads(saved.read_text())["scores"]["test"]
    assert test_scores["main_score"] == pytest.approx(mteb_line["main_score"], abs=1e-6)
    assert test_scores["main_score"] == test_scores["cosine_spearman"]


def test_retrieval_on_a_tiny_local_corpus_ranks_by_cosine(tmp_path):
    task = load_local_task(retrieval_task_file(tmp_path, instruction=INSTRUCTION))
    scores = scores_of(MTEBModel(reference_encoder()), task)

    encoder = reference_encoder()
    queries = encoder.encode(
        [[INSTRUCTION, text] for text, _ in QUERIES.values()], show_progress_bar=False
    )
    documents = encoder.encode(
        [f"{title} {text}".strip() for title, text in DOCUMENTS.values()],
        show_progress_bar=False,
    )
    similarity = (
        torch.nn.functional.normalize(queries, dim=-1)
        @ torch.nn.functional.normalize(documents, dim=-1).T
    )  # (3, 10)
    doc_ids = list(DOCUMENTS)
    ranks = [
        1 + int((similarity[row] > similarity[row, doc_ids.index(relevant)]).sum())
        for row, (_, relevant) in enumerate(QUERIES.values())
    ]
    assert scores["mrr_at_10"] == pytest.approx(np.mean([1 / rank for rank in ranks]), abs=1e-5)
    assert scores["main_score"] == scores["ndcg_at_10"]


def test_prompt_types_reach_the_encoder_as_documented(tmp_path):
    recording = RecordingEncoder(reference_encoder())
    retrieval = load_local_task(retrieval_task_file(tmp_path, instruction=INSTRUCTION))
    scores_of(MTEBModel(recording), retrieval, batch_size=2)
    # one encode call per mteb call, each with all of mteb's batches: queries, then documents
    queries, documents = recording.calls
    assert queries == [[INSTRUCTION, text] for text, _ in QUERIES.values()]
    assert sorted(documents) == sorted(
        ["", f"{title} {text}".strip()] for title, text in DOCUMENTS.values()
    )

    # a symmetric task: both sides get the instruction
    recording.calls.clear()
    definition = json.loads(sts_task_file(tmp_path).read_text())
    (tmp_path / "sts.json").write_text(json.dumps({**definition, "instruction": "Compare:"}))
    scores_of(MTEBModel(recording), load_local_task(tmp_path / "sts.json"), batch_size=4)
    assert len(recording.calls) == 2
    assert all(item[0] == "Compare:" for call in recording.calls for item in call)

    # registered tasks: llm2vec's table for queries, nothing for documents; folder prompts first
    scifact = mteb.get_task("SciFact").metadata
    model = MTEBModel(reference_encoder())
    assert model.instruction_for(scifact, PromptType.query) == LLM2VEC_TASK_INSTRUCTIONS["SciFact"]
    assert model.instruction_for(scifact, PromptType.document) == ""
    sts12 = mteb.get_task("STS12").metadata
    assert model.instruction_for(sts12, None) == "Retrieve semantically similar text:"
    retrieval_metadata = retrieval.metadata  # not in the table: the task's own prompt, colon-ended
    assert model.instruction_for(retrieval_metadata, PromptType.query) == INSTRUCTION
    untabled = MTEBModel(reference_encoder(), instructions={})
    assert untabled.instruction_for(sts12, None) == ""  # no table entry, no task prompt
    for prompt in ("Find passages.", {"query": "Find passages", "document": "Passage"}):
        metadata = retrieval_metadata.model_copy(update={"prompt": prompt})
        assert untabled.instruction_for(metadata, PromptType.query) == "Find passages:"
        assert untabled.instruction_for(metadata, PromptType.document) == ""
    prompted = MTEBModel(reference_encoder(), prompts={"query": "q: ", "document": "d: "})
    assert prompted.instruction_for(scifact, PromptType.query) == "q: "
    assert prompted.instruction_for(scifact, PromptType.document) == "d: "


def test_local_sts_data_as_json_lines_scores_as_the_sts_b_file(tmp_path):
    from llm2vec_fast.evaluation import read_sts

    tsv_task = load_local_task(sts_task_file(tmp_path))
    pairs = read_sts(tmp_path / "sts-pairs.tsv")
    with open(tmp_path / "pairs.jsonl", "w") as handle:
        for first, second, score in zip(pairs.sentences1, pairs.sentences2, pairs.scores):
            row = {"sentence1": first, "sentence2": second, "score": score}
            handle.write(json.dumps(row) + "\n")
    definition = {"type": "STS", "name": "LocalSTSBLines", "data": "pairs.jsonl"}
    (tmp_path / "lines.json").write_text(json.dumps(definition))
    model = MTEBModel(reference_encoder())
    lines_score = scores_of(model, load_local_task(tmp_path / "lines.json"))["main_score"]
    assert lines_score == pytest.approx(scores_of(model, tsv_task)["main_score"], abs=1e-12)


def test_sentence_transformers_folder_prompts_are_read(tmp_path):
    assert folder_prompts(tmp_path) is None
    config = {"prompts": {"query": "query: ", "document": ""}, "default_prompt_name": None}
    (tmp_path / "config_sentence_transformers.json").write_text(json.dumps(config))
    assert folder_prompts(tmp_path) == {"query": "query: "}  # an empty prompt is no prompt


def test_batch_size_and_token_budget_do_not_change_scores(tmp_path):
    encoder = reference_encoder()
    sts = load_local_task(sts_task_file(tmp_path))
    retrieval = load_local_task(retrieval_task_file(tmp_path, instruction=INSTRUCTION))
    for task in (sts, retrieval):
        small = scores_of(MTEBModel(encoder, max_batch_tokens=1), task, batch_size=1)
        large = scores_of(MTEBModel(encoder, max_batch_tokens=100_000), task, batch_size=64)
        for metric in ("main_score", "cosine_pearson", "mrr_at_10", "map_at_10"):
            if metric in small:
                assert small[metric] == pytest.approx(large[metric], abs=1e-6), metric


def test_similarity_is_cosine():
    model = MTEBModel(reference_encoder())
    a, b = torch.randn(3, 8), torch.randn(4, 8)
    expected = torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T
    torch.testing.assert_close(torch.as_tensor(model.similarity(a, b)), expected)
    torch.testing.assert_close(
        torch.as_tensor(model.similarity_pairwise(a, b[:3])),
        torch.nn.functional.cosine_similarity(a, b[:3]),
    )
    meta = model.mteb_model_meta
    assert meta.name == "llm2vec-fast/llama" and meta.embed_dim == reference_encoder().embedding_dim


def test_task_lists_and_bad_local_definitions(tmp_path):
    names = [task.metadata.name for task in resolve_tasks("STS12, MTEB(eng, v2)")]
    assert names[0] == "STS12" and len(names) > 10 and "STSBenchmark" in names
    (tmp_path / "bad.json").write_text(json.dumps({"type": "Clustering", "name": "x"}))
    with pytest.raises(ValueError, match=r"bad.json: type must be one of STS, Retrieval"):
        resolve_tasks(str(tmp_path / "bad.json"))
    (tmp_path / "bad.json").write_text(json.dumps({"type": "STS", "name": "x"}))
    with pytest.raises(ValueError, match=r"bad.json: data must name a data file"):
        load_local_task(tmp_path / "bad.json")
    for unknown in ("NoSuchTask", "MTEB(nowhere, v9)"):
        with pytest.raises(ValueError, match=r"--tasks: .*not found"):
            resolve_tasks(unknown)


def test_eval_mteb_without_mteb_says_how_to_install_it(monkeypatch, tmp_path):
    import sys

    monkeypatch.delitem(sys.modules, "llm2vec_fast.mteb")
    monkeypatch.setitem(sys.modules, "mteb", None)  # as if not installed
    with pytest.raises(SystemExit, match=r"mteb is not installed; pip install"):
        main(["eval", "mteb", "--model", "m", "--tasks", "STS12", "--output", str(tmp_path)])
