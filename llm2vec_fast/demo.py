"""``make demo``: the main job end to end on the embedded default model, with no download.

Writes the Python standard library's docstrings to a JSONL file, embeds them with
``llm2vec-fast embed`` (SmolLM2-135M-Instruct, mean pooling), answers a few questions with their
top hits, and prints the throughput. The default model has not been trained the LLM2Vec way, so
the demo keeps its causal attention (``--causal``): untrained, bidirectional attention makes it a
worse encoder (STS-B 16 vs 37, see the README); MNTP + SimCSE training is what makes
bidirectional pay off. Run it again and the finished job is
reused (delete the folder, or pass ``--overwrite``, to embed again).

    python -m llm2vec_fast.demo [--output demo_output] [--limit N] [--overwrite]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .corpus import embed_corpus, search
from .corpus.engine import load_engine
from .corpus.manifest import JobMismatchError
from .default_model import default_model_path
from .stdlib_docs import iter_stdlib_docstrings

QUESTIONS = (
    "parse command line arguments",
    "compute a SHA-256 hash of some bytes",
    "read rows from a CSV file",
    "send an email message over SMTP",
    "run a function in a separate thread",
    "compress data with gzip",
)
INSTRUCTION = "Given a question, retrieve Python documentation that answers it:"
# The job's engine and the one that embeds the questions must agree on these.
POOLING_MODE = "mean"
MAX_LENGTH = 256
MAX_BATCH_TOKENS = 4096


def write_corpus(path: Path, limit: int | None) -> int:
    """The stdlib docstrings as JSONL (``id``, ``text``); returns the number of rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = 0
    with open(path, "w", encoding="utf-8") as handle:
        for doc in iter_stdlib_docstrings():
            if limit is not None and rows >= limit:
                break
            handle.write(json.dumps(doc) + "\n")
            rows += 1
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("demo_output"),
        help="folder for the corpus and embeddings",
    )
    parser.add_argument("--limit", type=int, default=None, help="embed only the first N docstrings")
    parser.add_argument(
        "--overwrite", action="store_true", help="embed again even if a finished job is there"
    )
    args = parser.parse_args(argv)

    started = time.perf_counter()
    model = default_model_path()
    seconds = time.perf_counter() - started
    print(f"model: SmolLM2-135M-Instruct (embedded default) at {model} [{seconds:.1f}s]")
    corpus = args.output / "stdlib_docstrings.jsonl"
    rows = write_corpus(corpus, args.limit)
    print(f"corpus: {rows} docstrings of the Python standard library -> {corpus}")

    def embed(overwrite: bool):
        return embed_corpus(
            corpus,
            args.output / "embeddings",
            model=str(model),
            id_field="id",
            text_field="text",
            pooling_mode=POOLING_MODE,
            max_length=MAX_LENGTH,
            normalize=True,
            causal=True,
            max_batch_tokens=MAX_BATCH_TOKENS,
            overwrite=overwrite,
        )

    try:
        summary = embed(args.overwrite)
    except JobMismatchError as exc:  # another --limit or Python: the old job is of no use
        print(f"the last demo run's embeddings do not fit ({exc}): embedding again")
        summary = embed(True)
    print(summary)

    engine = load_engine(
        str(model),
        pooling_mode=POOLING_MODE,
        max_length=MAX_LENGTH,
        max_batch_tokens=MAX_BATCH_TOKENS,
        normalize=True,
        causal=True,
    )
    texts = {}
    with open(corpus, encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            texts[record["id"]] = record["text"]
    for question in QUESTIONS:
        print(f"\nQ: {question}")
        for doc_id, score in search(
            args.output / "embeddings", question, k=3, instruction=INSTRUCTION, engine=engine
        ):
            print(f"  {score:.3f}  {doc_id}: {texts[doc_id][:90]}")
    print(f"\ndone in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
