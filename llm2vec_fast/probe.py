"""Word-level linear probes, as in the LLM2Vec paper: POS tagging, chunking and NER.

The encoder stays frozen. Each sentence is encoded as its words joined by single spaces; each
word is represented by the last hidden state of its first sub-token (``LLM2Vec.encode(...,
output_value="token_embeddings")`` aligned by ``LLM2Vec.word_start_indices``), and a logistic
regression (scikit-learn, standardized features, lbfgs, fixed seed) learns the tags from the
training file. Scores: accuracy for ``pos``; for ``chunk`` and ``ner`` micro-averaged span F1
over exactly matching chunks (type and boundaries), as conlleval counts them.

CoNLL files: one word per line with whitespace-separated columns, a blank line between
sentences, ``-DOCSTART-`` lines skipped, UTF-8. The layout follows from the column count:

- 2 columns, ``word tag``: the tag column, whatever the task;
- 3 columns, CoNLL-2000 ``word POS chunk``: pos and chunk;
- 4 columns, CoNLL-2003 ``word POS chunk NER``: pos, chunk and ner.

Every line of a file has the same number of columns. Chunk and NER tags are ``O``, ``B-TYPE``
or ``I-TYPE`` (BIO, or IOB1 where ``I-`` starts a chunk and ``B-`` only separates two adjacent
chunks of one type: both read the same way).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

TASKS = ("pos", "ner", "chunk")
# the tag's column (0-based) for each task, by the column count of a file's lines
TAG_COLUMNS = {
    2: {"pos": 1, "chunk": 1, "ner": 1},
    3: {"pos": 1, "chunk": 2},
    4: {"pos": 1, "chunk": 2, "ner": 3},
}
LAYOUTS = {2: "word tag", 3: "word POS chunk (CoNLL-2000)", 4: "word POS chunk NER (CoNLL-2003)"}
SPAN_TASKS = ("ner", "chunk")
DEFAULT_SEED = 0
# logistic regression: lbfgs on standardized features converges well within this
MAX_ITERATIONS = 2000


@dataclass(frozen=True)
class TaggedSentence:
    words: tuple[str, ...]
    tags: tuple[str, ...]


def read_conll(
    path: str | Path, task: str, *, tag_column: int | None = None
) -> list[TaggedSentence]:
    """The sentences of a CoNLL file with the tags ``task`` reads (see the module docstring);
    ``tag_column`` (0-based) picks another column. Malformed input raises naming file and line."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CoNLL file not found: {path}")
    sentences: list[TaggedSentence] = []
    words: list[str] = []
    tags: list[str] = []
    columns = column = None
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{path}:{number}: not UTF-8 text (byte {error.start} of the line)"
                ) from None
            fields = line.split()
            if fields and fields[0] == "-DOCSTART-":
                continue
            if not fields:
                if words:
                    sentences.append(TaggedSentence(tuple(words), tuple(tags)))
                    words, tags = [], []
                continue
            if columns is None:
                columns = len(fields)
                column = _tag_column(path, number, columns, task, tag_column)
            elif len(fields) != columns:
                raise ValueError(
                    f"{path}:{number}: {len(fields)} columns, but the file's first word line has"
                    f" {columns} ({LAYOUTS.get(columns, 'columns')})"
                )
            tag = fields[column]
            if task in SPAN_TASKS:
                _check_span_tag(tag, f"{path}:{number}")
            words.append(fields[0])
            tags.append(tag)
    if words:
        sentences.append(TaggedSentence(tuple(words), tuple(tags)))
    if not sentences:
        raise ValueError(f"{path}: no tagged sentence in the file")
    return sentences


def _tag_column(path: Path, number: int, columns: int, task: str, tag_column: int | None) -> int:
    """The 0-based column of the tags, from the column count (or the caller's choice)."""
    where = f"{path}:{number}"
    if tag_column is not None:
        if not 1 <= tag_column < columns:
            raise ValueError(
                f"{where}: tag column {tag_column} is not a tag column of this {columns}-column"
                " line (column 0 is the word)"
            )
        return tag_column
    if columns not in TAG_COLUMNS:
        raise ValueError(
            f"{where}: {columns} columns; expected 2 ({LAYOUTS[2]}), 3 ({LAYOUTS[3]}) or 4"
            f" ({LAYOUTS[4]})"
        )
    if task not in TAG_COLUMNS[columns]:
        raise ValueError(
            f"{where}: a {columns}-column file is {LAYOUTS[columns]}: it has no {task} tags"
        )
    return TAG_COLUMNS[columns][task]


