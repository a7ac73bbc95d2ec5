"""Text handling of llm2vec 0.2.3: instructions, truncation, rewrites, and which tokens are pooled.

Reproduces, token for token, what ``llm2vec.LLM2Vec.encode`` feeds its model, without padding:
per input the token ids and a pool mask (the tokens that mean / weighted-mean pooling average).
tests/data/LLM2VEC_SEMANTICS.md describes the rules; tests/test_text.py checks them against ids
and masks recorded from llm2vec itself.
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .kernels.reference import POOLING_MODES
from .settings import CONFIG_FILE, DEFAULT_MAX_LENGTH, DEFAULT_POOLING_MODE, LLM2VEC_DOC_MAX_LENGTH

# llm2vec joins instruction and text with this marker, then splits on it again before tokenizing.
SEPARATOR = "!@#$%^&*()"

# The end-of-sequence text llm2vec appends for eos_token pooling, by config model_type
# (llm2vec tests isinstance(config, LlamaConfig | MistralConfig | GemmaConfig | Qwen2Config)).
_EOS_SUFFIX_BY_MODEL_TYPE = {
    "llama": " </s>",
    "mistral": " </s>",
    "gemma": "<eos>",
    "qwen2": "<|endoftext|>",
}
_LLAMA3_BASE = "meta-llama/Meta-Llama-3-8B"
_LLAMA3_INSTRUCT = "meta-llama/Meta-Llama-3-8B-Instruct"
_INST_MODELS = ("mistralai/Mistral-7B-Instruct-v0.2", "meta-llama/Llama-2-7b-chat-hf")
_GEMMA_CHAT_MODELS = ("google/gemma-2-9b-it",)
_QWEN2_CHAT_MODELS = ("Qwen/Qwen2-1.5B-Instruct", "Qwen/Qwen2-7B-Instruct")


def model_identity(model_path: str | Path) -> str:
    """llm2vec's ``model.config._name_or_path`` for a local model, which its text rewrites key on.

    That is the ``_name_or_path`` entry of the config.json in the folder passed as the base
    model (for an LLM2Vec chain: the MNTP folder, not the folder its weights come from); ""
    when the entry is absent or the path is not a folder with a config.json (a GGUF file).
    """
    config_path = Path(model_path) / CONFIG_FILE
    if not config_path.is_file():
        return ""
    return str(json.loads(config_path.read_text()).get("_name_or_path", ""))


@dataclass
class TokenizedText:
    """One input, unpadded: its token ids, which tokens mean pooling averages, and whether
    doc_max_length or max_length shortened it."""

    input_ids: list[int]
    pool_mask: list[bool]
    truncated: bool = False


def is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_positive_int(name: str, value: Any) -> None:
    if not is_positive_int(value):
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_encodable(index: int, text: str) -> None:
    """A lone surrogate (text decoded with errors="surrogateescape", say) has no UTF-8 form."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"inputs[{index}] is not valid Unicode: {exc.object[exc.start : exc.end]!r} at"
            f" character {exc.start} is a lone surrogate"
        ) from None


def as_instruction_pairs(inputs: Sequence) -> list[tuple[str, str]]:
    """Validate inputs: each a text (str) or an [instruction, text] pair; a bare text gets ""
    as its instruction."""
    if isinstance(inputs, (str, bytes)):
        raise TypeError(
            "inputs must be a sequence of texts or [instruction, text] pairs, got a single "
            f"{type(inputs).__name__}; wrap it in a list"
        )
    pairs = []
    for index, item in enumerate(inputs):
        if isinstance(item, str):
            _check_encodable(index, item)
            pairs.append(("", item))
            continue
        if isinstance(item, (list, tuple)) and len(item) == 2:
            instruction, text = item
            if isinstance(instruction, str) and isinstance(text, str):
                _check_encodable(index, instruction)
                _check_encodable(index, text)
                pairs.append((instruction, text))
                continue
            kinds = f"[{type(instruction).__name__}, {type(text).__name__}]"
            raise TypeError(
                f"inputs[{index}] must be a str or an [instruction, text] pair of str, "
                f"got a pair of {kinds}"
            )
        described = (
            f"a {type(item).__name__} of length {len(item)}"
            if isinstance(item, (list, tuple))
            else type(item).__name__
        )
        raise TypeError(
            f"inputs[{index}] must be a str or an [instruction, text] pair of str, got {described}"
        )
    return pairs


def truncate_texts(tokenizer, texts: list[str], max_length: int, doc_max_length: int) -> list[str]:
    """llm2vec's doc_max_length rule: drop trailing words until the text has few enough tokens.

    Token counts are taken without special tokens and after truncation to max_length. While a
    text has more than doc_max_length tokens, it keeps the first int(words * doc_max_length /
    tokens) whitespace-separated words, joined by single spaces.
    """
    if doc_max_length >= max_length:
        return list(texts)  # counts are capped at max_length, so nothing is ever cut
    counts = _token_counts(tokenizer, texts, max_length)
    truncated = list(texts)
    for index, count in enumerate(counts):
        text = texts[index]
        while count > doc_max_length:
            words = text.split()
            text = " ".join(words[: int(len(words) * (doc_max_length / count))])
            count = _token_counts(tokenizer, [text], max_length)[0]
        truncated[index] = text
    return truncated


