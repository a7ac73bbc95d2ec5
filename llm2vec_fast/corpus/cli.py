"""``llm2vec-fast embed`` (embed a corpus to Parquet shards) and ``llm2vec-fast search``."""

from __future__ import annotations

import argparse
import json
import sys

from llm2vec_fast.corpus.job_settings import (
    CALIBRATION_ROWS,
    DEFAULT_SHARD_ROWS,
    ON_LONG,
    OUTPUT_DTYPES,
    QUANTIZE,
)
from llm2vec_fast.files import read_json_lines
from llm2vec_fast.settings import (
    DEFAULT_MAX_BATCH_TOKENS,
    DEFAULT_MAX_LENGTH,
    DEFAULT_POOLING_MODE,
)

# llm2vec_fast.kernels.POOLING_MODES, spelled out: the kernels import torch, and building the
# parser (``llm2vec-fast --help``) must not
POOLING_MODES = ("mean", "weighted_mean", "eos_token", "last_token", "bos_token")

EMBED_EPILOG = """\
inputs: JSONL (.jsonl/.ndjson/.json), CSV, TSV, Parquet, plain text (.txt, one document per
line), each optionally .gz; a file, a folder (searched recursively) or a glob. Files are taken
in sorted order, rows in file order.

output folder: shards/shard-NNNNNN.parquet (columns id, embedding; with --quantize P the codes
in embedding_P instead, or beside with --keep-float), manifest.json (model, adapters with
hashes, settings, inputs, shards with checksums, counts) and errors.jsonl (id, file, line,
reason for every row not embedded). Read it with llm2vec_fast.read_embeddings(DIR); index it
for fast search with `llm2vec-fast index DIR` (--overwrite keeps that index: it is brought up to
date by running `llm2vec-fast index DIR` again).

Killed at any moment, the same command continues where it stopped; other settings or changed
inputs are refused (named) unless --overwrite. A job that stopped before its first shard was
written (a setting to fix) simply starts afresh. Under
`torchrun --nproc-per-node N --no-python llm2vec-fast embed ...` each process takes every N-th
shard.
"""


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
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
        help="model folder or GGUF file (default: the embedded SmolLM2-135M with the shipped"
        " LLM2Vec MNTP + SimCSE adapters, unless --adapter or --causal is given);"
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
    _add_prompt_arguments(embed, "every text")
    embed.add_argument(
        "--pooling-mode",
        default=None,
        choices=POOLING_MODES,
        help="how token states become one vector"
        f" (default: the adapter's llm2vec_config.json, else {DEFAULT_POOLING_MODE})",
    )
    embed.add_argument(
        "--max-length",
        type=positive_int,
        default=None,
        help="tokens per text; a longer text keeps its first tokens (default: the adapter's"
        " llm2vec_config.json, a sentence-transformers folder's max_seq_length, else"
        f" {DEFAULT_MAX_LENGTH})",
    )
    embed.add_argument(
        "--max-batch-tokens",
        type=positive_int,
        default=DEFAULT_MAX_BATCH_TOKENS,
        help=f"tokens per packed batch, no padding (default: {DEFAULT_MAX_BATCH_TOKENS})",
    )
    embed.add_argument("--normalize", action="store_true", help="L2-normalize the embeddings")
    embed.add_argument(
        "--dim",
        type=positive_int,
        default=None,
        help="keep the first DIM dimensions of each embedding (Matryoshka models), renormalized"
        " where the model or --normalize makes unit vectors; `search` embeds queries alike",
    )
    embed.add_argument(
        "--causal",
        action="store_true",
        help="keep causal attention (for a base model not trained the LLM2Vec way; default:"
        " bidirectional, or what the adapter was trained with)",
    )
    embed.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="replay each batch's forward pass from a CUDA graph (pays for small models, where"
        " kernel launches dominate: measure with benchmarks/bench_encode.py; without a GPU and"
        " the Triton kernels it warns and runs eagerly)",
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
        choices=OUTPUT_DTYPES,
        help="dtype stored in the shards (default: float32)",
    )
    embed.add_argument(
        "--quantize",
        default=None,
        choices=QUANTIZE,
        help="store compact codes instead of the floats, as sentence-transformers'"
        " quantize_embeddings makes them: int8/uint8 with per-dimension ranges calibrated on the"
        f" job's first {CALIBRATION_ROWS:,} rows (recorded in manifest.json), binary/ubinary as"
        " packed sign bits (column embedding_PRECISION)",
    )
    embed.add_argument(
        "--keep-float",
        action="store_true",
        help="with --quantize: keep the float column too (exact search, rescoring of a binary"
        " index with floats)",
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
        choices=ON_LONG,
        help="a text over --max-length: embed its first tokens and count it (truncate, default) or"
        " stop with an error naming its file and line",
    )
    embed.add_argument(
        "--shard-rows",
        type=positive_int,
        default=DEFAULT_SHARD_ROWS,
        help=f"input rows per shard: the unit of resume (default: {DEFAULT_SHARD_ROWS})",
    )
    embed.add_argument(
        "--workers",
        type=_non_negative,
        default=None,
        help="processes that read and tokenize while this one embeds (default: min(4, CPUs - 1));"
        " 0 does it all in this process",
    )
    embed.add_argument("--no-progress", action="store_true", help="no progress bar")
    embed.set_defaults(run=run_embed)

    search = subparsers.add_parser(
        "search",
        help="top-k search over an embedded corpus (its index, or an exact scan)",
        description="Embed queries with the job's model and print the k nearest rows by cosine"
        " similarity: through the job's index (`llm2vec-fast index DIR`) when it has one, else"
        " by an exact scan of the shards.",
    )
    search.add_argument("folder", metavar="DIR", help="output folder of `llm2vec-fast embed`")
    queries = search.add_mutually_exclusive_group(required=True)
    queries.add_argument("--query", help="the query text")
    queries.add_argument(
        "--queries",
        metavar="FILE.jsonl",
        help='many queries, one JSON object a line: {"query": TEXT} with an optional "id" (and'
        ' "instruction"); prints one JSON line per query: {"id", "query", "results": [{"rank",'
        ' "id", "score"}, ...]}',
    )
    search.add_argument("-k", type=positive_int, default=10, help="how many results (default: 10)")
    search.add_argument(
        "--instruction",
        default=None,
        help="instruction for the queries (default: the job's --instruction)",
    )
    _add_prompt_arguments(search, "each query (default: the job's prompt)")
    search.add_argument(
        "--exact", action="store_true", help="scan every row exactly, even when there is an index"
    )
    search.add_argument(
        "--output",
        metavar="FILE",
        default=None,
        help="write the JSONL results of --queries to FILE (default: stdout)",
    )
    search.add_argument(
        "--ef-search", type=positive_int, default=None, help="HNSW: candidates kept while searching"
    )
    search.add_argument(
        "--nprobe", type=positive_int, default=None, help="IVF-PQ: inverted lists searched"
    )
    search.add_argument(
        "--rescore-multiplier",
        type=positive_int,
        default=None,
        help="an index that rescores takes k times this many candidates to rescore",
    )
    search.add_argument("--device", default=None, help="device for the query embedding")
    search.set_defaults(run=run_search)