def _check_span_tag(tag: str, where: str) -> None:
    if tag != "O" and not (len(tag) > 2 and tag[:2] in ("B-", "I-")):
        raise ValueError(f"{where}: tag {tag!r} is not a BIO chunk tag (O, B-TYPE or I-TYPE)")


def spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """The chunks of one sentence's BIO or IOB1 tags as ``(type, start, end)``, end exclusive.

    A chunk starts at ``B-X``, and at ``I-X`` unless the word before is inside a chunk of type
    X (so IOB1's ``I-`` starts and BIO's ``B-`` starts read alike, and a stray ``I-X`` after
    ``O`` or another type starts a chunk, as conlleval has it); it ends before the next word
    that does not continue it (``O``, ``B-``, or ``I-`` of another type)."""
    found: set[tuple[str, int, int]] = set()
    kind: str | None = None  # the type of the chunk open at the current word
    start = 0
    for index, tag in enumerate(tags):
        _check_span_tag(tag, f"word {index}")
        prefix, tag_type = (tag[:1], tag[2:]) if tag != "O" else ("O", None)
        continues = prefix == "I" and tag_type == kind
        if kind is not None and not continues:
            found.add((kind, start, index))
            kind = None
        if prefix in ("B", "I") and not continues:
            kind, start = tag_type, index
    if kind is not None:
        found.add((kind, start, len(tags)))
    return found


def span_f1(
    gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]
) -> dict[str, float | int]:
    """Micro-averaged precision, recall and F1 (x100) of exactly matching chunks, summed over
    sentences; a measure with an empty denominator is 0 (as conlleval reports it)."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold sentences but {len(predicted)} predicted")
    correct = found = expected = 0
    for number, (gold_tags, predicted_tags) in enumerate(zip(gold, predicted)):
        if len(gold_tags) != len(predicted_tags):
            raise ValueError(
                f"sentence {number}: {len(gold_tags)} gold tags but {len(predicted_tags)} predicted"
            )
        gold_spans, predicted_spans = spans(gold_tags), spans(predicted_tags)
        correct += len(gold_spans & predicted_spans)
        found += len(predicted_spans)
        expected += len(gold_spans)
    precision = 100.0 * correct / found if found else 0.0
    recall = 100.0 * correct / expected if expected else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "correct": correct,
        "found": found,
        "expected": expected,
    }


def accuracy(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> float:
    """Per-word accuracy x100."""
    pairs = [
        (g, p)
        for gold_tags, tags in zip(gold, predicted, strict=True)
        for g, p in zip(gold_tags, tags, strict=True)
    ]
    if not pairs:
        raise ValueError("accuracy of no words is undefined")
    return 100.0 * sum(g == p for g, p in pairs) / len(pairs)


def score(task: str, gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict:
    """The task's metric: ``{"accuracy": ...}`` for pos, span precision/recall/F1 otherwise."""
    if task in SPAN_TASKS:
        return span_f1(gold, predicted)
    return {"accuracy": accuracy(gold, predicted)}


def word_features(
    encoder: Any, sentences: Sequence[TaggedSentence], *, show_progress_bar: bool = False
) -> np.ndarray:
    """``(n_words, hidden)`` fp32: each word's first sub-token state, sentences in order.

    The sentences go through ``encoder.encode`` at once, so they share its token-budget packed
    batches. A sentence cut by the encoder's length limits raises (its last words would have no
    state)."""
    texts = [" ".join(sentence.words) for sentence in sentences]
    states = encoder.encode(
        texts,
        output_value="token_embeddings",
        convert_to_numpy=True,
        show_progress_bar=show_progress_bar,
    )  # list of (n_tokens, hidden)
    starts = encoder.word_start_indices(texts)
    rows = []
    for number, (sentence, sentence_states, word_starts) in enumerate(
        zip(sentences, states, starts, strict=True)
    ):
        if len(word_starts) != len(sentence.words):
            # llm2vec's word cut (doc_max_length) may be the tighter of the two limits
            limit = min(encoder.max_length, encoder.doc_max_length or encoder.max_length)
            raise ValueError(
                f"sentence {number + 1} ({len(sentence.words)} words) is longer than the"
                f" encoder's limit of {limit} tokens (max_length {encoder.max_length},"
                f" doc_max_length {encoder.doc_max_length}): only {len(word_starts)} of its"
                " words are encoded; raise --max-length"
            )
        rows.append(sentence_states[word_starts])  # (n_words, hidden)
    return np.concatenate(rows).astype(np.float32, copy=False)


