"""Encode throughput and MFU: our packed runtime against Hugging Face transformers.

Two sources of input:

- ``--source random`` (default on a GPU): real configs (SmolLM2-135M, Qwen2-1.5B, Mistral-7B,
  Llama-3-8B; ``random_model.py``) with random weights, the transformers model built with
  ``AutoModel.from_config`` and ours from the SAME state dict, random token ids with the
  realistic length mix of ``workloads.token_lengths`` (no tokenizer travels to the GPU machine).
  Headline: that mix; sweeps on the first config: equal lengths 64..512 ("throughput vs sequence
  length") and batch token budgets ("throughput vs batch tokens"). A config that does not fit
  the free GPU memory is skipped with a line saying so.
- ``--source texts`` (default on a CPU): the embedded SmolLM2-135M-Instruct (real weights) or
  ``--model PATH`` on stdlib texts, tokenization included in every side's time.

Baselines, measured in the same run on the same inputs:

- ``transformers-sdpa-sorted``: ``AutoModel`` with sdpa attention, sequences sorted by length and
  padded per batch under the same token budget as ours, a 4D additive mask that lets every token
  see every non-pad token of its sequence (so ``is_causal=False``), mean pooling.
- ``st-loop-32`` (random source): what ``SentenceTransformer.encode`` does with the same model:
  sequences sorted by length (longest first), fixed batches of 32, each padded to its longest.
- ``ours-eager`` (random source, first config, on a GPU; with ``--quick`` on a CPU too, where it
  only rehearses the code, running eagerly): our encoder with ``cuda_graphs=True`` (variant
  ``cuda-graphs``) against itself without; the capturing first call is timed apart.

MFU = (2 x P x tokens + 4 x sum(s_i^2) x layers x Hq x D) / time / R, with P the parameters of the
decoder layers (the embedding is a lookup; an encoder runs no LM head), the attention term for
bidirectional attention (Hq x D = hidden for these configs), and R the dense matmul rate of a large
``torch.matmul`` in the same dtype measured in this run on this device. Baselines are credited
with the same useful FLOPs, so MFU ratios equal time ratios.

    python benchmarks/bench_encode.py [--quick] [--source random|texts] [--configs a,b] \
        [--model PATH]
"""

from __future__ import annotations

import warnings

import harness
import torch
from random_model import MODEL_CONFIGS, config_dict, parameter_count, random_hf_model
from transformers import AutoModel, AutoTokenizer
from workloads import lengths_for_tokens, mixed_length_texts

from llm2vec_fast import LLM2Vec
from llm2vec_fast.config import ModelConfig
from llm2vec_fast.text import TokenizedText
from llm2vec_fast.weights import build_model, canonical_tensors

GPU_CONFIGS = "smollm2-135m,qwen2-1.5b,mistral-7b,llama-3-8b"
SWEEP_LENGTHS = (64, 128, 256, 512)
SWEEP_BUDGETS = (2048, 4096, 8192, 16384)


def padded_batches(lengths: list[int], max_batch_tokens: int) -> list[list[int]]:
    """Indices sorted by length (longest first), grouped so that rows x longest <=
    max_batch_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for index in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_batch_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def fixed_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices sorted by length (longest first), ``batch_size`` per batch: sentence-transformers'
    encode loop (it sorts by text length)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def bidirectional_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``(B, 1, L, L)`` hiding pad keys from every query: attention is not causal."""
    additive = torch.zeros(
        keep.shape[0], 1, keep.shape[1], keep.shape[1], dtype=dtype, device=keep.device
    )
    return additive.masked_fill_(~keep[:, None, None, :], torch.finfo(dtype).min)


@torch.inference_mode()
def transformers_encode(model, tokenizer, texts: list[str], max_batch_tokens: int) -> torch.Tensor:
    """Mean-pooled bidirectional embeddings ``(n, hidden)`` the way a transformers user gets
    them."""
    device = next(model.parameters()).device
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    out = torch.empty(len(texts), model.config.hidden_size)
    for batch in padded_batches(lengths, max_batch_tokens):
        features = tokenizer([texts[i] for i in batch], padding=True, return_tensors="pt").to(
            device
        )
        keep = features["attention_mask"].bool()  # (B, L)
        hidden = model(
            input_ids=features["input_ids"], attention_mask=bidirectional_mask(keep, model.dtype)
        ).last_hidden_state
        weights = keep.unsqueeze(-1).to(hidden.dtype)
        out[batch] = ((hidden * weights).sum(1) / weights.sum(1)).float().cpu()
    return out


