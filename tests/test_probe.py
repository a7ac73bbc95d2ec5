"""Word-level probes (llm2vec_fast.probe, ``llm2vec-fast eval probe``): the CoNLL reader, span F1
on hand-made cases and against conlleval, and the probe end to end on the tiny reference model."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from llm2vec_fast import LLM2Vec, probe
from llm2vec_fast.cli import main

DATA = Path(__file__).parent / "data"
PROBE_DATA = DATA / "probe"
SYNTHETIC_TRAIN = PROBE_DATA / "synthetic_train.conll"
SYNTHETIC_TEST = PROBE_DATA / "synthetic_test.conll"
TINY_MODEL = DATA / "llm2vec_reference" / "llama"


def write(tmp_path: Path, text: str | bytes, name: str = "data.conll") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def first_blocks(path: Path, count: int) -> str:
    """The file's first ``count`` blank-line separated blocks (-DOCSTART- is the first)."""
    return "\n\n".join(path.read_text().split("\n\n")[:count]) + "\n"


CONLL_2003 = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O
. . O O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER
"""


# ------------------------------------------------------------------ reader


@pytest.mark.parametrize(
    "task, tags",
    [
        ("pos", [("NNP", "VBZ", "JJ", "NN", "."), ("NNP", "NNP")]),
        ("chunk", [("B-NP", "B-VP", "B-NP", "I-NP", "O"), ("B-NP", "I-NP")]),
        ("ner", [("B-ORG", "O", "B-MISC", "O", "O"), ("B-PER", "I-PER")]),
    ],
)
def test_reads_the_conll_2003_layout(tmp_path, task, tags):
    sentences = probe.read_conll(write(tmp_path, CONLL_2003), task)
    assert [s.words for s in sentences] == [
        ("EU", "rejects", "German", "call", "."),
        ("Peter", "Blackburn"),
    ]
    assert [s.tags for s in sentences] == tags


def test_reads_the_conll_2000_and_two_column_layouts(tmp_path):
    # tabs, CRLF line ends, a byte order mark and several blank lines between sentences
    conll_2000 = "\ufeffHe\tPRP\tB-NP\r\nreckons\tVBZ\tB-VP\r\n\r\n\r\nIt\tPRP\tB-NP\r\n"
    path = write(tmp_path, conll_2000.encode("utf-8"))
    assert [s.tags for s in probe.read_conll(path, "chunk")] == [("B-NP", "B-VP"), ("B-NP",)]
    assert [s.tags for s in probe.read_conll(path, "pos")] == [("PRP", "VBZ"), ("PRP",)]
    assert probe.read_conll(path, "pos")[0].words == ("He", "reckons")
    two = write(tmp_path, "Café B-LOC\nopens O\n", "two.conll")
    for task in ("pos", "chunk", "ner"):
        sentences = probe.read_conll(two, task)
        assert sentences == [probe.TaggedSentence(("Café", "opens"), ("B-LOC", "O"))]
    assert probe.read_conll(path, "pos", tag_column=2)[0].tags == ("B-NP", "B-VP")


def test_the_shipped_files_read_as_documented():
    train = probe.read_conll(SYNTHETIC_TRAIN, "ner")
    test = probe.read_conll(SYNTHETIC_TEST, "chunk")
    assert len(train) == 500 and len(test) == 150
    assert not {" ".join(s.words) for s in train} & {" ".join(s.words) for s in test}


@pytest.mark.parametrize(
    "text, task, message",
    [
        ("a DT B-NP\nb NN\n", "pos", r"data.conll:2: 2 columns, but the file's first word line"),
        ("a DT B-NP X Y\n", "pos", r"data.conll:1: 5 columns; expected 2"),
        ("a\n", "pos", r"data.conll:1: 1 columns; expected 2"),
        ("\n-DOCSTART- O\n\na DT B-NP\n", "ner", r"data.conll:4: a 3-column file is word POS"),
        ("", "pos", r"data.conll: no tagged sentence"),
        ("-DOCSTART- -X- O\n\n\n", "chunk", r"data.conll: no tagged sentence"),
        ("a DT B-NP\nb NN NP\n", "chunk", r"data.conll:2: tag 'NP' is not a BIO chunk tag"),
        ("a DT E-NP\n", "chunk", r"data.conll:1: tag 'E-NP' is not a BIO chunk tag"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, text, task, message):
    with pytest.raises(ValueError, match=message):
        probe.read_conll(write(tmp_path, text), task)


def test_broken_utf8_names_the_line(tmp_path):
    path = write(tmp_path, b"a DT\nb\xff\xfe NN\n")
    with pytest.raises(ValueError, match=r"data.conll:2: not UTF-8 text \(byte 1 of the line\)"):
        probe.read_conll(path, "pos")


def test_reader_refuses_unknown_tasks_columns_and_missing_files(tmp_path):
    path = write(tmp_path, "a DT B-NP\n")
    with pytest.raises(ValueError, match="unknown task 'srl'"):
        probe.read_conll(path, "srl")
    with pytest.raises(ValueError, match="tag column 3 is not a tag column of this 3-column"):
        probe.read_conll(path, "pos", tag_column=3)
    with pytest.raises(FileNotFoundError, match="CoNLL file not found"):
        probe.read_conll(tmp_path / "missing.conll", "pos")


# ------------------------------------------------------------------ span F1


def test_spans_read_bio_and_iob1_alike():
    bio = ["B-NP", "I-NP", "B-NP", "B-VP", "O", "B-PP", "B-NP"]
    iob1 = ["I-NP", "I-NP", "B-NP", "I-VP", "O", "I-PP", "I-NP"]
    expected = {("NP", 0, 2), ("NP", 2, 3), ("VP", 3, 4), ("PP", 5, 6), ("NP", 6, 7)}
    assert probe.spans(bio) == probe.spans(iob1) == expected


def test_spans_edge_cases():
    assert probe.spans([]) == set()
    assert probe.spans(["O", "O"]) == set()
    # a stray I- after O starts a chunk; I- of another type ends one and starts another
    assert probe.spans(["O", "I-PER", "I-PER", "I-LOC"]) == {("PER", 1, 3), ("LOC", 3, 4)}
    # B- of the open type splits; a chunk runs to the sentence's end
    assert probe.spans(["B-X", "B-X", "I-X"]) == {("X", 0, 1), ("X", 1, 3)}
    assert probe.spans(["B-NAME-2", "I-NAME-2"]) == {("NAME-2", 0, 2)}
    with pytest.raises(ValueError, match="word 1: tag 'NP' is not a BIO chunk tag"):
        probe.spans(["B-NP", "NP"])


def test_span_f1_counts_exact_matches_only_micro_averaged():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "B-PER"]]
    predicted = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "O", "B-LOC"]]
    # correct: LOC (0, 3..4), ORG (1, 0..1); PER (0, 0..1) is a partial match; PER/LOC type wrong
    result = probe.span_f1(gold, predicted)
    assert (result["correct"], result["found"], result["expected"]) == (2, 4, 4)
    assert result["precision"] == result["recall"] == result["f1"] == 50.0
    # micro, not macro: 1 of 1 in the first sentence, 0 of 3 in the second -> 1 of 4 overall
    result = probe.span_f1([["B-X"], ["B-X", "B-X", "B-X"]], [["B-X"], ["O", "O", "O"]])
    assert (result["precision"], result["recall"]) == (100.0, 25.0)
    assert result["f1"] == pytest.approx(40.0)
    assert probe.span_f1([["O"]], [["O"]])["f1"] == 0.0  # conlleval's 0 for no chunks at all
    with pytest.raises(ValueError, match="sentence 0: 2 gold tags but 1 predicted"):
        probe.span_f1([["O", "O"]], [["O"]])


def test_baselines_on_a_hand_made_case():
    train = [
        probe.TaggedSentence(("a", "b", "a"), ("X", "Y", "Y")),
        probe.TaggedSentence(("c",), ("Y",)),
    ]
    test = [probe.TaggedSentence(("a", "b", "d", "c"), ("X", "Y", "X", "X"))]
    # majority: Y everywhere (1 of 4); per word: a -> X (first of a tie), b -> Y, d unseen -> Y,
    # c -> Y (2 of 4)
    assert probe.baselines("pos", train, test) == {"majority": 25.0, "word_majority": 50.0}


# ------------------------------------------------------------------ the probe on a tiny model


@pytest.fixture(scope="module")
def tiny() -> LLM2Vec:
    return LLM2Vec.from_pretrained(TINY_MODEL, dtype="float32", device="cpu")


def test_word_features_are_the_first_sub_token_states(tiny):
    sentences = probe.read_conll(SYNTHETIC_TEST, "pos")[:5]
    features = probe.word_features(tiny, sentences)
    texts = [" ".join(s.words) for s in sentences]
    states = tiny.encode(texts, output_value="token_embeddings", show_progress_bar=False)
    expected = []
    for text, sentence_states in zip(texts, states):
        encoding = tiny.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        assert len(encoding["input_ids"]) == len(sentence_states)
        ends = [end for _, end in encoding["offset_mapping"]]
        for word in re.finditer(r"\S+", text):  # the first token that reaches into the word
            expected.append(
                sentence_states[next(i for i, e in enumerate(ends) if e > word.start())]
            )
    assert sum(len(s) for s in states) > len(expected)  # some words have several sub-tokens
    assert features.shape == (len(expected), tiny.embedding_dim)
    np.testing.assert_array_equal(features, torch.stack(expected).numpy())


def test_a_sentence_longer_than_max_length_is_refused(tiny):
    short = LLM2Vec(tiny.model, tiny.tokenizer, max_length=8, doc_max_length=8)
    sentence = probe.TaggedSentence(tuple(f"word{i}" for i in range(20)), ("X",) * 20)
    with pytest.raises(ValueError, match=r"sentence 1 \(20 words\) is longer than the encoder's"):
        probe.word_features(short, [sentence])


def test_probe_beats_the_majority_baseline_and_repeats_exactly(tiny):
    """On the synthetic corpus a POS tag is mostly a function of the word, which even a random
    tiny model's states carry: the probe must beat tagging every word with the commonest tag."""
    train = probe.read_conll(SYNTHETIC_TRAIN, "pos")[:60]
    test = probe.read_conll(SYNTHETIC_TEST, "pos")[:30]
    first = probe.run_probe(tiny, "pos", train, test)
    assert first["accuracy"] > first["baselines"]["majority"] + 15
    assert first["test_words"] == sum(len(s.words) for s in test)
    assert first["train_sentences"] == 60 and first["seed"] == probe.DEFAULT_SEED
    assert probe.run_probe(tiny, "pos", train, test) == first


