"""End-to-end corpus embedding: ``embed_corpus`` vs a padded sentence-transformers-style loop.

Question: how many documents (and tokens) per second does the offline job sustain, reading a
text file and writing Parquet shards, next to the usual way of embedding a corpus with the same
model: sort by length, batches of 32 texts padded to their longest, Hugging Face transformers
(sdpa, bidirectional mask), mean pooling, embeddings kept in memory. Also: the share of the job's
time spent tokenizing, computing and writing (stages overlap, so shares can sum past 100%).

Data: the first N lines of ../shared/data/unsup_corpus/wiki1m_for_simcse_first11914.txt.
Model: the embedded default model (SmolLM2-135M) unless --model is given.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from llm2vec_fast.settings import DEFAULT_MAX_BATCH_TOKENS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Results, parse_args, synchronize  # noqa: E402

CORPUS = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "data"
    / "unsup_corpus"
    / "wiki1m_for_simcse_first11914.txt"
)


def _extra(parser) -> None:
    parser.add_argument(
        "--model", default=None, help="model folder (default: the embedded default model)"
    )
    parser.add_argument(
        "--docs", type=int, default=None, help="documents to embed (default 1000, quick 64)"
    )
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--max-batch-tokens", type=int, default=DEFAULT_MAX_BATCH_TOKENS)
    parser.add_argument(
        "--batch-size", type=int, default=32, help="texts per padded batch in the baseline"
    )
    parser.add_argument("--corpus", type=Path, default=CORPUS)


def run_job(engine, corpus: Path, docs: int, max_batch_tokens: int) -> tuple[float, object, Path]:
    from llm2vec_fast.corpus import embed_corpus

    out = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    start = time.perf_counter()
    summary = embed_corpus(
        corpus, out, engine=engine, limit=docs, max_batch_tokens=max_batch_tokens, progress=False
    )
    return time.perf_counter() - start, summary, out


def padded_loop(
    model_path: str,
    texts: list[str],
    max_length: int,
    batch_size: int,
    device: str,
    dtype: torch.dtype,
) -> tuple[float, np.ndarray, int, int]:
    """(seconds, embeddings, real tokens, padded tokens) of the sentence-transformers-style loop."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = (
        AutoModel.from_pretrained(model_path, dtype=dtype, attn_implementation="sdpa")
        .to(device)
        .eval()
    )
    # sentence-transformers sorts by length
    order = np.argsort([-len(t) for t in texts], kind="stable")
    out = np.empty((len(texts), model.config.hidden_size), dtype=np.float32)
    real = padded = 0
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(texts), batch_size):
            rows = order[first : first + batch_size]
            batch = tokenizer(
                [texts[i] for i in rows],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(device)
            mask = batch["attention_mask"]  # (B, L)
            bidirectional = torch.zeros(
                mask.shape[0], 1, mask.shape[1], mask.shape[1], dtype=dtype, device=device
            )
            # (B, 1, L, L)
            bidirectional.masked_fill_(~mask.bool()[:, None, None, :], torch.finfo(dtype).min)
            hidden = model(input_ids=batch["input_ids"], attention_mask=bidirectional)
            hidden = hidden.last_hidden_state  # (B, L, H)
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1)  # (B, H)
            out[rows] = pooled.float().cpu().numpy()
            real += int(mask.sum())
            padded += mask.numel()
    synchronize(device)
    return time.perf_counter() - start, out, real, padded


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], _extra)
    docs = args.docs or (64 if args.quick else 1000)
    if not args.corpus.is_file():
        raise SystemExit(f"{args.corpus} is missing: pass --corpus FILE (one document per line)")
    from llm2vec_fast.corpus.engine import load_engine

    model_path = args.model
    if model_path is None:
        from llm2vec_fast.default_model import default_model_path

        model_path = str(default_model_path())
    engine = load_engine(
        model_path,
        pooling_mode="mean",
        max_length=args.max_length,
        device=args.device,
        max_batch_tokens=args.max_batch_tokens,
    )
    dtype = getattr(torch, engine.describe()["dtype"])
    warm_seconds, _, warm_out = run_job(engine, args.corpus, min(64, docs), args.max_batch_tokens)
    shutil.rmtree(warm_out)
    seconds, summary, out = run_job(engine, args.corpus, docs, args.max_batch_tokens)
    from llm2vec_fast.corpus import read_embeddings

    ids, ours = read_embeddings(out)
    shutil.rmtree(out)
    # the rows the job embedded, numbered as the job's text reader does
    lines = args.corpus.read_bytes().decode("utf-8").split("\n")
    texts = [lines[int(i.rsplit(":", 1)[1]) - 1].removesuffix("\r") for i in ids]
    # warm-up
    padded_loop(model_path, texts[:64], args.max_length, args.batch_size, args.device, dtype)
    base_seconds, base, real_tokens, padded_tokens = padded_loop(
        model_path, texts, args.max_length, args.batch_size, args.device, dtype
    )
    cosine = np.sum(ours * base, 1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(base, axis=1))

    config = {
        "model": Path(model_path).name,
        "docs": docs,
        "max_length": args.max_length,
        "batch_tokens": args.max_batch_tokens,  # the results files' key
        "dtype": str(dtype).removeprefix("torch."),
    }
    split = {k: round(v, 4) for k, v in summary.seconds.items()}
    shares = {
        f"share_{k}": round(summary.seconds.get(k, 0.0) / seconds, 4)
        for k in ("tokenize", "compute", "write")
    }
    results = Results("embed-corpus", args.device, args.out)
    baseline_name = f"HF padded loop, batch {args.batch_size}"
    results.add(
        config,
        "docs/s",
        summary.embedded / seconds,
        baseline_name=baseline_name,
        baseline=len(texts) / base_seconds,
        seconds=round(seconds, 3),
        baseline_seconds=round(base_seconds, 3),
        stage_seconds=split,
        **shares,
    )
    results.add(
        config,
        "tokens/s",
        summary.tokens / seconds,
        baseline_name=baseline_name + " (real tokens)",
        baseline=real_tokens / base_seconds,
        baseline_padding_fraction=round(1 - real_tokens / padded_tokens, 4),
    )
    results.add(config, "tokenize share", shares["share_tokenize"], higher_is_better=False)
    results.add(
        config,
        "median cosine ours vs baseline",
        float(np.median(cosine)),
        min_cosine=float(cosine.min()),
    )
    results.save()


if __name__ == "__main__":
    main()