@torch.inference_mode()
def transformers_encode_ids(
    model, sequences: list[list[int]], batches: list[list[int]], pad_id: int = 0
) -> torch.Tensor:
    """Mean-pooled bidirectional embeddings ``(n, hidden)`` of token id lists, one padded batch per
    entry of ``batches`` (right padding, pads masked out as keys and from the mean)."""
    device = next(model.parameters()).device
    out = torch.empty(len(sequences), model.config.hidden_size)
    for batch in batches:
        longest = max(len(sequences[i]) for i in batch)
        ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
        lengths = torch.tensor([len(sequences[i]) for i in batch])
        keep = (torch.arange(longest)[None, :] < lengths[:, None]).to(device)  # (B, L)
        hidden = model(
            input_ids=ids.to(device), attention_mask=bidirectional_mask(keep, model.dtype)
        ).last_hidden_state
        weights = keep.unsqueeze(-1).to(hidden.dtype)
        out[batch] = ((hidden * weights).sum(1) / weights.sum(1)).float().cpu()
    return out


def encode_flops(
    lengths: list[int], layer_params: int, num_layers: int, attention_width: int
) -> float:
    """Useful FLOPs of one bidirectional encode pass over sequences of these lengths."""
    tokens = sum(lengths)
    return (
        2.0 * layer_params * tokens
        + 4.0 * sum(s * s for s in lengths) * num_layers * attention_width
    )


def our_encoder_from(hf_model, dtype: torch.dtype, device: torch.device) -> LLM2Vec:
    """Our runtime holding the transformers model's own weights, wrapped as a mean-pooling
    encoder."""
    hf_config = hf_model.config.to_dict()
    tensors = canonical_tensors(dict(hf_model.state_dict()), hf_config)
    if not hf_config.get("tie_word_embeddings", False):
        tensors["lm_head.weight"] = tensors["embed_tokens.weight"]  # never run by an encoder
    model = build_model(ModelConfig.from_hf_dict(hf_config), tensors, dtype=dtype, device=device)
    return LLM2Vec(model, tokenizer=None, pooling_mode="mean", max_length=max(SWEEP_LENGTHS))


def fits_in_memory(name: str, dtype: torch.dtype, device: torch.device) -> tuple[bool, str]:
    """Two copies of the weights (theirs and ours) plus 25% for activations, against free memory."""
    needed = 2.5 * parameter_count(name) * torch.finfo(dtype).bits // 8
    if device.type != "cuda":
        return True, ""
    free, _ = torch.cuda.mem_get_info(device)
    return needed < free, f"needs ~{needed / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"


def random_ids(lengths: list[int], vocab_size: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=generator).tolist() for n in lengths]


