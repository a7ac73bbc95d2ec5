"""``llm2vec-fast export`` and ``llm2vec_fast.sentence_transformers``: an exported folder run by
sentence-transformers reproduces llm2vec 0.2.3's recorded embeddings (tests/data/llm2vec_reference),
and the same folder loads with ``LLM2Vec.from_pretrained`` and ``llm2vec-fast embed``."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer

from llm2vec_fast import LLM2Vec, read_embeddings
from llm2vec_fast.cli import main
from llm2vec_fast.sentence_transformers import LLM2VecModule, load_sentence_transformer

REFERENCE = Path(__file__).parent / "data" / "llm2vec_reference"
MANIFEST = json.loads((REFERENCE / "cases.json").read_text())
INPUTS = MANIFEST["inputs"]
ATOL = RTOL = 2e-5  # as in test_encoder.py: fp32, packed against llm2vec's padded batches
# the settings of the recorded cases "...-mean-skip1-A"
SETTINGS = ["--pooling-mode", "mean", "--max-length", "32", "--doc-max-length", "24"]
QUERY_INSTRUCTION = "Find the answer:"  # the instruction of INPUTS[11]


def expected(case_id: str) -> torch.Tensor:
    return load_file(REFERENCE / "expected.safetensors")[f"{case_id}.embeddings"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """The MNTP -> SimCSE chain exported with a query instruction."""
    output = tmp_path_factory.mktemp("export") / "llama-mntp-simcse"
    chain = [
        "--model",
        str(REFERENCE / "llama-mntp"),
        "--adapter",
        str(REFERENCE / "llama-mntp-simcse"),
    ]
    rc = main(
        ["export", *chain, "--output", str(output), *SETTINGS]
        + ["--query-instruction", QUERY_INSTRUCTION]
    )
    assert rc == 0
    return output


@pytest.fixture(scope="module")
def sentence_model(exported) -> SentenceTransformer:
    return SentenceTransformer(str(exported), trust_remote_code=True, device="cpu")


def test_folder_is_a_transformers_and_sentence_transformers_folder(exported):
    names = {path.name for path in exported.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "llm2vec_config.json"} <= names
    assert {"modules.json", "config_sentence_transformers.json"} <= names
    modules = json.loads((exported / "modules.json").read_text())
    assert [(m["path"], m["type"]) for m in modules] == [
        ("", "llm2vec_fast.sentence_transformers.LLM2VecModule")
    ]
    settings = json.loads((exported / "llm2vec_config.json").read_text())
    assert settings == {
        "pooling_mode": "mean",
        "max_length": 32,
        "doc_max_length": 24,
        "skip_instruction": True,
        "bidirectional": True,
    }
    prompts = json.loads((exported / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts == {"query": QUERY_INSTRUCTION, "document": ""}
    # llm2vec's text rewrites key on the MNTP folder's model name: it travels with the export
    config = json.loads((exported / "config.json").read_text())
    assert config["_name_or_path"] == "meta-llama/Llama-2-7b-chat-hf"
    assert not [path for path in exported.parent.iterdir() if path.name.startswith(".")]


def test_sentence_transformers_reproduces_llm2vec(exported, sentence_model):
    reference = expected("llama-mntp-simcse-mean-skip1-A")
    got = sentence_model.encode(INPUTS, convert_to_tensor=True, batch_size=5)
    torch.testing.assert_close(got, reference, atol=ATOL, rtol=RTOL)
    chain = LLM2Vec.from_pretrained(
        REFERENCE / "llama-mntp",
        REFERENCE / "llama-mntp-simcse",
        max_length=32,
        doc_max_length=24,
        pooling_mode="mean",
        torch_dtype="float32",
        device="cpu",
    )
    ours = chain.encode(INPUTS, show_progress_bar=False)
    torch.testing.assert_close(got, ours, atol=1e-6, rtol=1e-6)
    # without trust_remote_code: sentence-transformers 6 refuses the import, our loader builds it
    with pytest.raises(ValueError, match="trust_remote_code"):
        SentenceTransformer(str(exported))
    plain = load_sentence_transformer(exported, device="cpu")
    assert plain.prompts["query"] == QUERY_INSTRUCTION
    torch.testing.assert_close(plain.encode(INPUTS, convert_to_tensor=True), got)


def test_from_pretrained_and_embed_read_the_folder(exported, tmp_path):
    encoder = LLM2Vec.from_pretrained(exported, device="cpu")
    assert (encoder.pooling_mode, encoder.max_length, encoder.doc_max_length) == ("mean", 32, 24)
    reference = expected("llama-mntp-simcse-mean-skip1-A")
    got = encoder.encode(INPUTS, show_progress_bar=False)
    torch.testing.assert_close(got, reference, atol=ATOL, rtol=RTOL)

    texts = [item for item in INPUTS if isinstance(item, str)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    out = tmp_path / "job"
    rc = main(
        ["embed", "--model", str(exported), "--input", str(corpus), "--output", str(out)]
        + ["--device", "cpu", "--dtype", "float32", "--no-progress"]
    )
    assert rc == 0
    _, matrix = read_embeddings(out)
    encoder.doc_max_length = encoder.max_length  # embed cuts at max_length alone
    np.testing.assert_allclose(
        matrix, encoder.encode(texts, show_progress_bar=False).numpy(), atol=1e-6, rtol=1e-6
    )


def test_query_prompt_is_the_instruction_and_not_pooled(sentence_model):
    reference = expected("llama-mntp-simcse-mean-skip1-A")
    question = INPUTS[11][1]
    query = sentence_model.encode_query([question], convert_to_tensor=True)
    torch.testing.assert_close(query, reference[11:12], atol=ATOL, rtol=RTOL)
    document = sentence_model.encode_document([question], convert_to_tensor=True)
    plain = sentence_model.encode([question], convert_to_tensor=True)
    torch.testing.assert_close(document, plain)
    assert not torch.allclose(query, document, atol=1e-3)
    with pytest.raises(ValueError, match="prompt"):
        sentence_model.encode([["an instruction", "a text"]], prompt="another instruction")


def test_similarity_and_truncate_dim(exported, sentence_model):
    texts = [item for item in INPUTS if isinstance(item, str)]
    full = sentence_model.encode(texts, convert_to_tensor=True)
    scores = sentence_model.similarity(full[:2], full)
    torch.testing.assert_close(
        scores, torch.nn.functional.cosine_similarity(full[:2, None], full[None], dim=-1)
    )
    assert sentence_model.get_embedding_dimension() == 64
    short = SentenceTransformer(
        str(exported), trust_remote_code=True, device="cpu", truncate_dim=16
    )
    assert short.get_embedding_dimension() == 16
    torch.testing.assert_close(short.encode(texts, convert_to_tensor=True), full[:, :16])


def test_causal_export_saved_back_by_sentence_transformers(tmp_path):
    """--causal is recorded in the folder; SentenceTransformer.save writes the module back (the
    weights unfused again) to a folder that gives the same numbers."""
    output = tmp_path / "causal"
    rc = main(
        ["export", "--model", str(REFERENCE / "llama"), "--output", str(output), "--causal"]
        + SETTINGS
    )
    assert rc == 0
    model = load_sentence_transformer(output, device="cpu")
    assert isinstance(model[0], LLM2VecModule) and not model[0].encoder.enable_bidirectional
    reference = expected("llama-none-mean-skip1-A-causal")
    got = model.encode(INPUTS, convert_to_tensor=True)
    torch.testing.assert_close(got, reference, atol=ATOL, rtol=RTOL)

    model.save(str(tmp_path / "saved"))
    again = LLM2Vec.from_pretrained(tmp_path / "saved", device="cpu")
    assert not again.enable_bidirectional
    torch.testing.assert_close(again.encode(INPUTS, show_progress_bar=False), got)


def test_export_refuses_a_non_empty_folder_unless_overwrite(exported, tmp_path, capsys):
    """Re-exporting an exported folder keeps its settings and prompts."""
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    command = ["export", "--model", str(exported), "--output", str(output)]
    assert main(command) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (output / "keep.txt").read_text() == "mine"
    assert main([*command, "--overwrite"]) == 0
    assert not (output / "keep.txt").exists() and (output / "model.safetensors").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]
    for name in ("llm2vec_config.json", "config_sentence_transformers.json"):
        assert (output / name).read_text() == (exported / name).read_text()
    assert main(["export", "--model", str(output), "--output", str(output), "--overwrite"]) == 2
