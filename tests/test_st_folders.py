"""sentence-transformers model folders through ``LLM2Vec.from_pretrained``: the same embeddings as
``SentenceTransformer(folder).encode`` in this process, prompts, Matryoshka truncation, and the
corpus job's ``--dim`` / ``--prompt-name``.

Each folder is built and saved by sentence-transformers itself around a tiny random decoder with
the word-level test tokenizer, whose post-processor adds the special tokens the real models add
(Qwen3-Embedding and e5-mistral append an end-of-text token). The Qwen3 folder gets a byte-level
tokenizer instead (the word-level one loses its words when a Qwen folder reloads it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from model_helpers import VOCAB, tiny_hf_model, tiny_tokenizer
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Dense, Normalize, Transformer
from sentence_transformers.sentence_transformer.modules import Pooling
from tokenizers import processors

from llm2vec_fast import LLM2Vec

MAX_SEQ_LENGTH = 24
QUERY_PROMPT = "w3 w4 w5 "


def _texts(count: int = 9, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    lengths = [1, 2, 5, 9, 14, 19, 30, 3, 7][:count]  # 30 words: cut at max_seq_length
    return [" ".join(f"w{w}" for w in rng.integers(6, VOCAB, n)) for n in lengths]


def _save_folder(
    tmp_path,
    name: str,
    family: str,
    template: str,
    modules,
    *,
    padding_side: str = "right",
    prompts: dict | None = None,
    default_prompt_name: str | None = None,
    seed: int = 0,
):
    """A tiny decoder wrapped by sentence-transformers, saved as a folder."""
    base = tmp_path / f"{name}-base"
    tiny_hf_model(family, seed=seed).save_pretrained(base)
    tokenizer = tiny_tokenizer()
    special = {"<s>": 1, "</s>": 2}
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, i) for t, i in special.items() if t in template]
    )
    _save_tokenizer(tokenizer, base, padding_side)
    transformer = Transformer(str(base), max_seq_length=MAX_SEQ_LENGTH)
    assert transformer.tokenizer.padding_side == padding_side
    model = SentenceTransformer(
        modules=[transformer, *modules(transformer.get_embedding_dimension())],
        prompts=prompts,
        default_prompt_name=default_prompt_name,
        device="cpu",
    )
    folder = tmp_path / name
    model.save(str(folder))
    return folder


def _save_tokenizer(tokenizer, folder, padding_side: str) -> None:
    """Saved with its padding side in tokenizer_config.json, where transformers reads it."""
    tokenizer.save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "padding_side": padding_side}))


def _assert_same_as_sentence_transformers(
    folder, texts, padding_side: str = "right", **encode_kwargs
) -> np.ndarray:
    """Ours may be off sentence-transformers in fp64 by at most 2x sentence-transformers' own fp32
    error, plus 1e-6 (a few fp32 ulps at unit scale)."""
    reference = SentenceTransformer(str(folder), device="cpu")
    assert reference.tokenizer.padding_side == padding_side
    st32 = reference.encode(texts, **encode_kwargs)
    st64 = reference.double().encode(texts, **encode_kwargs).astype(np.float64)
    ours = LLM2Vec.from_pretrained(folder, device="cpu", dtype="float32").encode(
        texts, show_progress_bar=False, convert_to_numpy=True, **encode_kwargs
    )
    assert ours.shape == st32.shape
    ours_error = np.abs(ours - st64).max()
    st_error = np.abs(st32 - st64).max()
    assert ours_error <= 2 * st_error + 1e-6, f"error {ours_error:.3e} vs ST fp32 {st_error:.3e}"
    return ours


@pytest.fixture(scope="module")
def last_token_folder(tmp_path_factory):
    """Qwen3-Embedding's shape: EOS appended by the tokenizer, left padding, last token,
    Normalize, a query prompt."""
    return _save_folder(
        tmp_path_factory.mktemp("st"),
        "last-token",
        "llama",
        "$A </s>",
        lambda dim: [Pooling(dim, pooling_mode="lasttoken"), Normalize()],
        padding_side="left",
        prompts={"query": QUERY_PROMPT},
        seed=1,
    )


@pytest.mark.parametrize(
    "encode_kwargs",
    [{}, {"prompt_name": "query"}, {"prompt": "w9 w10 "}],
    ids=["no-prompt", "query-prompt", "explicit-prompt"],
)
def test_last_token_folder_with_left_padding(last_token_folder, encode_kwargs):
    ours = _assert_same_as_sentence_transformers(
        last_token_folder, _texts(), padding_side="left", **encode_kwargs
    )
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, rtol=1e-6)


def test_encode_query_and_document_pick_prompts_as_sentence_transformers(last_token_folder):
    reference = SentenceTransformer(str(last_token_folder), device="cpu")
    encoder = LLM2Vec.from_pretrained(last_token_folder, device="cpu")
    texts = _texts(4)
    for ours, theirs in (
        (encoder.encode_query(texts), reference.encode_query(texts)),
        (encoder.encode_document(texts), reference.encode_document(texts)),
    ):
        np.testing.assert_allclose(ours.numpy(), theirs, atol=2e-6)
    assert not np.allclose(encoder.encode_query(texts), encoder.encode_document(texts))
    # an [instruction, text] pair's instruction is that text's prompt
    pairs = encoder.encode([[QUERY_PROMPT, text] for text in texts])
    torch.testing.assert_close(pairs, encoder.encode(texts, prompt_name="query"))


def test_truncate_dim_keeps_the_first_dimensions_renormalized(last_token_folder):
    texts = _texts(5)
    reference = SentenceTransformer(str(last_token_folder), device="cpu")
    # sentence-transformers truncates after Normalize without renormalizing: asked for unit
    # vectors, it normalizes the truncated ones, which this folder's Normalize means here
    expected = reference.encode(texts, truncate_dim=16, normalize_embeddings=True)
    encoder = LLM2Vec.from_pretrained(last_token_folder, device="cpu", truncate_dim=16)
    assert encoder.embedding_dim == 16
    np.testing.assert_allclose(encoder.encode(texts).numpy(), expected, atol=2e-6)
    full = LLM2Vec.from_pretrained(last_token_folder, device="cpu")
    np.testing.assert_allclose(full.encode(texts, truncate_dim=16).numpy(), expected, atol=2e-6)
    with pytest.raises(ValueError, match="truncate_dim=65 is more than the 64"):
        full.encode(texts, truncate_dim=65)


def _byte_level_tokenizer(template: str):
    """One token per character (lowercase letters, digits, the byte-level space), as a
    Qwen-style byte-level BPE without merges: a qwen3 folder reloads it unchanged."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789") + ["Ġ"]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def test_qwen3_embedding_style_folder(tmp_path):
    """Qwen3-Embedding: qwen3, end-of-text appended, left padding, last token, Normalize, an
    instruction prompt for queries."""
    base = tmp_path / "qwen3-base"
    tiny_hf_model("qwen3", seed=6).save_pretrained(base)
    _save_tokenizer(_byte_level_tokenizer("$A </s>"), base, "left")
    transformer = Transformer(str(base), max_seq_length=MAX_SEQ_LENGTH)
    dim = transformer.get_embedding_dimension()
    SentenceTransformer(
        modules=[transformer, Pooling(dim, pooling_mode="lasttoken"), Normalize()],
        prompts={"query": "instruct given a query retrieve passages query "},
        device="cpu",
    ).save(str(tmp_path / "qwen3"))
    texts = ["a tiny text", "", "another text 42", "x" * 40, "qwen three"]
    for kwargs in ({}, {"prompt_name": "query"}):
        _assert_same_as_sentence_transformers(
            tmp_path / "qwen3", texts, padding_side="left", **kwargs
        )