def bench_random(args, device: torch.device, results: harness.Results) -> None:
    dtype = harness.default_dtype(device)
    peak = harness.matmul_tflops(device, dtype, 8192 if device.type == "cuda" else 1024)
    results.note(
        f"dense {dtype} matmul rate measured on this device: {peak:.4g} TFLOP/s"
        " (the MFU denominator)"
    )
    on_gpu = device.type == "cuda"
    tokens = args.tokens or (
        (16384 if args.quick else 131072) if on_gpu else (256 if args.quick else 1024)
    )
    repeats = 1 if args.quick and not on_gpu else (2 if args.quick else 5)
    sweep_lengths, sweep_budgets = (
        (SWEEP_LENGTHS, SWEEP_BUDGETS) if on_gpu or not args.quick else ((64, 128), (512, 1024))
    )
    names = args.configs.split(",")
    for position, name in enumerate(names):
        ok, why = fits_in_memory(name, dtype, device)
        if not ok:
            results.note(f"skip {name}: {why}")
            continue
        hf_model = random_hf_model(name, dtype=dtype, device=device)
        ours = our_encoder_from(hf_model, dtype, device)
        cfg = config_dict(name)
        layer_params = sum(p.numel() for p in ours.model.layers.parameters() if p.ndim == 2)
        width = ours.model.config.num_heads * ours.model.config.head_dim
        workloads = [
            (
                "mix",
                lengths_for_tokens(tokens, max_tokens=max(SWEEP_LENGTHS)),
                args.max_batch_tokens,
            )
        ]
        if position == 0 and not args.no_sweeps:
            workloads += [
                ("seqlen", [s] * max(1, tokens // s), args.max_batch_tokens) for s in sweep_lengths
            ]
            workloads += [("batch_tokens", workloads[0][1], b) for b in sweep_budgets]
        for sweep, lengths, max_batch_tokens in workloads:
            sequences = random_ids(lengths, cfg["vocab_size"], seed=len(lengths))
            items = [TokenizedText(ids, [True] * len(ids)) for ids in sequences]
            sorted_batches = padded_batches(lengths, max_batch_tokens)
            st_batches = fixed_batches(lengths, args.st_batch_size)

            def run_ours():
                return ours.embed_tokenized(items, max_batch_tokens=max_batch_tokens)

            def run_sorted():
                return transformers_encode_ids(hf_model, sequences, sorted_batches)

            def run_st():
                return transformers_encode_ids(hf_model, sequences, st_batches)

            agreement = torch.nn.functional.cosine_similarity(run_ours(), run_sorted()).min().item()
            ours_ms = harness.time_calls_ms(run_ours, device=device, warmup=0, repeats=repeats)
            sorted_ms = harness.time_calls_ms(run_sorted, device=device, warmup=0, repeats=repeats)
            st_ms = harness.time_calls_ms(run_st, device=device, warmup=1, repeats=repeats)
            flops = encode_flops(lengths, layer_params, cfg["num_hidden_layers"], width)
            total = sum(lengths)
            config = {
                "model": name,
                "dtype": str(dtype).removeprefix("torch."),
                "sweep": sweep,
                "seqs": len(lengths),
                "tokens": total,
                "max_len": max(lengths),
                "batch_tokens": max_batch_tokens,
            }
            sorted_padded = sum(len(b) * max(lengths[i] for i in b) for b in sorted_batches)
            st_padded = sum(len(b) * max(lengths[i] for i in b) for b in st_batches)
            results.add(
                config,
                "tokens/s",
                total / ours_ms * 1e3,
                baseline_name="transformers-sdpa-sorted",
                baseline=total / sorted_ms * 1e3,
                ours_ms=ours_ms,
                baseline_ms=sorted_ms,
                baseline_padding_fraction=1 - total / sorted_padded,
                min_cosine_vs_baseline=agreement,
            )
            results.add(
                config,
                "tokens/s",
                total / ours_ms * 1e3,
                baseline_name=f"st-loop-{args.st_batch_size}",
                baseline=total / st_ms * 1e3,
                ours_ms=ours_ms,
                baseline_ms=st_ms,
                baseline_padding_fraction=1 - total / st_padded,
            )
            results.add(
                config,
                "MFU",
                flops / ours_ms / 1e9 / peak,
                baseline_name="transformers-sdpa-sorted",
                baseline=flops / sorted_ms / 1e9 / peak,
                matmul_tflops=peak,
                flops=flops,
            )
            if position == 0 and (on_gpu or args.quick):  # quick on a CPU: rehearses this code path
                bench_cuda_graphs(
                    ours,
                    items,
                    max_batch_tokens,
                    config,
                    total,
                    ours_ms,
                    sorted_ms,
                    repeats,
                    device,
                    results,
                )
        del hf_model, ours
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # after every config: a run cut short by its time limit keeps what it measured
        results.save()


def bench_cuda_graphs(
    ours: LLM2Vec,
    items: list[TokenizedText],
    max_batch_tokens: int,
    config: dict,
    total: int,
    eager_ms: float,
    sorted_ms: float,
    repeats: int,
    device: torch.device,
    results: harness.Results,
) -> None:
    """The same workload with ``cuda_graphs=True``: the first call captures (timed apart), then
    replays. On a CPU the encoder runs eagerly (0 graphs): only a rehearsal of this code."""
    graphed = LLM2Vec(
        ours.model,
        tokenizer=None,
        pooling_mode=ours.pooling_mode,
        max_length=ours.max_length,
        cuda_graphs=True,
    )

    def run_graphed():
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "CUDA graphs need")
            return graphed.embed_tokenized(items, max_batch_tokens=max_batch_tokens)

    first_call_ms = harness.time_calls_ms(run_graphed, device=device, warmup=0, repeats=1)
    graphed_ms = harness.time_calls_ms(run_graphed, device=device, warmup=0, repeats=repeats)
    agreement = (
        torch.nn.functional.cosine_similarity(
            run_graphed(), ours.embed_tokenized(items, max_batch_tokens=max_batch_tokens)
        )
        .min()
        .item()
    )
    config = dict(config, variant="cuda-graphs")
    results.add(
        config,
        "tokens/s",
        total / graphed_ms * 1e3,
        baseline_name="ours-eager",
        baseline=total / eager_ms * 1e3,
        ours_ms=graphed_ms,
        baseline_ms=eager_ms,
        first_call_ms=first_call_ms,
        graphs=graphed._graphed.num_graphs if graphed._graphed else 0,
        min_cosine_vs_baseline=agreement,
    )
    results.add(
        config,
        "tokens/s",
        total / graphed_ms * 1e3,
        baseline_name="transformers-sdpa-sorted",
        baseline=total / sorted_ms * 1e3,
        ours_ms=graphed_ms,
        baseline_ms=sorted_ms,
    )


def bench_texts(args, device: torch.device, results: harness.Results) -> None:
    from llm2vec_fast.default_model import default_model_path

    path = args.model or default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = mixed_length_texts(tokenizer, args.texts or (48 if args.quick else 256))
    total_tokens = sum(len(ids) for ids in tokenizer(texts)["input_ids"])
    repeats = 1 if args.quick else 3
    hf_rate = {}
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        hf_model = (
            AutoModel.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
            .to(device)
            .eval()
        )
        # doc_max_length=512: no word-level cut below max_length, so ours runs every token the
        # baseline does
        ours = LLM2Vec.from_pretrained(
            path,
            dtype=dtype,
            device=device,
            pooling_mode="mean",
            max_length=512,
            doc_max_length=512,
        )
        reference = transformers_encode(hf_model, tokenizer, texts, args.max_batch_tokens)
        mine = ours.encode(texts, show_progress_bar=False, max_batch_tokens=args.max_batch_tokens)
        agreement = torch.nn.functional.cosine_similarity(reference, mine).min().item()

        hf_ms = harness.time_calls_ms(
            lambda: transformers_encode(hf_model, tokenizer, texts, args.max_batch_tokens),
            device=device,
            warmup=0,
            repeats=repeats,
        )
        our_ms = harness.time_calls_ms(
            lambda: ours.encode(
                texts, show_progress_bar=False, max_batch_tokens=args.max_batch_tokens
            ),
            device=device,
            warmup=0,
            repeats=repeats,
        )
        hf_rate[name] = total_tokens / (hf_ms / 1e3)
        config = {
            "model": "SmolLM2-135M" if args.model is None else str(path),
            "dtype": name,
            "texts": len(texts),
            "tokens": total_tokens,
            "batch_tokens": args.max_batch_tokens,
        }
        results.add(
            config,
            "tokens/s",
            total_tokens / (our_ms / 1e3),
            baseline_name=f"transformers-sdpa-padded-{name}",
            baseline=hf_rate[name],
            min_cosine_vs_baseline=agreement,
        )
        if name != "float32" and "float32" in hf_rate:
            results.add(
                config,
                "tokens/s",
                total_tokens / (our_ms / 1e3),
                baseline_name="transformers-sdpa-padded-float32",
                baseline=hf_rate["float32"],
                min_cosine_vs_baseline=agreement,
            )
        del hf_model, ours


def main() -> None:
    args = harness.parse_args(
        __doc__.splitlines()[0],
        lambda p: (
            p.add_argument(
                "--source",
                choices=["random", "texts"],
                default=None,
                help="random weights + random ids (default on a GPU) or real model + texts"
                " (default on a CPU)",
            ),
            p.add_argument(
                "--configs",
                default=None,
                help=f"random source: configs among {', '.join(MODEL_CONFIGS)} "
                f"(default on a GPU: {GPU_CONFIGS}; on a CPU: tiny)",
            ),
            p.add_argument(
                "--tokens", type=int, default=None, help="random source: tokens per workload"
            ),
            p.add_argument("--st-batch-size", type=int, default=32),
            p.add_argument(
                "--no-sweeps", action="store_true", help="random source: the length mix only"
            ),
            p.add_argument(
                "--model",
                default=None,
                help="texts source: model folder (default: the embedded SmolLM2)",
            ),
            p.add_argument("--dtypes", default="float32,bfloat16", help="texts source"),
            p.add_argument(
                "--texts",
                type=int,
                default=None,
                help="texts source: number of texts (default 256, quick 48)",
            ),
            p.add_argument("--max-batch-tokens", type=int, default=4096),
        ),
    )
    device = torch.device(args.device)
    source = args.source or ("random" if device.type == "cuda" else "texts")
    if source == "random":
        args.configs = args.configs or (GPU_CONFIGS if device.type == "cuda" else "tiny")
        unknown = [name for name in args.configs.split(",") if name not in MODEL_CONFIGS]
        if unknown:
            raise SystemExit(
                f"unknown --configs {', '.join(unknown)};"
                f" expected names among {', '.join(MODEL_CONFIGS)}"
            )
    results = harness.Results("encode" if source == "texts" else "encode-random", device, args.out)
    if source == "random":
        bench_random(args, device, results)
        if not results.records:
            results.save()  # every config was skipped: the notes say why
    else:
        bench_texts(args, device, results)
        results.save()


if __name__ == "__main__":
    main()
