"""masked_pool vs the PyTorch reference: GB/s of hidden states read, forward and forward+backward.

Bytes: the forward reads the ``(T, H)`` hidden states once (T x H x element size; the mask and
cu_seqlens are noise); forward+backward also writes the ``(T, H)`` gradient, so it is credited
with 2 x T x H x element size. Both run on the same packed batch of mixed lengths (a realistic
encode batch), bf16 on a GPU. Ours runs with ``check_cu_seqlens=False`` (no host sync), as the
encoder calls it.

Run: ``python benchmarks/bench_pooling.py [--quick]`` (on a CPU: tiny shapes, reference path).
"""

from __future__ import annotations

import torch
from harness import Results, default_dtype, measure_ms, parse_args

from llm2vec_fast.kernels import masked_pool, reference


def packed_batch(num_seqs: int, mean_len: int, width: int, dtype, device, generator):
    lengths = torch.randint(1, 2 * mean_len, (num_seqs,), generator=generator)
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(
        device=device, dtype=torch.int32
    )
    total = int(lengths.sum())
    hidden = torch.randn(total, width, generator=generator).to(device=device, dtype=dtype)
    pool_mask = (torch.rand(total, generator=generator) < 0.9).to(device)
    return hidden, cu_seqlens, pool_mask


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    device = args.device
    on_gpu = torch.device(device).type == "cuda"
    dtype = default_dtype(device)
    if on_gpu:
        shapes = (
            [(64, 256, 2048), (128, 512, 4096)]
            if args.quick
            else [(64, 256, 2048), (128, 512, 4096), (256, 512, 4096), (32, 2048, 8192)]
        )
    else:
        shapes = [(8, 32, 64)]
    generator = torch.Generator().manual_seed(0)
    results = Results("pooling", device, args.out)
    for num_seqs, mean_len, width in shapes:
        hidden, cu_seqlens, pool_mask = packed_batch(
            num_seqs, mean_len, width, dtype, device, generator
        )
        read_bytes = hidden.numel() * hidden.element_size()
        for pooling_mode, normalize in (("mean", True), ("weighted_mean", False)):
            config = {
                "seqs": num_seqs,
                "tokens": hidden.shape[0],
                "H": width,
                "mode": pooling_mode,
                "normalize": normalize,
                "dtype": str(dtype),
            }

            def ours(h=hidden):
                return masked_pool(
                    h, cu_seqlens, pooling_mode, pool_mask, normalize, check_cu_seqlens=False
                )

            def baseline(h=hidden):
                return reference.masked_pool(h, cu_seqlens, pooling_mode, pool_mask, normalize)

            with torch.no_grad():
                ours_ms, base_ms = (
                    measure_ms(ours, device=device),
                    measure_ms(baseline, device=device),
                )
            results.add(
                config,
                "fwd_GB/s",
                read_bytes / ours_ms / 1e6,
                baseline_name="torch reference",
                baseline=read_bytes / base_ms / 1e6,
                ours_ms=ours_ms,
                baseline_ms=base_ms,
            )

            leaf = hidden.detach().requires_grad_()
            grad_out = torch.randn(num_seqs, width, generator=generator).to(
                device=device, dtype=dtype
            )

            def step(fn):
                return lambda: torch.autograd.grad(fn(leaf), leaf, grad_out)

            ours_ms, base_ms = (
                measure_ms(step(ours), device=device),
                measure_ms(step(baseline), device=device),
            )
            results.add(
                config,
                "fwd_bwd_GB/s",
                2 * read_bytes / ours_ms / 1e6,
                baseline_name="torch reference",
                baseline=2 * read_bytes / base_ms / 1e6,
                ours_ms=ours_ms,
                baseline_ms=base_ms,
            )
    results.save()


if __name__ == "__main__":
    main()
