"""varlen_attention vs PyTorch SDPA: forward, backward and forward+backward TFLOP/s.

1. Equal-length batches (B x s tokens, the same tokens packed for ours and (B, H, s, D) views for
   SDPA with the flash backend), s from 512 to 16k at a fixed token budget, D 64 and 128, bf16.
2. A realistic varlen batch (mixed lengths) packed for ours vs SDPA on its padded form: flash with
   ``is_causal`` when causal (right padding is then invisible to real queries), the default
   backend with a key-padding mask when bidirectional (flash takes no mask).
3. The short-text encode mix (queries and sentences: log-normal lengths around 28 tokens, mean
   ~40, hundreds of sequences per batch), where ours packs several sequences into one tile: ours vs
   FlashAttention's own varlen kernel as PyTorch ships it (``torch.nn.attention.varlen``), both
   on the same packed tensors; bidirectional (encoding) and causal.

On a GPU at head dim 128, ours runs twice: with the default deterministic backward (a separate
dQ pass) and with ``deterministic=False`` (dQ accumulated with atomics in the dK/dV kernel); the
config's ``dq`` names which.

FLOPs: forward 4 x sum(s_i^2) x Hq x D, halved when causal; backward 2.5x forward (timed alone,
from a kept graph). Padded baselines are credited with the same (useful) FLOPs, so ratios are
time ratios; they get their inputs already padded, (B, max_len, H, D) as a padded model's
projections give them, so only SDPA is timed, not padding or unpadding. Ours runs with
``check_cu_seqlens=False`` and one ``schedules`` dict per batch (the kernels alone, as the model
runtime calls them: its layers share one set of work lists per batch, built by the first).

Run: ``python benchmarks/bench_attention.py [--quick]`` (on a CPU: tiny shapes, reference path).
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from harness import Results, measure_ms, parse_args
from torch.nn.attention import SDPBackend, sdpa_kernel
from workloads import lengths_for_tokens

from llm2vec_fast.kernels import varlen_attention

HIDDEN = 2048  # Hq x D


def attention_flops(lengths: list[int], num_heads: int, head_dim: int, causal: bool) -> float:
    flops = 4.0 * sum(s * s for s in lengths) * num_heads * head_dim
    return flops / 2 if causal else flops


def cu_seqlens_of(lengths: list[int], device: str) -> torch.Tensor:
    cumulative = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)
    return cumulative.to(device=device, dtype=torch.int32)


def time_forward_backward(forward, inputs, grad_out, device) -> tuple[float, float, float]:
    """(forward, backward, forward+backward) milliseconds of ``forward(*inputs)``."""
    with torch.no_grad():
        fwd_ms = measure_ms(lambda: forward(*inputs), device=device)
    out = forward(*inputs)
    bwd_ms = measure_ms(
        lambda: torch.autograd.grad(out, inputs, grad_out, retain_graph=True), device=device
    )
    del out

    def step():
        torch.autograd.grad(forward(*inputs), inputs, grad_out)

    return fwd_ms, bwd_ms, measure_ms(step, device=device)


def random_inputs(total, num_heads, head_dim, dtype, device, gen) -> list[torch.Tensor]:
    """q, k, v (requiring grad) and an upstream gradient, each ``(T, H, D)``."""
    return [
        torch.randn(total, num_heads, head_dim, generator=gen)
        .to(device=device, dtype=dtype)
        .requires_grad_(i < 3)
        for i in range(4)
    ]


def packed_attention(cu_seqlens, max_seqlen, causal):
    """Ours as ``fn(q, k, v)`` on one packed batch, its work lists built once (a ``schedules``
    dict per batch, as the model's layers share them)."""
    schedules = {}

    def ours(q, k, v):
        return varlen_attention(
            q,
            k,
            v,
            cu_seqlens,
            max_seqlen,
            causal=causal,
            check_cu_seqlens=False,
            schedules=schedules,
        )

    return ours


def record(results, config, flops, ours_ms, base_ms, baseline_name) -> None:
    """TFLOP/s of forward, backward and forward+backward, ours vs the baseline."""
    for metric, work, ours, base in zip(
        ("fwd_tflops", "bwd_tflops", "fwd_bwd_tflops"),
        (flops, 2.5 * flops, 3.5 * flops),
        ours_ms,
        base_ms,
    ):
        results.add(
            config,
            metric,
            work / ours / 1e9,
            baseline_name=baseline_name,
            baseline=work / base / 1e9,
            ours_ms=ours,
            baseline_ms=base,
        )


def bench_equal_lengths(results, device, dtype, token_budget, seqlens, head_dims) -> None:
    gen = torch.Generator().manual_seed(0)
    for head_dim, seqlen, causal in (
        (d, s, c) for d in head_dims for s in seqlens for c in (False, True)
    ):
        num_heads = max(1, HIDDEN // head_dim) if device == "cuda" else 2
        batch = max(1, token_budget // seqlen)
        lengths = [seqlen] * batch
        total = batch * seqlen
        q, k, v, grad_out = random_inputs(total, num_heads, head_dim, dtype, device, gen)
        cu_seqlens = cu_seqlens_of(lengths, device)
        schedules = {}  # the work lists, built once per batch as the model's layers share them

        def ours(q_, k_, v_, deterministic=True):
            return varlen_attention(
                q_,
                k_,
                v_,
                cu_seqlens,
                seqlen,
                causal=causal,
                check_cu_seqlens=False,
                deterministic=deterministic,
                schedules=schedules,
            )

        def ours_atomic(q_, k_, v_):
            return ours(q_, k_, v_, deterministic=False)

        def sdpa_flash(q_, k_, v_):
            views = [
                x.view(batch, seqlen, num_heads, head_dim).transpose(1, 2) for x in (q_, k_, v_)
            ]  # (B, H, s, D)
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                out = F.scaled_dot_product_attention(*views, is_causal=causal)
            return out.transpose(1, 2).reshape(total, num_heads, head_dim)

        config = dict(
            layout="equal",
            seqlen=seqlen,
            batch=batch,
            heads=num_heads,
            head_dim=head_dim,
            causal=causal,
            dtype=str(dtype).removeprefix("torch."),
            dq="deterministic",
        )
        flops = attention_flops(lengths, num_heads, head_dim, causal)
        ours_ms = time_forward_backward(ours, (q, k, v), grad_out, device)
        base_ms = time_forward_backward(sdpa_flash, (q, k, v), grad_out, device)
        record(results, config, flops, ours_ms, base_ms, "sdpa-flash")
        if device == "cuda" and head_dim == 128:
            atomic_ms = time_forward_backward(ours_atomic, (q, k, v), grad_out, device)
            record(results, {**config, "dq": "atomic"}, flops, atomic_ms, base_ms, "sdpa-flash")


def mixed_lengths(token_budget: int, max_len: int, seed: int = 0) -> list[int]:
    """Lengths of an embedding batch: log-normal around ~max_len/8, clipped to [8, max_len]."""
    gen = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < token_budget:
        draw = math.exp(math.log(max_len / 8) + 0.8 * torch.randn(1, generator=gen).item())
        lengths.append(int(min(max(draw, 8), max_len, token_budget - sum(lengths))))
    return lengths


def bench_varlen_vs_padded(results, device, dtype, token_budget, max_len, head_dim) -> None:
    gen = torch.Generator().manual_seed(1)
    lengths = mixed_lengths(token_budget, max_len)
    batch, total, longest = len(lengths), sum(lengths), max(lengths)
    num_heads = HIDDEN // head_dim if device == "cuda" else 2
    cu_seqlens = cu_seqlens_of(lengths, device)
    positions = torch.arange(longest, device=device)
    lengths_t = torch.tensor(lengths, device=device)
    valid = positions[None, :] < lengths_t[:, None]  # (B, longest)
    key_mask = valid[:, None, None, :]  # (B, 1, 1, longest)
    for causal in (False, True):
        q, k, v, grad_out = random_inputs(total, num_heads, head_dim, dtype, device, gen)
        ours = packed_attention(cu_seqlens, longest, causal)

        def sdpa_padded(
            q_, k_, v_
        ):  # (B, longest, H, D) each, as a padded pipeline's projections give them
            padded = [x.transpose(1, 2) for x in (q_, k_, v_)]  # (B, H, longest, D) views
            if causal:
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    out = F.scaled_dot_product_attention(*padded, is_causal=True)
            else:
                out = F.scaled_dot_product_attention(*padded, attn_mask=key_mask)
            return out.transpose(1, 2)  # (B, longest, H, D)

        padded_inputs = []  # the same tokens, padded once outside the timings
        for x in (q, k, v, grad_out):
            buffer = x.detach().new_zeros(batch, longest, num_heads, head_dim)  # (B, longest, H, D)
            buffer[valid] = x.detach()
            padded_inputs.append(buffer.requires_grad_(x.requires_grad))

        config = dict(
            layout="varlen-vs-padded",
            batch=batch,
            tokens=total,
            max_len=longest,
            heads=num_heads,
            head_dim=head_dim,
            causal=causal,
            dtype=str(dtype).removeprefix("torch."),
        )
        flops = attention_flops(lengths, num_heads, head_dim, causal)
        ours_ms = time_forward_backward(ours, (q, k, v), grad_out, device)
        base_ms = time_forward_backward(
            sdpa_padded, tuple(padded_inputs[:3]), padded_inputs[3], device
        )
        del padded_inputs
        name = "sdpa-flash-padded" if causal else "sdpa-padded-key-mask"
        record(results, config, flops, ours_ms, base_ms, name)


def flash_varlen():
    """PyTorch's FlashAttention varlen function as ``fn(q, k, v, cu_seqlens, max_seqlen,
    causal)``, or None where this torch has none (it came in 2.9; its causal flag moved from
    ``is_causal`` to ``window_size`` later)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    takes_is_causal = "is_causal" in inspect.signature(varlen_attn).parameters

    def run(q, k, v, cu_seqlens, max_seqlen, causal):
        mask = (
            dict(is_causal=causal)
            if takes_is_causal
            else dict(window_size=(-1, 0 if causal else -1))
        )
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **mask)

    return run


def bench_short_texts(results, device, dtype, token_budget, head_dim) -> None:
    """Section 3: many short sequences in one packed batch, ours vs flash's varlen kernel."""
    baseline = flash_varlen() if device == "cuda" else None
    if baseline is None:
        print("short-text mix: no FlashAttention varlen baseline on this device/torch; skipped")
        return
    gen = torch.Generator().manual_seed(2)
    lengths = lengths_for_tokens(token_budget, median=28, max_tokens=512, seed=2)
    cu_seqlens = cu_seqlens_of(lengths, device)
    total, longest = sum(lengths), max(lengths)
    num_heads = HIDDEN // head_dim
    for causal in (False, True):
        q, k, v, grad_out = random_inputs(total, num_heads, head_dim, dtype, device, gen)
        ours = packed_attention(cu_seqlens, longest, causal)

        def flash(q_, k_, v_):
            return baseline(q_, k_, v_, cu_seqlens, longest, causal)

        config = dict(
            layout="short-texts",
            batch=len(lengths),
            tokens=total,
            mean_len=round(total / len(lengths), 1),
            max_len=longest,
            heads=num_heads,
            head_dim=head_dim,
            causal=causal,
            dtype=str(dtype).removeprefix("torch."),
        )
        flops = attention_flops(lengths, num_heads, head_dim, causal)
        ours_ms = time_forward_backward(ours, (q, k, v), grad_out, device)
        try:  # an API this torch spells differently, or a card its flash build lacks
            base_ms = time_forward_backward(flash, (q, k, v), grad_out, device)
        except (TypeError, RuntimeError) as error:
            results.note(f"short-text mix: flash varlen baseline failed, section skipped: {error}")
            return
        record(results, config, flops, ours_ms, base_ms, "flash-varlen")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    device = args.device
    results = Results("attention", device, args.out)
    if device == "cuda":
        # the short-text mix first: a cut run (gpu_check.sh's step limit) keeps it
        bench_short_texts(results, device, torch.bfloat16, 16384 if args.quick else 65536, 128)
        seqlens = [512, 2048, 16384] if args.quick else [512, 1024, 2048, 4096, 8192, 16384]
        bench_equal_lengths(results, device, torch.bfloat16, 16384, seqlens, [64, 128])
        bench_varlen_vs_padded(results, device, torch.bfloat16, 16384, 2048, 128)
    else:  # smoke run through the reference path
        bench_equal_lengths(results, device, torch.float32, 128, [32, 64], [16])
        bench_varlen_vs_padded(results, device, torch.float32, 128, 64, 16)
    results.save()


if __name__ == "__main__":
    main()
