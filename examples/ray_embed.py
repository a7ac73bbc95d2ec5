"""Embed a corpus with Ray Data: read Parquet or JSONL, embed on each actor, write Parquet shards.

    pip install 'llm2vec-fast[ray]'
    python examples/ray_embed.py 's3://bucket/docs/' s3://bucket/embeddings/ --model /models/enc \
        --actors 8 --gpus-per-actor 1

Each output row keeps its input columns and gets ``embedding`` (null for a row that could not be
embedded) and ``error`` (why, else null). Use ``llm2vec-fast embed`` (with ``torchrun`` for several
GPUs) instead for a resumable job folder with a manifest and an index.
"""

import argparse

import ray

from llm2vec_fast.corpus.ray_embed import EmbedBatches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="Parquet or JSONL files or folder (local, s3://, gs://...)")
    parser.add_argument("output", help="folder for the Parquet shards")
    parser.add_argument("--model", default=None, help="model folder (default: the default model)")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--actors", type=int, default=2, help="model copies, one per actor")
    parser.add_argument("--gpus-per-actor", type=float, default=0)
    parser.add_argument("--batch-rows", type=int, default=4096, help="rows per embed call")
    args = parser.parse_args()

    read = ray.data.read_parquet if ".parquet" in args.input else ray.data.read_json
    dataset = read(args.input).map_batches(
        EmbedBatches,
        fn_constructor_kwargs={"model": args.model, "text_column": args.text_column},
        batch_format="pyarrow",
        batch_size=args.batch_rows,
        concurrency=args.actors,
        num_gpus=args.gpus_per_actor,
    )
    dataset.write_parquet(args.output)


if __name__ == "__main__":
    main()
