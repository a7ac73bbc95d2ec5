"""contrastive_loss vs the plain PyTorch similarity-matrix loss: time and peak memory.

One hard negative per query (N = 2B docs), D = 1024 and 4096, bf16 on a GPU; B from 512 (where
the forward's doc splits matter most: 8 query blocks alone would leave an H100 idle) up to the
largest that fits (quick mode: B = 512 and 8192). The baseline is the loss as it is usually
written: normalize and multiply in the input dtype (bf16 tensor cores, like ours), cross-entropy
over the (B, N) logits in fp32. Time: forward alone (no autograd graph) and forward+backward of the
loss w.r.t. queries and docs (median, CUDA events); each config records the forward's grid
(query blocks x doc splits). Peak memory: above the inputs, during one forward+backward after a
warm-up call (the gradients of the inputs included, for both). A baseline that runs out of memory
is recorded as missing and ours goes on alone.

Run: ``python benchmarks/bench_contrastive.py [--quick]`` (on a CPU: tiny shapes, reference path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
from harness import Results, default_dtype, measure_ms, parse_args, peak_memory_bytes

from llm2vec_fast.kernels import contrastive, contrastive_loss

BASELINE = "torch similarity matrix"


def similarity_matrix_loss(
    queries: torch.Tensor, docs: torch.Tensor, scale: float = 20.0
) -> torch.Tensor:
    """The plain loss: (B, N) cosine logits in the input dtype, cross-entropy in fp32."""
    logits = scale * F.normalize(queries, dim=-1) @ F.normalize(docs, dim=-1).T  # (B, N)
    return F.cross_entropy(logits.float(), torch.arange(queries.shape[0], device=queries.device))


def forward_backward(loss_fn, queries, docs):
    return lambda: torch.autograd.grad(loss_fn(queries, docs), (queries, docs))


def forward_only(loss_fn, queries, docs):
    def step():
        with torch.no_grad():
            return loss_fn(queries, docs)

    return step


def measure(loss_fn, queries, docs, device) -> tuple[float | None, float | None, int | None]:
    """(forward ms, forward+backward ms, forward+backward peak bytes); all None when it runs out
    of memory."""
    step = forward_backward(loss_fn, queries, docs)
    try:
        peak = peak_memory_bytes(step, device=device)
        forward_ms = measure_ms(forward_only(loss_fn, queries, docs), device=device)
        return forward_ms, measure_ms(step, device=device), peak
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, None, None


def forward_grid(batch: int, n_docs: int, device: str) -> str:
    """The forward's grid as the launcher picks it: query blocks x doc splits."""
    row_blocks = triton.cdiv(batch, contrastive.BLOCK_M)
    splits, _ = contrastive.forward_splits(
        row_blocks,
        triton.cdiv(n_docs, contrastive.BLOCK_N),
        contrastive.target_programs(torch.device(device)),
    )
    return f"{row_blocks}x{splits}"


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    device = args.device
    on_gpu = torch.device(device).type == "cuda"
    dtype = default_dtype(device)
    if on_gpu:
        batches = [512, 8192] if args.quick else [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
        dims = [1024, 4096]
    else:
        batches, dims = [64, 128], [64]
    generator = torch.Generator().manual_seed(0)
    results = Results("contrastive", device, args.out)
    for dim in dims:
        for batch in batches:
            config = {
                "B": batch,
                "N": 2 * batch,
                "D": dim,
                "dtype": str(dtype),
                "forward_grid": forward_grid(batch, 2 * batch, device),
            }
            try:
                queries = torch.randn(batch, dim, generator=generator).to(
                    device=device, dtype=dtype
                )
                docs = torch.randn(2 * batch, dim, generator=generator).to(
                    device=device, dtype=dtype
                )
            except torch.OutOfMemoryError:
                break
            queries.requires_grad_()
            docs.requires_grad_()
            ours_fwd_ms, ours_ms, ours_peak = measure(contrastive_loss, queries, docs, device)
            base_fwd_ms, base_ms, base_peak = measure(similarity_matrix_loss, queries, docs, device)
            del queries, docs
            if ours_ms is None:
                break
            results.add(
                config,
                "fwd_ms",
                ours_fwd_ms,
                baseline_name=BASELINE,
                baseline=base_fwd_ms,
                higher_is_better=False,
            )
            results.add(
                config,
                "fwd_bwd_ms",
                ours_ms,
                baseline_name=BASELINE,
                baseline=base_ms,
                higher_is_better=False,
            )
            if ours_peak is not None:
                results.add(
                    config,
                    "peak_MiB",
                    ours_peak / 2**20,
                    baseline_name=BASELINE,
                    baseline=None if base_peak is None else base_peak / 2**20,
                    higher_is_better=False,
                )
    results.save()


if __name__ == "__main__":
    main()
