"""Encode throughput: our packed runtime against Hugging Face transformers on the same texts.

Baseline: ``AutoModel`` with ``attn_implementation="sdpa"``, texts sorted by length and padded per
batch, a 4D mask that lets every token see every non-pad token of its text (``is_causal=False``),
mean pooling over the non-pad tokens. Both sides get the same token budget per batch and include
tokenization in their time. Default model: the embedded SmolLM2-135M-Instruct (real weights).

    python benchmarks/bench_encode.py [--quick] [--model PATH] [--dtypes float32,bfloat16]
"""

from __future__ import annotations

import torch
from transformers import AutoModel, AutoTokenizer

import harness
from workloads import mixed_length_texts

from llm2vec_fast import LLM2Vec
from llm2vec_fast.default_model import default_model_path


def padded_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices sorted by length (longest first), grouped so that rows x longest <= budget."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for index in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= budget:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


@torch.inference_mode()
def transformers_encode(model, tokenizer, texts: list[str], budget: int) -> torch.Tensor:
    """Mean-pooled bidirectional embeddings ``(n, hidden)`` the way a transformers user gets them."""
    device = next(model.parameters()).device
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    out = torch.empty(len(texts), model.config.hidden_size)
    for batch in padded_batches(lengths, budget):
        features = tokenizer([texts[i] for i in batch], padding=True, return_tensors="pt").to(device)
        keep = features["attention_mask"].bool()  # (B, L)
        additive = torch.zeros(keep.shape[0], 1, keep.shape[1], keep.shape[1], dtype=model.dtype, device=device)
        additive.masked_fill_(~keep[:, None, None, :], torch.finfo(model.dtype).min)  # pads hidden as keys
        hidden = model(input_ids=features["input_ids"], attention_mask=additive).last_hidden_state
        weights = keep.unsqueeze(-1).to(hidden.dtype)
        out[batch] = ((hidden * weights).sum(1) / weights.sum(1)).float().cpu()
    return out


def main() -> None:
    args = harness.parse_args(
        __doc__,
        lambda p: (
            p.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2)"),
            p.add_argument("--dtypes", default="float32,bfloat16"),
            p.add_argument("--texts", type=int, default=None, help="number of texts (default 256, quick 48)"),
            p.add_argument("--batch-tokens", type=int, default=4096),
        ),
    )
    device = torch.device(args.device)
    path = args.model or default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = mixed_length_texts(tokenizer, args.texts or (48 if args.quick else 256))
    total_tokens = sum(len(ids) for ids in tokenizer(texts)["input_ids"])
    repeats = 1 if args.quick else 3
    results = harness.Results("encode", device, args.out)
    hf_rate = {}
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        hf_model = AutoModel.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
        ours = LLM2Vec.from_pretrained(path, dtype=dtype, device=device, pooling_mode="mean", max_length=512)
        reference = transformers_encode(hf_model, tokenizer, texts, args.batch_tokens)
        mine = ours.encode(texts, show_progress_bar=False, max_batch_tokens=args.batch_tokens)
        agreement = torch.nn.functional.cosine_similarity(reference, mine).min().item()

        hf_ms = harness.measure_ms(
            lambda: transformers_encode(hf_model, tokenizer, texts, args.batch_tokens), device=device, warmup=0, repeats=repeats
        )
        our_ms = harness.measure_ms(
            lambda: ours.encode(texts, show_progress_bar=False, max_batch_tokens=args.batch_tokens),
            device=device, warmup=0, repeats=repeats,
        )
        hf_rate[name] = total_tokens / (hf_ms / 1e3)
        config = {"model": "SmolLM2-135M" if args.model is None else str(path), "dtype": name,
                  "texts": len(texts), "tokens": total_tokens, "batch_tokens": args.batch_tokens}
        results.add(config, "tokens/s", total_tokens / (our_ms / 1e3),
                    baseline_name=f"transformers-sdpa-padded-{name}", baseline=hf_rate[name],
                    min_cosine_vs_baseline=agreement)
        if name != "float32" and "float32" in hf_rate:
            results.add(config, "tokens/s", total_tokens / (our_ms / 1e3),
                        baseline_name="transformers-sdpa-padded-float32", baseline=hf_rate["float32"],
                        min_cosine_vs_baseline=agreement)
        del hf_model, ours
    results.save()


if __name__ == "__main__":
    main()