def _add_prompt_arguments(parser: argparse.ArgumentParser, where: str) -> None:
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument(
        "--prompt-name",
        default=None,
        help=f"the model's prompt of this name (config_sentence_transformers.json) before {where}",
    )
    prompt.add_argument(
        "--prompt",
        default=None,
        help=f"this prompt before {where} (a sentence-transformers folder pools it as its Pooling"
        " module says; an llm2vec model takes it as the instruction); '' for none",
    )


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
        pooling_mode=args.pooling_mode,
        max_length=args.max_length,
        max_batch_tokens=args.max_batch_tokens,
        normalize=args.normalize,
        dim=args.dim,
        prompt=args.prompt,
        prompt_name=args.prompt_name,
        causal=args.causal,
        cuda_graphs=args.cuda_graphs,
        dtype=args.dtype,
        output_dtype=args.output_dtype,
        quantize=args.quantize,
        keep_float=args.keep_float,
        device=args.device,
        limit=args.limit,
        resume=args.resume,
        overwrite=args.overwrite,
        on_long=args.on_long,
        shard_rows=args.shard_rows,
        workers=args.workers,
        progress=not args.no_progress,
    )
    if summary.rank == 0:
        print(summary, file=sys.stderr)
    return 0


def run_search(args: argparse.Namespace) -> int:
    if args.output is not None and args.queries is None:
        raise ValueError("--output writes the results of --queries; give --queries FILE.jsonl")
    options = {
        "instruction": args.instruction,
        "prompt": args.prompt,
        "prompt_name": args.prompt_name,
        "device": args.device,
        "exact": args.exact,
        "ef_search": args.ef_search,
        "nprobe": args.nprobe,
        "rescore_multiplier": args.rescore_multiplier,
    }
    try:
        return _search(args, options)
    except ImportError as exc:  # an index without faiss installed
        print(f"llm2vec-fast search: error: {exc}", file=sys.stderr)
        return 2


def _search(args: argparse.Namespace, options: dict) -> int:
    from llm2vec_fast.corpus.nearest import search_many

    if args.query is not None:
        (hits,) = search_many(args.folder, [args.query], args.k, **options)
        for rank, (row_id, score) in enumerate(hits, start=1):
            print(f"{rank:>3}  {score:.4f}  {row_id}")
        return 0
    records = read_queries(args.queries)
    queries = [
        (record["instruction"], record["query"]) if record.get("instruction") else record["query"]
        for record in records
    ]
    found = search_many(args.folder, queries, args.k, **options)
    lines = []
    for record, hits in zip(records, found):
        result = {"id": record["id"]} if "id" in record else {}
        result["query"] = record["query"]
        result["results"] = [
            {"rank": rank, "id": row_id, "score": round(score, 6)}
            for rank, (row_id, score) in enumerate(hits, start=1)
        ]
        lines.append(json.dumps(result, ensure_ascii=False) + "\n")
    if args.output is None:
        sys.stdout.writelines(lines)
    else:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.writelines(lines)
    return 0


def read_queries(path: str) -> list[dict]:
    """The records of a queries file: one JSON object a line with a non-empty "query" string."""
    records = []
    for line_number, record in read_json_lines(path):
        if not isinstance(record, dict) or not isinstance(record.get("query"), str):
            raise ValueError(f'{path}:{line_number}: expected {{"query": TEXT, ...}}')
        if not record["query"].strip():
            raise ValueError(f"{path}:{line_number}: the query is empty")
        records.append(record)
    if not records:
        raise ValueError(f"{path} holds no queries")
    return records
