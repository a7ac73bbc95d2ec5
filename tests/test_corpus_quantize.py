"""--quantize: sentence-transformers' codes, calibrated on the job's first rows, read back."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from sentence_transformers.util.quantization import _dequantize_embeddings, quantize_embeddings

from llm2vec_fast.cli import main
from llm2vec_fast.corpus import calibration, embed_corpus, read_embeddings, search
from llm2vec_fast.corpus.engine import HashEngine
from llm2vec_fast.corpus.job_settings import QUANTIZE
from llm2vec_fast.corpus.manifest import JobMismatchError, load_manifest
from llm2vec_fast.corpus.quantize import calibration_ranges, dequantize, quantize

DIM = 12


def _engine():
    return HashEngine(dim=DIM, max_length=64)


def _texts(n):
    return [f"document {i} about {'abcdefgh'[i % 8]}" for i in range(n)]


def _corpus(tmp_path, n=40):
    path = tmp_path / "in.jsonl"
    path.write_text(
        "".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(_texts(n)))
    )
    return path


def _embed(inputs, out, **options):
    options.setdefault("progress", False)
    return embed_corpus(inputs, out, engine=_engine(), id_field="id", shard_rows=8, **options)


def _floats(texts):
    engine = _engine()
    return engine.embed(engine.tokenize(texts))


@pytest.mark.parametrize("precision", QUANTIZE)
def test_codes_equal_sentence_transformers_on_the_same_calibration(precision):
    rng = np.random.default_rng(0)
    calibration_rows = rng.standard_normal((200, 33), dtype=np.float32)
    embeddings = rng.standard_normal((50, 33), dtype=np.float32) * 1.3  # some outside the ranges
    ranges = calibration_ranges(calibration_rows)
    expected = quantize_embeddings(embeddings, precision, calibration_embeddings=calibration_rows)
    codes = quantize(embeddings, precision, ranges)
    assert codes.dtype == expected.dtype
    np.testing.assert_array_equal(codes, expected)
    if precision in ("int8", "uint8"):
        np.testing.assert_allclose(
            dequantize(codes, precision, 33, ranges),
            _dequantize_embeddings(codes, precision, ranges),
            rtol=1e-6,
            atol=1e-6,
        )
    else:
        np.testing.assert_array_equal(
            dequantize(codes, precision, 33), np.where(embeddings > 0, 1.0, -1.0)
        )


def test_int8_job_is_calibrated_on_its_first_rows_and_stores_sentence_transformers_codes(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(calibration, "CALIBRATION_ROWS", 20)  # the first 2.5 shards of 8 rows
    _embed(_corpus(tmp_path), tmp_path / "out", quantize="int8")
    floats = _floats(_texts(40))
    record = load_manifest(tmp_path / "out")["quantization"]
    assert record["precision"] == "int8" and record["column"] == "embedding_int8"
    ranges = np.asarray(record["ranges"], dtype=np.float32)
    np.testing.assert_array_equal(ranges, calibration_ranges(floats[:20]))
    assert "first 20 rows" in record["calibration"]
    table = pq.read_table(tmp_path / "out" / "shards" / "shard-000003.parquet")
    assert table.column_names == ["id", "embedding_int8"]  # the codes instead of the floats
    ids, codes = read_embeddings(tmp_path / "out")
    assert ids == [f"d{i}" for i in range(40)]
    expected = quantize_embeddings(floats, "int8", calibration_embeddings=floats[:20])
    np.testing.assert_array_equal(codes, expected)
    _, approximate = read_embeddings(tmp_path / "out", dequantize=True)
    steps = (ranges[1] - ranges[0]) / 255
    inside = (floats >= ranges[0]) & (floats <= ranges[1])
    error = floats - approximate  # a value is its step's start, within one step above it
    assert np.all(error[inside] >= -1e-5) and np.all((error <= steps + 1e-5)[inside])
    _, mapped = read_embeddings(tmp_path / "out", mmap=True)
    assert str(mapped.filename).endswith("embeddings.int8.npy")
    np.testing.assert_array_equal(mapped, codes)
    with pytest.raises(ValueError, match="int8 codes only.*quantized=True"):
        read_embeddings(tmp_path / "out", quantized=False)
    with pytest.raises(ValueError, match="does not go with quantized=False"):
        read_embeddings(tmp_path / "out", quantized=False, dequantize=True)


def test_binary_keep_float_stores_both_and_reads_floats_by_default(tmp_path):
    _embed(_corpus(tmp_path, 20), tmp_path / "out", quantize="binary", keep_float=True)
    floats = _floats(_texts(20))
    table = pq.read_table(tmp_path / "out" / "shards" / "shard-000000.parquet")
    assert table.column_names == ["id", "embedding", "embedding_binary"]
    np.testing.assert_array_equal(read_embeddings(tmp_path / "out")[1], floats)
    _, bits = read_embeddings(tmp_path / "out", quantized=True)
    assert bits.shape == (20, 2) and bits.dtype == np.int8
    np.testing.assert_array_equal(bits, quantize_embeddings(floats, "binary"))
    _, signs = read_embeddings(tmp_path / "out", dequantize=True)
    np.testing.assert_array_equal(signs, np.where(floats > 0, 1.0, -1.0))
    assert "ranges" not in load_manifest(tmp_path / "out")["quantization"]


def test_another_quantize_setting_is_refused_unless_overwrite(tmp_path):
    corpus = _corpus(tmp_path, 16)
    _embed(corpus, tmp_path / "out", quantize="uint8")
    _embed(corpus, tmp_path / "out", quantize="uint8")  # the same job: nothing to do
    for other in ({"quantize": "int8"}, {"quantize": "uint8", "keep_float": True}, {}):
        with pytest.raises(JobMismatchError, match="--overwrite"):
            _embed(corpus, tmp_path / "out", **other)
    _embed(corpus, tmp_path / "out", quantize="ubinary", overwrite=True)
    assert load_manifest(tmp_path / "out")["quantization"]["precision"] == "ubinary"
    assert read_embeddings(tmp_path / "out")[1].dtype == np.uint8


def test_a_job_without_quantize_records_the_settings_it_always_had(tmp_path):
    _embed(_corpus(tmp_path, 8), tmp_path / "out")
    manifest = load_manifest(tmp_path / "out")
    assert "quantize" not in manifest["settings"] and "quantization" not in manifest
    with pytest.raises(ValueError, match="float embeddings only"):
        read_embeddings(tmp_path / "out", dequantize=True)


def test_exact_search_of_a_codes_only_job_scans_the_dequantized_rows(tmp_path):
    _embed(_corpus(tmp_path), tmp_path / "out", quantize="int8")
    hits = search(tmp_path / "out", _texts(40)[13], k=3, engine=_engine())
    assert hits[0][0] == "d13" and hits[0][1] > 0.99


def test_cli_quantize_and_keep_float(tmp_path, capsys):
    corpus = _corpus(tmp_path, 10)
    common = ["embed", "--model", f"fake:dim={DIM}", "--input", str(corpus), "--no-progress"]
    assert main(common + ["--output", str(tmp_path / "a"), "--keep-float"]) == 2
    assert "--keep-float keeps the floats beside --quantize codes" in capsys.readouterr().err
    assert main(common + ["--output", str(tmp_path / "b"), "--quantize", "ubinary"]) == 0
    _, bits = read_embeddings(tmp_path / "b")
    assert bits.shape == (10, 2) and bits.dtype == np.uint8


def test_two_gloo_ranks_share_rank_0s_calibration_and_equal_one_process(tmp_path):
    corpus = _corpus(tmp_path, 60)
    _embed(corpus, tmp_path / "one", quantize="uint8")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    command = [sys.executable, "-m", "llm2vec_fast.cli", "embed", "--model", f"fake:dim={DIM}"]
    command += ["--input", str(corpus), "--output", str(tmp_path / "two"), "--id-field", "id"]
    command += ["--shard-rows", "8", "--quantize", "uint8", "--no-progress"]
    processes = [
        subprocess.Popen(
            command,
            env={
                **os.environ,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            },
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    for process in processes:
        assert process.wait(timeout=120) == 0, process.stderr.read()
    one, two = load_manifest(tmp_path / "one"), load_manifest(tmp_path / "two")
    assert one["quantization"] == two["quantization"]
    ids, codes = read_embeddings(tmp_path / "two")
    assert ids == read_embeddings(tmp_path / "one")[0]
    np.testing.assert_array_equal(codes, read_embeddings(tmp_path / "one")[1])