def test_e5_mistral_style_folder_with_default_prompt(tmp_path):
    """e5-mistral: BOS and an appended EOS, last token, Normalize, an instruction prompt that
    applies by default."""
    folder = _save_folder(
        tmp_path,
        "e5-mistral",
        "mistral",
        "<s> $A </s>",
        lambda dim: [Pooling(dim, pooling_mode="lasttoken"), Normalize()],
        prompts={"web": "w7 w8 w9 "},
        default_prompt_name="web",
        seed=2,
    )
    with_default = _assert_same_as_sentence_transformers(folder, _texts())
    explicit = _assert_same_as_sentence_transformers(folder, _texts(), prompt_name="web")
    np.testing.assert_array_equal(with_default, explicit)
    _assert_same_as_sentence_transformers(folder, _texts(), prompt="")  # no prompt at all


def test_mean_pooling_with_dense_layers_and_normalize(tmp_path):
    """Mean pooling, Dense 64 -> 48 with tanh, Dense 48 -> 32 without activation, Normalize."""
    folder = _save_folder(
        tmp_path,
        "dense",
        "llama",
        "<s> $A",
        lambda dim: [
            Pooling(dim, pooling_mode="mean"),
            Dense(dim, 48, activation_function=torch.nn.Tanh()),
            Dense(48, 32, activation_function=torch.nn.Identity()),
            Normalize(),
        ],
        prompts={"query": QUERY_PROMPT},
        seed=3,
    )
    ours = _assert_same_as_sentence_transformers(folder, _texts(), prompt_name="query")
    assert ours.shape[1] == 32
    # what decides the numbers, for the corpus job's identity: the Dense weights too
    described = LLM2Vec.from_pretrained(folder, device="cpu").describe()
    files = {Path(file["path"]).relative_to(folder).as_posix() for file in described["files"]}
    assert {"modules.json", "2_Dense/model.safetensors", "3_Dense/config.json"} <= files
    # the Dense weights are safetensors; a pickle is refused, never loaded
    dense = folder / "2_Dense"
    (dense / "model.safetensors").rename(dense / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin.*never loaded"):
        LLM2Vec.from_pretrained(folder, device="cpu")


@pytest.mark.parametrize("include_prompt", [True, False], ids=["with-prompt", "without-prompt"])
def test_every_pooling_mode(tmp_path, include_prompt):
    """cls, max, mean_sqrt_len_tokens, weightedmean, mean and lasttoken concatenated; with
    include_prompt=False the prompt's tokens (BOS included) are not pooled."""
    modes = ("cls", "max", "mean_sqrt_len_tokens", "weightedmean", "mean", "lasttoken")
    folder = _save_folder(
        tmp_path,
        "modes",
        "llama",
        "<s> $A",
        lambda dim: [Pooling(dim, pooling_mode=modes, include_prompt=include_prompt)],
        prompts={"query": QUERY_PROMPT},
        seed=4,
    )
    ours = _assert_same_as_sentence_transformers(folder, _texts(), prompt_name="query")
    assert ours.shape[1] == 64 * len(modes)
    _assert_same_as_sentence_transformers(folder, _texts())


def test_lowercase_folder(tmp_path):
    """do_lower_case in sentence_bert_config.json lowercases before the tokenizer runs."""
    folder = _save_folder(
        tmp_path,
        "lower",
        "llama",
        "<s> $A",
        lambda dim: [Pooling(dim, pooling_mode="mean")],
        seed=5,
    )
    config_path = folder / "sentence_bert_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "do_lower_case": True}))
    texts = [text.upper() for text in _texts()]
    ours = _assert_same_as_sentence_transformers(folder, texts)
    lower = LLM2Vec.from_pretrained(folder, device="cpu").encode(_texts()).numpy()
    np.testing.assert_allclose(ours, lower, atol=1e-6)


def test_unsupported_folders_are_refused_by_name(last_token_folder, tmp_path):
    folder = tmp_path / "custom"
    shutil.copytree(last_token_folder, folder)
    modules = json.loads((folder / "modules.json").read_text())
    modules[1]["type"] = "my_package.CustomPooling"
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match="'my_package.CustomPooling' is not supported"):
        LLM2Vec.from_pretrained(folder, device="cpu")
    with pytest.raises(ValueError, match=r"\(lasttoken\): pooling_mode and skip_instruction"):
        LLM2Vec.from_pretrained(last_token_folder, device="cpu", pooling_mode="mean")
    encoder = LLM2Vec.from_pretrained(last_token_folder, device="cpu")
    with pytest.raises(ValueError, match="prompt_name 'passage' is not a prompt"):
        encoder.encode(["w5"], prompt_name="passage")


