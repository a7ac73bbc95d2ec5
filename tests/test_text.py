"""llm2vec_fast.text against token ids and embed masks recorded from llm2vec 0.2.3 itself.

The reference data comes from tests/data/make_llm2vec_reference.py (see its docstring).
"""

import json
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from llm2vec_fast.text import (
    SEPARATOR,
    as_instruction_pairs,
    format_for_tokenization,
    model_identity,
    tokenize,
)

REFERENCE = Path(__file__).parent / "data" / "llm2vec_reference"
MANIFEST = json.loads((REFERENCE / "cases.json").read_text())
CASES = {case["id"]: case for case in MANIFEST["cases"]}


@cache
def expected_tensors() -> dict[str, torch.Tensor]:
    return load_file(REFERENCE / "expected.safetensors")


@cache
def tokenizer_of(folder: str):
    return AutoTokenizer.from_pretrained(REFERENCE / folder)


def recorded_tokens(case_id: str) -> tuple[list[list[int]], list[list[bool]]]:
    tensors = expected_tensors()
    lengths = tensors[f"{case_id}.lengths"].tolist()
    ids = [row.tolist() for row in tensors[f"{case_id}.input_ids"].split(lengths)]
    masks = [row.bool().tolist() for row in tensors[f"{case_id}.embed_mask"].split(lengths)]
    return ids, masks


def case_setup(case: dict) -> tuple[object, str, list]:
    """Tokenizer, model name and inputs of a recorded case, derived as the encoder would."""
    if case["kind"] == "embeddings":
        base = case["load"]["base"]
        return tokenizer_of(base), model_identity(REFERENCE / base), MANIFEST["inputs"]
    return tokenizer_of("llama"), case["name_or_path"], MANIFEST["token_edge_inputs"]


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_matches_llm2vec_tokens_and_masks(case_id):
    case = CASES[case_id]
    tokenizer, model_name, inputs = case_setup(case)
    expected_ids, embed_masks = recorded_tokens(case_id)
    skip_values = [case["skip_instruction"]] if "skip_instruction" in case else [True, False]
    for skip_instruction in skip_values:
        got = tokenize(
            tokenizer,
            inputs,
            model_name=model_name,
            model_type=case["model_type"],
            pooling_mode=case["pooling_mode"],
            max_length=case["max_length"],
            doc_max_length=case["doc_max_length"],
            skip_instruction=skip_instruction,
        )
        assert [item.input_ids for item in got] == expected_ids
        expected_masks = (
            embed_masks if skip_instruction else [[True] * len(r) for r in expected_ids]
        )
        assert [item.pool_mask for item in got] == expected_masks


def test_identity_is_read_from_the_folder_passed_as_base():
    """The MNTP folder's config.json names the text format, not the base it loads weights from."""
    for case in MANIFEST["cases"]:
        if case["kind"] == "embeddings":
            assert model_identity(REFERENCE / case["load"]["base"]) == case["name_or_path"]
    assert model_identity(REFERENCE / "llama-mntp") == "meta-llama/Llama-2-7b-chat-hf"
    assert model_identity(REFERENCE / "llama-lora") == ""  # no config.json: no rewrites
    assert model_identity(REFERENCE / "llama" / "model.safetensors") == ""


def test_reference_cases_exercise_truncation():
    """Guards the data itself: both truncation rules and the instruction mask must be exercised."""
    ids, masks = recorded_tokens("llama-none-mean-skip1-A")
    lengths = [len(row) for row in ids]
    assert max(lengths) == CASES["llama-none-mean-skip1-A"]["max_length"]
    assert any(0 < sum(mask) < len(mask) - 1 for mask in masks)
    long_text = MANIFEST["inputs"][2]
    assert len(long_text.split()) > CASES["llama-none-mean-skip1-A"]["doc_max_length"]
    assert sum(masks[2]) <= CASES["llama-none-mean-skip1-A"]["doc_max_length"]


def test_empty_text_pools_nothing_when_instruction_is_skipped():
    tokenizer = tokenizer_of("llama")
    got = tokenize(tokenizer, [["Find the answer:", ""], ""], max_length=32)
    # llm2vec joins "instruction" + " " + text, so the space before the empty text is tokenized.
    instruction_ids = tokenizer("Find the answer: ")["input_ids"]
    assert [item.input_ids for item in got] == [instruction_ids, [tokenizer.bos_token_id]]
    assert [item.pool_mask for item in got] == [[False] * len(instruction_ids), [False]]
    kept = tokenize(tokenizer, [""], skip_instruction=False)
    assert kept[0].pool_mask == [True]