def format_for_tokenization(
    instruction: str, text: str, pooling_mode: str, model_name: str, model_type: str
) -> str:
    """The string llm2vec tokenizes: instruction, separator, text, then model-specific rewrites.

    ``model_name`` is llm2vec's ``config._name_or_path`` (see :func:`model_identity`),
    ``model_type`` the config's ``model_type``.
    """
    joined = f"{instruction.strip()} {SEPARATOR}{text}" if instruction else f"{SEPARATOR}{text}"
    if model_name == _LLAMA3_INSTRUCT:
        return "<|start_header_id|>user<|end_header_id|>\n\n" + joined.strip() + "<|eot_id|>"
    if model_name in _INST_MODELS:
        joined = "[INST] " + joined.strip() + " [/INST]"
    if model_name in _GEMMA_CHAT_MODELS:
        joined = "<bos><start_of_turn>user\n" + joined.strip() + "<end_of_turn>"
    if model_name in _QWEN2_CHAT_MODELS:
        joined = "<|im_start|>user\n" + joined.strip() + "<|im_end|>"
    if pooling_mode == "eos_token":
        if model_name == _LLAMA3_BASE:
            joined = joined.strip() + "<|end_of_text|>"
        elif model_type in _EOS_SUFFIX_BY_MODEL_TYPE:
            joined = joined.strip() + _EOS_SUFFIX_BY_MODEL_TYPE[model_type]
    return joined


def tokenize(
    tokenizer,
    inputs: Sequence,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    doc_max_length: int = LLM2VEC_DOC_MAX_LENGTH,
    skip_instruction: bool = True,
    pooling_mode: str = DEFAULT_POOLING_MODE,
    model_name: str = "",
    model_type: str = "",
) -> list[TokenizedText]:
    """Token ids and pool masks for each input, exactly as llm2vec 0.2.3 computes them.

    ``tokenizer`` is the model's HF fast tokenizer (it adds BOS itself, as llm2vec relies on);
    ``model_name`` / ``model_type`` select llm2vec's text rewrites (see
    :func:`format_for_tokenization`). ``pool_mask`` is llm2vec's embed mask (the last n tokens,
    n = the token count of the text part alone) when ``skip_instruction``, else every token.
    An empty text is legal: its ids are BOS plus the instruction's tokens and, with
    skip_instruction, its pool mask is all False (mean pooling then gives zeros in this
    project; llm2vec would average its padding).
    """
    if pooling_mode not in POOLING_MODES:
        raise ValueError(f"unknown pooling_mode {pooling_mode!r}; expected one of {POOLING_MODES}")
    for name, value in (("max_length", max_length), ("doc_max_length", doc_max_length)):
        check_positive_int(name, value)
    pairs = as_instruction_pairs(inputs)
    if not pairs:
        return []

    original_texts = [text for _, text in pairs]
    texts = truncate_texts(tokenizer, original_texts, max_length, doc_max_length)
    full_texts, pooled_texts = [], []
    for (instruction, _), text in zip(pairs, texts):
        formatted = format_for_tokenization(instruction, text, pooling_mode, model_name, model_type)
        parts = formatted.split(SEPARATOR)
        full_texts.append("".join(parts))
        pooled_texts.append(parts[1] if len(parts) > 1 else "")

    input_ids = tokenizer(
        full_texts,
        truncation=True,
        max_length=max_length,
        return_attention_mask=False,
        return_token_type_ids=False,
    )["input_ids"]
    cut_at_max_length = _cut_at_max_length(tokenizer, full_texts, input_ids, max_length)
    if skip_instruction:
        pooled_counts = _token_counts(tokenizer, pooled_texts, max_length)
    else:
        pooled_counts = [len(ids) for ids in input_ids]
    items = []
    for index, (ids, count) in enumerate(zip(input_ids, pooled_counts)):
        pooled = min(count, len(ids))
        items.append(
            TokenizedText(
                input_ids=ids,
                pool_mask=[False] * (len(ids) - pooled) + [True] * pooled,
                truncated=texts[index] != original_texts[index] or index in cut_at_max_length,
            )
        )
    return items


def _cut_at_max_length(
    tokenizer, full_texts: list[str], input_ids: list[list[int]], max_length: int
) -> set[int]:
    """Indices whose tokens were cut at max_length (only full-length rows are re-counted)."""
    candidates = [i for i, ids in enumerate(input_ids) if len(ids) == max_length]
    if not candidates:
        return set()
    one_more = tokenizer(  # max_length + 1 tells a cut, without transformers' "too long" warning
        [full_texts[i] for i in candidates],
        truncation=True,
        max_length=max_length + 1,
        return_attention_mask=False,
        return_token_type_ids=False,
    )["input_ids"]
    return {i for i, ids in zip(candidates, one_more) if len(ids) > max_length}


def _token_counts(tokenizer, texts: list[str], max_length: int) -> list[int]:
    """Token count of each text without special tokens, capped at max_length (one batched call)."""
    encoded = tokenizer(
        texts,
        add_special_tokens=False,
        truncation=True,
        max_length=max_length,
        return_attention_mask=False,
        return_token_type_ids=False,
    )["input_ids"]
    return [len(ids) for ids in encoded]
