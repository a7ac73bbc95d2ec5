"""``llm2vec-fast embed`` (embed a corpus to Parquet shards) and ``llm2vec-fast search``."""

from __future__ import annotations

import argparse
import sys

EMBED_EPILOG = """\
inputs: JSONL (.jsonl/.ndjson/.json), CSV, TSV, Parquet, plain text (.txt, one document per
line), each optionally .gz; a file, a folder (searched recursively) or a glob. Files are taken
in sorted order, rows in file order.

output folder: shards/shard-NNNNNN.parquet (columns id, embedding), manifest.json (model,
adapters with hashes, settings, inputs, shards with checksums, counts) and errors.jsonl (id,
file, line, reason for every row not embedded). Read it with llm2vec_fast.read_embeddings(DIR).

Killed at any moment, the same command continues where it stopped; other settings or changed
inputs are refused (named) unless --overwrite. A job that stopped before its first shard was
written (a setting to fix) simply starts afresh. Under
`torchrun --nproc-per-node N --no-python llm2vec-fast embed ...` each process takes every N-th shard.
"""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_parser(subparsers) -> None:
    embed = subparsers.add_parser(
        "embed",
        help="embed a corpus into Parquet shards (resumable, multi-GPU with torchrun)",
        description="Embed every row of a corpus into Parquet shards, resumably.",
        epilog=EMBED_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    embed.add_argument(
        "--model",
        default=None,
        help="model folder or GGUF file (default: the embedded SmolLM2-135M);"
        " fake:dim=N gives a deterministic hash engine for dry runs",
    )
    embed.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="PATH",
        help="PEFT LoRA adapter folder to apply on top of the model",
    )
    embed.add_argument(
        "--input",
        required=True,
        nargs="+",
        metavar="FILE_OR_DIR_OR_GLOB",
        help="input file(s), folder(s) or glob(s)",
    )
    embed.add_argument(
        "--output", required=True, metavar="DIR", help="output folder (created if missing)"
    )
    embed.add_argument(
        "--id-field",
        default=None,
        help="field or column holding each row's id (default: ids are FILE:LINE)",
    )
    embed.add_argument(
        "--text-field", default="text", help="field or column holding the text (default: text)"
    )
    which = embed.add_mutually_exclusive_group()
    which.add_argument(
        "--instruction", default=None, help="instruction put before every text (not pooled)"
    )
    which.add_argument(
        "--instruction-field", default=None, help="field or column holding a per-row instruction"
    )
    embed.add_argument(
        "--pooling",
        default=None,
        choices=["mean", "weighted_mean", "eos_token", "last_token", "bos_token"],
        help="how token states become one vector"
        " (default: the adapter's llm2vec_config.json, else mean)",
    )
    embed.add_argument(
        "--max-length",
        type=_positive,
        default=None,
        help="tokens per text; a longer text keeps its"
        " first tokens (default: the adapter's llm2vec_config.json, else 512)",
    )
    embed.add_argument(
        "--batch-tokens",
        type=_positive,
        default=16384,
        help="tokens per packed batch, no padding (default: 16384)",
    )
    embed.add_argument("--normalize", action="store_true", help="L2-normalize the embeddings")
    embed.add_argument(
        "--causal",
        action="store_true",
        help="keep causal attention (for a base model not trained the LLM2Vec way; default:"
        " bidirectional, or what the adapter was trained with)",
    )
    embed.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="replay each batch's forward pass from a CUDA graph (pays for small models, where kernel"
        " launches dominate: measure with benchmarks/bench_encode.py; without a GPU and the Triton"
        " kernels it warns and runs eagerly)",
    )
    embed.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "float16", "bfloat16"],
        help="compute dtype (default: bfloat16 on a GPU, float32 on a CPU)",
    )
    embed.add_argument(
        "--output-dtype",
        default="float32",
        choices=["float32", "float16"],
        help="dtype stored in the shards (default: float32)",
    )
    embed.add_argument(
        "--device",
        default=None,
        help="cuda, cuda:1 or cpu (default: cuda when available; under torchrun cuda:LOCAL_RANK)",
    )
    embed.add_argument("--limit", type=int, default=None, help="only the first N input rows")
    restart = embed.add_mutually_exclusive_group()
    restart.add_argument(
        "--resume",
        action="store_true",
        help="insist on resuming a job in DIR (resuming is the"
        " default whenever DIR holds the same job)",
    )
    restart.add_argument(
        "--overwrite", action="store_true", help="delete the job in DIR and start over"
    )
    embed.add_argument(
        "--on-long",
        default="truncate",
        choices=["truncate", "error"],
        help="a text over --max-length: embed its first tokens and count it (truncate, default) or"
        " stop with an error naming its file and line",
    )
    embed.add_argument(
        "--shard-rows",
        type=_positive,
        default=10000,
        help="input rows per shard: the unit of resume (default: 10000)",
    )
    embed.add_argument("--no-progress", action="store_true", help="no progress bar")
    embed.set_defaults(run=run_embed)

    search = subparsers.add_parser(
        "search",
        help="exact top-k search over an embedded corpus",
        description="Embed a query with the job's model and print the k nearest rows"
        " by cosine similarity (exact, no index).",
    )
    search.add_argument("folder", metavar="DIR", help="output folder of `llm2vec-fast embed`")
    search.add_argument("--query", required=True, help="the query text")
    search.add_argument("-k", type=_positive, default=10, help="how many results (default: 10)")
    search.add_argument(
        "--instruction",
        default=None,
        help="instruction for the query (default: the job's --instruction)",
    )
    search.add_argument("--device", default=None, help="device for the query embedding")
    search.set_defaults(run=run_search)


def run_embed(args: argparse.Namespace) -> int:
    from llm2vec_fast.corpus.job import embed_corpus

    summary = embed_corpus(
        args.input,
        args.output,
        model=args.model,
        adapters=args.adapter,
        id_field=args.id_field,
        text_field=args.text_field,
        instruction=args.instruction,
        instruction_field=args.instruction_field,
        pooling=args.pooling,
        max_length=args.max_length,
        batch_tokens=args.batch_tokens,
        normalize=args.normalize,
        causal=args.causal,
        cuda_graphs=args.cuda_graphs,
        dtype=args.dtype,
        output_dtype=args.output_dtype,
        device=args.device,
        limit=args.limit,
        resume=args.resume,
        overwrite=args.overwrite,
        on_long=args.on_long,
        shard_rows=args.shard_rows,
        progress=not args.no_progress,
    )
    if summary.rank == 0:
        print(summary, file=sys.stderr)
    return 0


def run_search(args: argparse.Namespace) -> int:
    from llm2vec_fast.corpus.nearest import search

    for rank, (row_id, score) in enumerate(
        search(args.folder, args.query, args.k, instruction=args.instruction, device=args.device),
        start=1,
    ):
        print(f"{rank:>3}  {score:.4f}  {row_id}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the corpus subcommands without the package CLI: ``python -m llm2vec_fast.corpus.cli``."""
    from llm2vec_fast.cli import run

    parser = argparse.ArgumentParser(prog="llm2vec-fast")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