def test_plain_text_equals_pair_with_empty_instruction():
    tokenizer = tokenizer_of("llama")
    texts = ["one text", "another, longer text"]
    plain = tokenize(tokenizer, texts)
    pairs = tokenize(tokenizer, [("", t) for t in texts])
    assert plain == pairs
    assert plain[0].pool_mask[0] is False  # BOS is not pooled with skip_instruction
    assert all(plain[0].pool_mask[1:])


def test_tokenizer_calls_do_not_grow_with_the_number_of_inputs():
    tokenizer = tokenizer_of("llama")
    calls = []

    def counting_tokenizer(*args, **kwargs):
        calls.append(args)
        return tokenizer(*args, **kwargs)

    inputs = [["Find:", f"short text number {i}"] for i in range(50)]
    got = tokenize(counting_tokenizer, inputs, max_length=32, doc_max_length=24)
    assert len(got) == 50
    assert len(calls) <= 3


def test_format_for_tokenization_rewrites():
    mistral_chat = ("mistralai/Mistral-7B-Instruct-v0.2", "mistral")
    assert format_for_tokenization(" Find: ", "text ", "eos_token", *mistral_chat) == (
        f"[INST] Find: {SEPARATOR}text [/INST] </s>"
    )
    assert format_for_tokenization("", " text ", "eos_token", "some/qwen2", "qwen2") == (
        f"{SEPARATOR} text<|endoftext|>"
    )
    llama3_chat = ("meta-llama/Meta-Llama-3-8B-Instruct", "llama")
    assert format_for_tokenization("Q:", "text", "eos_token", *llama3_chat) == (
        f"<|start_header_id|>user<|end_header_id|>\n\nQ: {SEPARATOR}text<|eot_id|>"
    )
    assert format_for_tokenization("", "text", "mean", "x", "llama") == f"{SEPARATOR}text"


@pytest.mark.parametrize(
    "inputs, message",
    [
        (
            ["fine", 3],
            r"inputs\[1\] must be a str or an \[instruction, text\] pair of str, got int",
        ),
        ([["a", "b", "c"]], r"inputs\[0\] .* got a list of length 3"),
        ([("instruction", None)], r"inputs\[0\] .* got a pair of \[str, NoneType\]"),
        ("a single string", r"got a single str; wrap it in a list"),
    ],
    ids=["int-item", "triple", "pair-with-none", "bare-str"],
)
def test_bad_inputs_say_which_item_and_type(inputs, message):
    with pytest.raises(TypeError, match=message):
        as_instruction_pairs(inputs)
    with pytest.raises(TypeError, match=message):
        tokenize(tokenizer_of("llama"), inputs)


def test_bad_settings_are_rejected():
    tokenizer = tokenizer_of("llama")
    with pytest.raises(ValueError, match="unknown pooling_mode 'max'"):
        tokenize(tokenizer, ["x"], pooling_mode="max")
    with pytest.raises(ValueError, match="max_length must be a positive int, got 0"):
        tokenize(tokenizer, ["x"], max_length=0)
    with pytest.raises(ValueError, match="doc_max_length must be a positive int"):
        tokenize(tokenizer, ["x"], doc_max_length=None)


def test_no_inputs_give_an_empty_result():
    assert tokenize(tokenizer_of("llama"), []) == []


def test_truncated_flags_doc_max_length_and_max_length_cuts():
    case = CASES["llama-none-mean-skip1-A"]
    got = tokenize(
        tokenizer_of("llama"),
        MANIFEST["inputs"],
        max_length=case["max_length"],
        doc_max_length=case["doc_max_length"],
    )
    untouched = tokenize(tokenizer_of("llama"), MANIFEST["inputs"], max_length=4096)
    for item, full in zip(got, untouched):
        assert item.truncated == (item.input_ids != full.input_ids)
    assert got[2].truncated and got[9].truncated and not got[0].truncated
    assert not any(item.truncated for item in untouched)
