"""STS evaluation: file reading, Spearman, and the ``eval sts`` command on a tiny model."""

import argparse
import json
import random

import numpy as np
import pytest
import torch
from model_helpers import save_tiny_folder, tiny_hf_model
from scipy.stats import spearmanr

from llm2vec_fast import LLM2Vec
from llm2vec_fast.evaluation import STSData, add_parser, evaluate_sts, read_sts, spearman


def _sts_file(path, rows):
    path.write_text(
        "".join(
            f"main-captions\tMSRvid\t2012test\t{i:04d}\t{score:.3f}\t{a}\t{b}\n"
            for i, (score, a, b) in enumerate(rows)
        )
    )
    return path


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=50).astype(float)  # many ties
    b = a + rng.normal(size=50)
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    assert spearman(np.arange(5.0), -np.arange(5.0)) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="constant"):
        spearman(np.ones(4), np.arange(4.0))
    with pytest.raises(ValueError, match="first array holds 1 NaN/inf values .first at index 1"):
        spearman(
            np.array([0.1, np.nan, 0.3, 0.2, 0.5]), np.arange(5.0)
        )  # a rank for NaN would be made up


def test_nan_embeddings_are_an_error_not_a_score():
    class _Overflowing:
        def encode(self, sentences, **_):
            return np.array(
                [[np.inf, 0.0] if "boom" in s else [1.0, float(len(s))] for s in sentences]
            )

    data = STSData(
        ["a cat", "boom", "a dog"], ["the cat", "a dog", "dogs"], np.array([4.0, 1.0, 3.0])
    )
    with pytest.raises(ValueError, match="NaN/inf embeddings for 1 sentences .first: 'boom'"):
        evaluate_sts(_Overflowing(), data)


def test_read_sts_takes_score_and_sentences_and_reports_bad_lines(tmp_path):
    path = _sts_file(tmp_path / "sts.csv", [(2.5, 'A "quoted sentence', "b"), (4.0, "c", "d")])
    with open(path, "a") as handle:
        handle.write(
            "forum\tf\t2015\t0001\t1.0\te\tf\textra\tlicense\n"
        )  # forum lines carry more columns
    data = read_sts(path)
    assert data.sentences1 == ['A "quoted sentence', "c", "e"] and data.scores.tolist() == [
        2.5,
        4.0,
        1.0,
    ]
    with open(path, "a") as handle:
        handle.write("genre\tfile\t2012\t0002\tfive\tg\th\n")
    with pytest.raises(ValueError, match=r"sts.csv:4: score 'five'"):
        read_sts(path)
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        read_sts(tmp_path / "missing.csv")


def test_eval_sts_command_reports_spearman_of_cosine(tmp_path, capsys):
    model_dir = save_tiny_folder(
        tiny_hf_model("llama", seed=0, num_hidden_layers=1), tmp_path / "model"
    )
    rng = random.Random(0)

    def words() -> str:
        return " ".join(f"w{rng.randrange(3, 96)}" for _ in range(rng.randrange(2, 8)))

    rows = [(rng.uniform(0, 5), words(), words()) for _ in range(12)]
    data_path = _sts_file(tmp_path / "sts.csv", rows)

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "eval",
            "sts",
            "--model",
            str(model_dir),
            "--data",
            str(data_path),
            "--causal",
            "--output",
            str(tmp_path / "r.json"),
        ]
    )
    assert args.run(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result == json.loads((tmp_path / "r.json").read_text())

    encoder = LLM2Vec.from_pretrained(model_dir, enable_bidirectional=False, pooling_mode="mean")
    first = encoder.encode([a for _, a, _ in rows], show_progress_bar=False)
    second = encoder.encode([b for _, _, b in rows], show_progress_bar=False)
    cosine = torch.nn.functional.cosine_similarity(first.double(), second.double()).numpy()
    expected = 100 * spearmanr(cosine, [score for score, _, _ in rows]).statistic
    assert result["pairs"] == 12 and result["causal"] is True
    assert result["spearman"] == pytest.approx(expected, abs=1e-6)


def test_eval_sts_takes_unset_options_from_llm2vec_config_and_reports_them(tmp_path, capsys):
    model_dir = save_tiny_folder(
        tiny_hf_model("llama", seed=0, num_hidden_layers=1), tmp_path / "model"
    )
    (model_dir / "llm2vec_config.json").write_text(
        json.dumps({"pooling_mode": "last_token", "max_length": 48, "bidirectional": False})
    )
    data_path = _sts_file(
        tmp_path / "sts.csv", [(1.0, "w3 w4", "w5"), (3.0, "w6 w7 w8", "w6 w7"), (2.0, "w9", "w10")]
    )
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    for extra, expected in (
        ([], ("last_token", 48, True)),
        (["--pooling-mode", "mean", "--max-length", "64"], ("mean", 64, True)),
    ):
        args = parser.parse_args(
            ["eval", "sts", "--model", str(model_dir), "--data", str(data_path), *extra]
        )
        assert args.run(args) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert (result["pooling_mode"], result["max_length"], result["causal"]) == expected


def test_unreadable_sts_files_name_the_line_and_the_command_prints_one_line(tmp_path, capsys):
    from llm2vec_fast.cli import main

    path = _sts_file(tmp_path / "sts.csv", [(2.5, "a", "b"), (4.0, "c", "d")])
    with open(path, "a") as handle:
        handle.write("genre\tfile\t2012\t0002\tnan\tg\th\n")
    with pytest.raises(ValueError, match=r"sts.csv:3: score 'nan' is not a finite number"):
        read_sts(path)
    (tmp_path / "latin1.csv").write_bytes(path.read_bytes().replace(b"\tc\t", b"\t\xe9\t"))
    with pytest.raises(ValueError, match=r"latin1.csv:2: not UTF-8 text"):
        read_sts(tmp_path / "latin1.csv")
    assert (
        main(
            [
                "eval",
                "sts",
                "--model",
                str(tmp_path / "no-model"),
                "--data",
                str(tmp_path / "missing.csv"),
            ]
        )
        == 2
    )
    assert (
        capsys.readouterr().err.strip()
        == f"llm2vec-fast eval: error: STS data file not found: {tmp_path / 'missing.csv'}"
    )
