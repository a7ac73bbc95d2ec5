"""``make demo``: the main job end to end on an embedded model, with no download.

Writes the Python standard library's docstrings to a JSONL file, embeds them with
``llm2vec-fast embed`` (mean pooling), answers a few questions with their top hits, and prints
the throughput. The default is the package's LLM2Vec encoder: SmolLM2-135M-Instruct with
bidirectional attention and the shipped MNTP + SimCSE adapters (``default_encoder``; STS-B 60
where the untouched causal decoder scores 37). ``--model gemma3-270m`` runs Gemma 3 270M, which
has not been trained the LLM2Vec way and so keeps its causal attention (untrained, bidirectional
attention makes a decoder a worse encoder: SmolLM2 drops from 37 to 16). Run it again and the
finished job is reused (delete the folder, or pass ``--overwrite``, to embed again).

    python -m llm2vec_fast.demo [--model smollm2|gemma3-270m] [--output FOLDER] [--limit N]
                                [--overwrite]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .corpus import embed_corpus, search
from .corpus.engine import load_engine
from .corpus.manifest import JobMismatchError
from .default_model import DEFAULT_MODEL, EMBEDDED_MODELS, embedded_model_path
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
DEFAULT_OUTPUT = Path("demo_output")


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
        "--model",
        choices=list(EMBEDDED_MODELS),
        default=DEFAULT_MODEL,
        help=f"the embedded model to embed with (default {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="folder for the corpus and embeddings (default demo_output, and demo_output/MODEL"
        " for a model other than the default)",
    )
    parser.add_argument("--limit", type=int, default=None, help="embed only the first N docstrings")
    parser.add_argument(
        "--overwrite", action="store_true", help="embed again even if a finished job is there"
    )
    args = parser.parse_args(argv)

    if args.output is None:
        args.output = DEFAULT_OUTPUT if args.model == DEFAULT_MODEL else DEFAULT_OUTPUT / args.model

    started = time.perf_counter()
    model = embedded_model_path(args.model)
    seconds = time.perf_counter() - started
    # no model: the default encoder (load_engine: SmolLM2 + the shipped LLM2Vec adapters,
    # bidirectional); another embedded model is an untrained decoder, kept causal
    engine_model = None if args.model == DEFAULT_MODEL else str(model)
    causal = engine_model is not None
    kind = "causal" if causal else "+ LLM2Vec MNTP + SimCSE adapters, bidirectional"
    title = EMBEDDED_MODELS[args.model].title
    print(f"model: {title} (embedded, {kind}) at {model} [{seconds:.1f}s]")
    corpus = args.output / "stdlib_docstrings.jsonl"
    rows = write_corpus(corpus, args.limit)
    print(f"corpus: {rows} docstrings of the Python standard library -> {corpus}")

    def embed(overwrite: bool):
        return embed_corpus(
            corpus,
            args.output / "embeddings",
            model=engine_model,
            id_field="id",
            text_field="text",
            pooling_mode=POOLING_MODE,
            max_length=MAX_LENGTH,
            normalize=True,
            causal=causal,
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
        engine_model,
        pooling_mode=POOLING_MODE,
        max_length=MAX_LENGTH,
        max_batch_tokens=MAX_BATCH_TOKENS,
        normalize=True,
        causal=causal,
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