def test_embed_dim_and_prompt_are_recorded_and_search_uses_them(
    last_token_folder, tmp_path, capsys
):
    """``embed --dim 16 --prompt-name query`` stores the truncated vectors of the prompted texts;
    ``search`` embeds its queries with the job's dimensions and its own prompt."""
    from llm2vec_fast import read_embeddings
    from llm2vec_fast.cli import main
    from llm2vec_fast.corpus.manifest import load_manifest
    from llm2vec_fast.corpus.nearest import search

    texts = _texts()
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    out = tmp_path / "job"
    argv = ["embed", "--model", str(last_token_folder), "--input", str(tmp_path / "in.txt")]
    argv += ["--output", str(out), "--dim", "16", "--prompt", "w9 ", "--device", "cpu"]
    assert main([*argv, "--no-progress"]) == 0
    _, stored = read_embeddings(out)
    encoder = LLM2Vec.from_pretrained(last_token_folder, device="cpu")
    expected = encoder.encode(texts, prompt="w9 ", truncate_dim=16).numpy()
    np.testing.assert_allclose(stored, expected, atol=1e-6)
    manifest = load_manifest(out)
    assert manifest["settings"]["dim"] == 16 and manifest["settings"]["prompt"] == "w9 "
    assert manifest["engine"]["dim"] == 16 and manifest["engine"]["prompt"] == "w9 "

    query = texts[4]
    hits = search(out, query, k=3, prompt_name="query")
    wanted = encoder.encode([query], prompt_name="query", truncate_dim=16).numpy()[0]
    scores = stored @ wanted / np.linalg.norm(stored, axis=1) / np.linalg.norm(wanted)
    best = np.argsort(-scores)[:3]
    assert [row_id for row_id, _ in hits] == [f"in.txt:{row + 1}" for row in best]
    np.testing.assert_allclose([score for _, score in hits], scores[best], atol=1e-5)
    # the same through the command line
    assert main(["search", str(out), "--query", query, "-k", "3", "--prompt-name", "query"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed[2] == f"in.txt:{best[0] + 1}"


def test_eval_sts_takes_a_prompt_name(last_token_folder, tmp_path, capsys):
    from llm2vec_fast.cli import main
    from llm2vec_fast.evaluation import evaluate_sts, read_sts

    texts = _texts()
    rows = [f"g\tf\t2020\t{i}\t{i % 5}.0\t{texts[i]}\t{texts[-1 - i]}" for i in range(len(texts))]
    (tmp_path / "sts.tsv").write_text("\n".join(rows) + "\n")
    argv = ["eval", "sts", "--model", str(last_token_folder), "--data", str(tmp_path / "sts.tsv")]
    assert main([*argv, "--prompt-name", "query"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    encoder = LLM2Vec.from_pretrained(last_token_folder, device="cpu")
    data = read_sts(tmp_path / "sts.tsv")
    seen = []

    class Recorder:  # an LLM2Vec-like encoder: the prompt is passed on only when given
        def encode(self, texts, **kwargs):
            seen.append({key: kwargs[key] for key in ("prompt", "prompt_name") if key in kwargs})
            return encoder.encode(texts, **kwargs)

    prompted = evaluate_sts(Recorder(), data, prompt_name="query")["spearman"]
    evaluate_sts(Recorder(), data)
    assert seen == [{"prompt_name": "query"}, {}]
    assert printed["spearman"] == pytest.approx(prompted)


EMBEDDING_GEMMA_PROMPTS = {
    "query": "task: search result | query: ",
    "document": "title: none | text: ",
}


def _gemma_tokenizer():
    """The word-level test tokenizer with EmbeddingGemma's prompt words in its vocabulary and
    its post-processing (BOS first, EOS last)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["task", ":", "search", "result", "|", "query", "title", "none", "text"]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    vocab.update({f"w{i}": i for i in range(len(vocab), VOCAB)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def test_embedding_gemma_style_folder(tmp_path):
    """EmbeddingGemma: Gemma 3 with use_bidirectional_attention (full attention on global layers,
    a band on sliding ones, texts longer than it), mean pooling, Dense 64 -> 256 -> 64 without
    bias or activation, Normalize, its query and document prompts."""
    from gemma3_helpers import gemma3_norms_in_input_dtype, tiny_gemma3

    base = tmp_path / "gemma3-base"
    tiny_gemma3(seed=7, use_bidirectional_attention=True).model.save_pretrained(base)
    _save_tokenizer(_gemma_tokenizer(), base, "right")
    transformer = Transformer(str(base), max_seq_length=MAX_SEQ_LENGTH)
    dim = transformer.get_embedding_dimension()
    identity = torch.nn.Identity()
    SentenceTransformer(
        modules=[
            transformer,
            Pooling(dim, pooling_mode="mean"),
            Dense(dim, 4 * dim, bias=False, activation_function=identity),
            Dense(4 * dim, dim, bias=False, activation_function=identity),
            Normalize(),
        ],
        prompts=EMBEDDING_GEMMA_PROMPTS,
        device="cpu",
    ).save(str(tmp_path / "gemma3"))
    assert LLM2Vec.from_pretrained(tmp_path / "gemma3", device="cpu").causal is False
    rng = np.random.default_rng(7)
    texts = [" ".join(f"w{w}" for w in rng.integers(12, VOCAB, n)) for n in (1, 4, 11, 17, 30)]
    # sentence-transformers' fp64 run as a true fp64 oracle (Gemma3RMSNorm upcasts to fp32 only)
    with gemma3_norms_in_input_dtype():
        for kwargs in ({}, {"prompt_name": "query"}, {"prompt_name": "document"}):
            ours = _assert_same_as_sentence_transformers(tmp_path / "gemma3", texts, **kwargs)
            assert ours.shape == (5, 64)
            np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, rtol=1e-6)