def test_probe_refuses_a_single_training_tag_and_mismatched_features(tiny):
    one = [probe.TaggedSentence(("a", "b"), ("O", "O"))]
    with pytest.raises(ValueError, match="hold 1 distinct ner tags; a probe needs two or more"):
        probe.run_probe(tiny, "ner", one, one)
    two = [probe.TaggedSentence(("a", "b"), ("B-X", "O"))]
    features = np.zeros((3, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="features for 3 training and 3 test words, but the"):
        probe.fit_probe("ner", two, two, features, features)


def test_cli_prints_and_writes_the_result(tmp_path, capsys, tiny):
    train = write(tmp_path, first_blocks(SYNTHETIC_TRAIN, 25), "train.conll")
    test = write(tmp_path, first_blocks(SYNTHETIC_TEST, 16), "test.conll")
    output = tmp_path / "probe.json"
    arguments = ["eval", "probe", "--model", str(TINY_MODEL), "--dtype", "float32"]
    arguments += ["--train", str(train), "--test", str(test), "--task", "chunk"]
    arguments += ["--max-train-sentences", "20", "--output", str(output)]
    assert main(arguments) == 0
    result = json.loads(output.read_text())
    assert capsys.readouterr().out.startswith(f"chunk: f1 {result['f1']:.2f} on ")
    train_sentences = probe.read_conll(train, "chunk")
    test_sentences = probe.read_conll(test, "chunk")
    assert len(train_sentences) > 20
    expected = probe.run_probe(tiny, "chunk", train_sentences[:20], test_sentences)
    assert {key: result[key] for key in expected} == expected
    assert result["model"] == str(TINY_MODEL) and result["adapters"] == []
    assert result["causal"] is False and result["metric"] == "span_f1"
    assert (result["train_sentences"], result["test_sentences"]) == (20, len(test_sentences))
    # several tasks share one encoding: a list of results, each as the task alone gives it
    arguments[arguments.index("chunk")] = "pos,chunk"
    assert main([*arguments, "--causal"]) == 0
    both = json.loads(output.read_text())
    assert [r["task"] for r in both] == ["pos", "chunk"] and both[0]["causal"] is True
    causal = LLM2Vec.from_pretrained(TINY_MODEL, dtype="float32", enable_bidirectional=False)
    alone = probe.run_probe(
        causal, "pos", probe.read_conll(train, "pos")[:20], probe.read_conll(test, "pos")
    )
    assert {key: both[0][key] for key in alone} == alone
    capsys.readouterr()
    arguments[arguments.index("pos,chunk")] = "pos,srl"
    assert main(arguments) == 2
    assert "--task 'pos,srl': unknown task 'srl'" in capsys.readouterr().err


def test_cli_reports_a_malformed_file(tmp_path, capsys):
    bad = write(tmp_path, "a DT B-NP\nb NN\n")
    arguments = ["eval", "probe", "--model", str(TINY_MODEL), "--train", str(bad)]
    assert main([*arguments, "--test", str(bad), "--task", "pos"]) == 2
    assert f"{bad}:2: 2 columns" in capsys.readouterr().err
