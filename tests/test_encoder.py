"""LLM2Vec (ours) against embeddings recorded from llm2vec 0.2.3 itself, and the encoder's own API.

The reference data comes from tests/data/make_llm2vec_reference.py: tiny Llama and Mistral
checkpoints, LoRA adapters, an MNTP -> SimCSE chain, every pooling mode, skip_instruction on and
off, a causal case, recorded in fp32 with llm2vec's padded batches.
"""

import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llm2vec_fast import LLM2Vec

REFERENCE = Path(__file__).parent / "data" / "llm2vec_reference"
MANIFEST = json.loads((REFERENCE / "cases.json").read_text())
EMBEDDING_CASES = {case["id"]: case for case in MANIFEST["cases"] if case["kind"] == "embeddings"}
# Two fp32 computations of the same function that differ only in summation order (llm2vec pads
# and batches, we pack) agree to a few hundred ulps after a few layers; 2e-5 at the unit scale of
# these embeddings is that, while any wrong token, mask or weight moves them by far more.
ATOL = RTOL = 2e-5


@cache
def expected_tensors() -> dict[str, torch.Tensor]:
    return load_file(REFERENCE / "expected.safetensors")


@cache
def encoder_for(base: str, peft: str | None, bidirectional: bool) -> LLM2Vec:
    return LLM2Vec.from_pretrained(
        REFERENCE / base,
        peft_model_name_or_path=None if peft is None else REFERENCE / peft,
        enable_bidirectional=bidirectional,
        torch_dtype=torch.float32,
        device="cpu",
    )


def configured(case: dict) -> LLM2Vec:
    """The cached encoder of the case's checkpoint with the case's encoder settings."""
    load = case["load"]
    encoder = encoder_for(load["base"], load.get("peft"), case["enable_bidirectional"])
    encoder.pooling_mode = case["pooling_mode"]
    encoder.skip_instruction = case["skip_instruction"]
    encoder.max_length = case["max_length"]
    encoder.doc_max_length = case["doc_max_length"]
    return encoder


@pytest.mark.parametrize("case_id", sorted(EMBEDDING_CASES))
def test_embeddings_equal_llm2vec(case_id):
    case = EMBEDDING_CASES[case_id]
    expected = expected_tensors()[f"{case_id}.embeddings"]
    got = configured(case).encode(MANIFEST["inputs"], show_progress_bar=False)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


def test_from_pretrained_reads_settings_and_merges_chain_like_llm2vec():
    """The MNTP folder names its base; the SimCSE adapter is merged on top (merge order matters)."""
    case = next(
        c
        for c in EMBEDDING_CASES.values()
        if c["load"]["base"] == "llama-mntp" and c["pooling_mode"] == "mean"
    )
    encoder = LLM2Vec.from_pretrained(
        str(REFERENCE / "llama-mntp"),
        peft_model_name_or_path=str(REFERENCE / "llama-mntp-simcse"),
        merge_peft=True,
        pooling_mode="mean",
        skip_instruction=case["skip_instruction"],
        max_length=case["max_length"],
        doc_max_length=case["doc_max_length"],
        torch_dtype=torch.float32,
        device_map="cpu",
    )
    got = encoder.encode(MANIFEST["inputs"], show_progress_bar=False)
    torch.testing.assert_close(
        got, expected_tensors()[f"{case['id']}.embeddings"], atol=ATOL, rtol=RTOL
    )


@pytest.fixture(scope="module")
def llama() -> LLM2Vec:
    return LLM2Vec.from_pretrained(REFERENCE / "llama", pooling_mode="mean", torch_dtype="float32")