def _regroup(flat: Sequence[str], sentences: Sequence[TaggedSentence]) -> list[list[str]]:
    """Per-word predictions back into sentences."""
    grouped, offset = [], 0
    for sentence in sentences:
        grouped.append(list(flat[offset : offset + len(sentence.words)]))
        offset += len(sentence.words)
    return grouped


def baselines(
    task: str, train: Sequence[TaggedSentence], test: Sequence[TaggedSentence]
) -> dict[str, float]:
    """The metric of two encoder-free taggers: every word gets the training file's most
    frequent tag (``majority``), or its own most frequent training tag, unseen words the
    overall one (``word_majority``, ties broken by first occurrence)."""
    overall = Counter(tag for sentence in train for tag in sentence.tags).most_common(1)[0][0]
    by_word: dict[str, Counter] = {}
    for sentence in train:
        for word, tag in zip(sentence.words, sentence.tags):
            by_word.setdefault(word, Counter())[tag] += 1
    gold = [sentence.tags for sentence in test]
    majority = [[overall] * len(sentence.words) for sentence in test]
    per_word = [
        [by_word[w].most_common(1)[0][0] if w in by_word else overall for w in sentence.words]
        for sentence in test
    ]
    key = "f1" if task in SPAN_TASKS else "accuracy"
    return {
        "majority": score(task, gold, majority)[key],
        "word_majority": score(task, gold, per_word)[key],
    }


def training_labels(task: str, train: Sequence[TaggedSentence]) -> list[str]:
    """The training words' tags, in order; a probe needs at least two distinct ones."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    labels = [tag for sentence in train for tag in sentence.tags]
    if len(set(labels)) < 2:
        raise ValueError(
            f"the training sentences hold {len(set(labels))} distinct {task} tags; a probe"
            " needs two or more"
        )
    return labels


def fit_probe(
    task: str,
    train: Sequence[TaggedSentence],
    test: Sequence[TaggedSentence],
    train_x: np.ndarray,
    test_x: np.ndarray,
    *,
    seed: int = DEFAULT_SEED,
) -> dict[str, Any]:
    """Fit the linear probe on the training words' features ``train_x`` ``(n_train_words,
    hidden)`` and score it on ``test_x`` ``(n_test_words, hidden)``: the metric, the baselines,
    sizes and settings. One pair of feature arrays serves every task of the same files."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    labels = training_labels(task, train)
    test_words = sum(len(sentence.words) for sentence in test)
    if train_x.shape[0] != len(labels) or test_x.shape[0] != test_words:
        raise ValueError(
            f"features for {train_x.shape[0]} training and {test_x.shape[0]} test words, but"
            f" the sentences hold {len(labels)} and {test_words}"
        )
    probe = make_pipeline(
        StandardScaler(),
        LogisticRegression(max_iter=MAX_ITERATIONS, random_state=seed),
    )
    # one BLAS thread: the fit is small, its numbers then do not depend on the thread count,
    # and on a busy machine spinning BLAS threads made it slower by two orders of magnitude
    with threadpool_limits(limits=1):
        probe.fit(train_x, np.asarray(labels))
        predicted = _regroup(probe.predict(test_x).tolist(), test)
    return {
        "task": task,
        "metric": "span_f1" if task in SPAN_TASKS else "accuracy",
        **score(task, [sentence.tags for sentence in test], predicted),
        "baselines": baselines(task, train, test),
        "train_sentences": len(train),
        "train_words": len(labels),
        "test_sentences": len(test),
        "test_words": test_words,
        "tags": len(set(labels)),
        "hidden_size": int(train_x.shape[1]),
        "seed": seed,
        "classifier": "StandardScaler + LogisticRegression(lbfgs, L2, C=1.0,"
        f" max_iter={MAX_ITERATIONS}), one BLAS thread",
        "features": "last hidden state of the first sub-token of each word",
    }


def run_probe(
    encoder: Any,
    task: str,
    train: Sequence[TaggedSentence],
    test: Sequence[TaggedSentence],
    *,
    seed: int = DEFAULT_SEED,
    show_progress_bar: bool = False,
) -> dict[str, Any]:
    """Encode ``train`` and ``test`` with the frozen encoder, then ``fit_probe``."""
    training_labels(task, train)  # before the encoding, which is the slow part
    train_x = word_features(encoder, train, show_progress_bar=show_progress_bar)
    test_x = word_features(encoder, test, show_progress_bar=show_progress_bar)
    return fit_probe(task, train, test, train_x, test_x, seed=seed)