def test_results_do_not_depend_on_batching(llama):
    texts = MANIFEST["inputs"]
    alone = torch.cat([llama.encode([t], show_progress_bar=False) for t in texts])
    tight = llama.encode(texts, show_progress_bar=False, max_batch_tokens=llama.max_length)
    roomy = llama.encode(texts, show_progress_bar=False, max_batch_tokens=100_000)
    torch.testing.assert_close(tight, alone, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(roomy, alone, atol=ATOL, rtol=RTOL)


def test_mixed_inputs_numpy_and_normalization(llama):
    inputs = ["plain text", ["an instruction:", "a text"], ("tuple instruction", "tuple text")]
    raw = llama.encode(inputs, show_progress_bar=False)
    unit = llama.encode(
        inputs, show_progress_bar=False, normalize_embeddings=True, convert_to_numpy=True
    )
    assert (
        isinstance(unit, np.ndarray)
        and unit.dtype == np.float32
        and unit.shape == (3, llama.embedding_dim)
    )
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(unit, torch.nn.functional.normalize(raw, dim=-1).numpy(), atol=1e-6)
    assert llama.encode("one string", show_progress_bar=False).shape == (1, llama.embedding_dim)


def test_bfloat16_is_close_to_float32():
    texts = MANIFEST["inputs"]
    fp32 = LLM2Vec.from_pretrained(REFERENCE / "llama", torch_dtype=torch.float32).encode(
        texts, show_progress_bar=False
    )
    bf16 = LLM2Vec.from_pretrained(REFERENCE / "llama", dtype="bfloat16").encode(
        texts, show_progress_bar=False
    )
    assert bf16.dtype == torch.float32  # outputs are always fp32, like llm2vec
    cosine = torch.nn.functional.cosine_similarity(fp32, bf16)
    assert cosine.min() > 0.99, cosine


@pytest.mark.parametrize(
    "bad, message",
    [
        pytest.param([1, "text"], "inputs[0]", id="not-a-string"),
        pytest.param([["only one"]], "inputs[0]", id="pair-of-one"),
        pytest.param([["a", "b", "c"]], "inputs[0]", id="triple"),
        pytest.param(["ok", ["instruction", None]], "inputs[1]", id="pair-with-none"),
    ],
)
def test_bad_inputs_name_the_item(llama, bad, message):
    with pytest.raises(TypeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        llama.encode(bad, show_progress_bar=False)


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="unknown pooling mode"):
        LLM2Vec.from_pretrained(REFERENCE / "llama", pooling_mode="max")
    with pytest.raises(TypeError, match="unexpected keyword"):
        LLM2Vec.from_pretrained(REFERENCE / "llama", not_an_option=1)
    with pytest.raises(FileNotFoundError):
        LLM2Vec.from_pretrained(REFERENCE / "no-such-model")


def test_more_bad_inputs_and_settings_are_clear_errors(llama, tmp_path):
    with pytest.raises(
        ValueError, match=r"inputs\[1\] is not valid Unicode: '\\ud800' at character 4"
    ):
        llama.encode(["fine", "bad \ud800 text"], show_progress_bar=False)
    for name, value in (("max_length", 2.5), ("max_length", "512"), ("doc_max_length", 0)):
        with pytest.raises(ValueError, match=f"{name} must be a positive int"):
            LLM2Vec(llama.model, llama.tokenizer, **{name: value})
    with pytest.raises(TypeError, match="skip_instruction must be True or False, got 'no'"):
        LLM2Vec(llama.model, llama.tokenizer, skip_instruction="no")
    for name, value in (("batch_size", None), ("max_batch_tokens", 0), ("max_batch_tokens", 2.5)):
        with pytest.raises(ValueError, match=f"{name} must be a positive int"):
            llama.encode(["text"], show_progress_bar=False, **{name: value})
    with pytest.raises(ValueError, match="dtype torch.float64 is not supported"):
        LLM2Vec.from_pretrained(REFERENCE / "llama", dtype=torch.float64)
    same = LLM2Vec.from_pretrained(REFERENCE / "llama", torch_dtype=torch.float32, dtype="float32")
    assert same.dtype == torch.float32
    with pytest.raises(
        FileNotFoundError, match="missing adapter_config.json in adapter folder .*nowhere"
    ):
        LLM2Vec.from_pretrained(
            REFERENCE / "llama", adapters=str(tmp_path / "nowhere")
        )  # one path, not its letters


def test_saved_settings_with_bad_values_name_the_file(tmp_path):
    import shutil

    folder = Path(shutil.copytree(REFERENCE / "llama", tmp_path / "llama"))
    (folder / "llm2vec_config.json").write_text(json.dumps({"max_length": "512"}))
    with pytest.raises(ValueError, match=r"llm2vec_config.json: max_length = '512' is not valid"):
        LLM2Vec.from_pretrained(folder)
    (folder / "llm2vec_config.json").write_text(
        json.dumps({"bidirectional": False})
    )  # as training writes it
    assert LLM2Vec.from_pretrained(folder).enable_bidirectional is False
    assert LLM2Vec.from_pretrained(folder, enable_bidirectional=True).enable_bidirectional is True


def test_token_ids_beyond_the_vocabulary_are_named(llama):
    from llm2vec_fast.text import TokenizedText

    vocab = llama.model.config.vocab_size
    with pytest.raises(
        ValueError, match=f"token id {vocab} is outside the model's vocabulary \\[0, {vocab}\\)"
    ):
        llama.embed_tokenized([TokenizedText([1, 5], [True, True]), TokenizedText([vocab], [True])])


def test_bos_pooling_needs_a_tokenizer_that_adds_bos(tmp_path):
    from model_helpers import save_tiny_folder, tiny_hf_model

    folder = save_tiny_folder(
        tiny_hf_model("llama", seed=0, num_hidden_layers=1), tmp_path / "no-bos"
    )  # word-level
    with pytest.raises(
        ValueError, match="pooling_mode='bos_token' needs a tokenizer that puts a BOS token first"
    ):
        LLM2Vec.from_pretrained(folder, pooling_mode="bos_token")
    assert (
        LLM2Vec.from_pretrained(REFERENCE / "llama", pooling_mode="bos_token").pooling_mode
        == "bos_token"
    )


TOKEN_TEXTS = [
    "The cat sat on the mat.",
    ["Retrieve passages that answer the question:", "what is the capital of France?"],
    "  Leading and trailing   spaces.  ",
    ["An instruction:", ""],
    "",
]


def _pooled_runtime_states(encoder: LLM2Vec, texts) -> list[torch.Tensor]:
    """The runtime's hidden states of all texts in one packed batch, kept where pool_mask is."""
    from llm2vec_fast.packed import Packed

    items = encoder.tokenize(texts)
    with torch.no_grad():
        hidden = encoder.model(
            Packed.from_tokenized(items), causal=not encoder.enable_bidirectional
        )  # (T, H)
    parts = hidden.split([len(item.input_ids) for item in items])
    return [part[torch.tensor(item.pool_mask)] for part, item in zip(parts, items)]


def test_token_embeddings_are_the_runtime_states_of_the_text_tokens(llama):
    got = llama.encode(TOKEN_TEXTS, output_value="token_embeddings", show_progress_bar=False)
    expected = _pooled_runtime_states(llama, TOKEN_TEXTS)
    assert len(got) == len(TOKEN_TEXTS)
    for states, reference in zip(got, expected):
        assert states.dtype == torch.float32 and states.shape[1] == llama.embedding_dim
        torch.testing.assert_close(states, reference, atol=ATOL, rtol=RTOL)
    # the instruction's tokens (and BOS) are left out: as many states as the text alone has tokens
    text_alone = llama.tokenizer("what is the capital of France?", add_special_tokens=False)
    assert got[1].shape[0] == len(text_alone["input_ids"])
    assert got[3].shape == got[4].shape == (0, llama.embedding_dim)  # empty texts: no token
    # mean pooling averages exactly these states
    pooled = llama.encode(TOKEN_TEXTS[:3], show_progress_bar=False)
    torch.testing.assert_close(
        torch.stack([states.mean(dim=0) for states in got[:3]]), pooled, atol=ATOL, rtol=RTOL
    )


def test_token_embeddings_do_not_depend_on_batching(llama):
    texts = MANIFEST["inputs"]
    tight, roomy = (
        llama.encode(
            texts,
            output_value="token_embeddings",
            convert_to_numpy=True,
            show_progress_bar=False,
            max_batch_tokens=budget,
        )
        for budget in (1, 100_000)
    )
    for one, other in zip(tight, roomy, strict=True):
        assert isinstance(one, np.ndarray) and one.dtype == np.float32
        np.testing.assert_allclose(one, other, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("causal", [False, True])
def test_token_embeddings_equal_transformers_hidden_states(tmp_path, causal):
    from model_helpers import (
        assert_matches_oracle,
        hf_hidden_states,
        save_tiny_folder,
        tiny_hf_model,
    )

    hf_model = tiny_hf_model("llama", seed=3)
    folder = save_tiny_folder(hf_model, tmp_path / "tiny")
    encoder = LLM2Vec.from_pretrained(
        folder, enable_bidirectional=not causal, torch_dtype="float32", device="cpu"
    )
    texts = ["w5 w6 w7 w8", ["w40 w41:", "w9 w10 w11"], ["w50:", "w12"], "w13 w14 w15 w16 w17"]
    got = encoder.encode(texts, output_value="token_embeddings", show_progress_bar=False)
    hf64 = tiny_hf_model("llama", seed=3).double()
    for states, item in zip(got, encoder.tokenize(texts)):
        mask = torch.tensor(item.pool_mask)
        hf32_states = hf_hidden_states(hf_model, item.input_ids, causal=causal)[mask]
        hf64_states = hf_hidden_states(hf64, item.input_ids, causal=causal)[mask]
        assert states.shape == hf32_states.shape == (int(mask.sum()), encoder.embedding_dim)
        assert_matches_oracle(states, hf32_states, hf64_states, f"token states of {item}")


def test_token_embeddings_arguments_are_checked(llama):
    with pytest.raises(ValueError, match="output_value must be one of sentence_embedding"):
        llama.encode(["text"], output_value="word_embeddings", show_progress_bar=False)
    with pytest.raises(ValueError, match="normalize_embeddings applies to sentence embeddings"):
        llama.encode(
            ["text"],
            output_value="token_embeddings",
            normalize_embeddings=True,
            show_progress_bar=False,
        )
    assert llama.encode([], output_value="token_embeddings", show_progress_bar=False) == []


def _pieces(encoder: LLM2Vec, item) -> list[str]:
    """The text of each pooled token (SentencePiece's word marker as a space)."""
    ids = [token for token, pooled in zip(item.input_ids, item.pool_mask) if pooled]
    return [piece.replace("▁", " ") for piece in encoder.tokenizer.convert_ids_to_tokens(ids)]


def test_word_start_indices_point_at_the_first_sub_token_of_each_word(llama):
    starts = llama.word_start_indices(TOKEN_TEXTS)
    for text_input, item, word_starts in zip(TOKEN_TEXTS, llama.tokenize(TOKEN_TEXTS), starts):
        text = text_input if isinstance(text_input, str) else text_input[1]
        pieces = _pieces(llama, item)
        bounds = [*word_starts, len(pieces)]
        words = ["".join(pieces[a:b]).strip() for a, b in zip(bounds[:-1], bounds[1:])]
        assert words == text.split(), (text, pieces, word_starts)
    assert starts[1][:3] == [0, 2, 3]  # "▁wh" "at" | "▁is" | "▁the"
    assert starts[3] == starts[4] == []


def test_word_start_indices_cover_the_words_left_after_truncation(llama):
    words = [f"word{i}" for i in range(40)]
    short = LLM2Vec(llama.model, llama.tokenizer, max_length=16, doc_max_length=16)
    (starts,) = short.word_start_indices([" ".join(words)])
    (item,) = short.tokenize([" ".join(words)])
    pieces = _pieces(short, item)
    kept = ["".join(pieces[a:b]).strip() for a, b in zip(starts, [*starts[1:], len(pieces)])]
    assert 0 < len(starts) < len(words)
    assert kept[:-1] == words[: len(starts) - 1]  # the last kept word may be cut mid-word
    assert words[len(starts) - 1].startswith(kept[-1])


def test_truncate_dim_and_prompts_on_an_llm2vec_model(llama):
    """Matryoshka truncation keeps the first dimensions (renormalized when unit vectors are asked
    for); a prompt is the instruction of every bare text; an llm2vec folder has no prompt names."""
    texts = [text for text in MANIFEST["inputs"] if isinstance(text, str)][:4]
    full = llama.encode(texts, show_progress_bar=False)
    cut = llama.encode(texts, show_progress_bar=False, truncate_dim=8)
    torch.testing.assert_close(cut, full[:, :8])
    unit = llama.encode(texts, show_progress_bar=False, truncate_dim=8, normalize_embeddings=True)
    torch.testing.assert_close(unit, torch.nn.functional.normalize(full[:, :8], dim=-1))
    with pytest.raises(ValueError, match="truncate_dim=1000 is more than"):
        llama.encode(texts, show_progress_bar=False, truncate_dim=1000)
    prompted = llama.encode(texts, show_progress_bar=False, prompt="an instruction:")
    paired = llama.encode([["an instruction:", t] for t in texts], show_progress_bar=False)
    torch.testing.assert_close(prompted, paired)
    torch.testing.assert_close(llama.encode_query(texts, show_progress_bar=False), full)
    with pytest.raises(ValueError, match="prompt_name 'query' is not a prompt of this model"):
        llama.encode(texts, show_progress_bar=False, prompt_name="query")
    truncated = LLM2Vec.from_pretrained(REFERENCE / "llama", truncate_dim=8, dtype="float32")
    assert truncated.embedding_dim == 8 and truncated.describe()["dim"] == 8
    torch.testing.assert_close(truncated.encode(texts, show_progress_bar=False), cut)
