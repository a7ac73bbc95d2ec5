"""Memory bandwidth (GB/s) of the fused rms_norm, rotary and swiglu kernels vs their PyTorch
references.

Each op is timed forward and backward (the backward replays ``torch.autograd.grad`` on one graph).
GB/s counts the bytes an ideal kernel must move: every input read once, every output written once.

    python benchmarks/bench_fusions.py [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Results, default_dtype, measure_ms, parse_args  # noqa: E402

from llm2vec_fast.kernels import apply_rotary, reference, rms_norm, swiglu  # noqa: E402


def bench_pair(
    results: Results,
    config: dict,
    device: str,
    repeats: int,
    ours: Callable[..., tuple[torch.Tensor, ...]],
    theirs: Callable[..., tuple[torch.Tensor, ...]],
    make_inputs: Callable[[], list[torch.Tensor]],
    forward_bytes: int,
    backward_bytes: int,
) -> None:
    """Forward and backward GB/s of ``ours`` beside ``theirs`` on the same fresh random inputs."""
    inputs = make_inputs()
    measured = {}
    for name, fn in (("ours", ours), ("reference", theirs)):
        forward_ms = measure_ms(lambda: fn(*inputs), device=device, repeats=repeats)
        outputs = [out for out in fn(*inputs) if out.requires_grad]
        grads = [torch.randn_like(out) for out in outputs]
        leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        backward_ms = measure_ms(
            lambda: torch.autograd.grad(outputs, leaves, grads, retain_graph=True),
            device=device,
            repeats=repeats,
        )
        measured[name] = (forward_ms, backward_ms)
    for index, (pass_name, nbytes) in enumerate((("fwd", forward_bytes), ("bwd", backward_bytes))):
        ours_gbs = nbytes / measured["ours"][index] / 1e6
        theirs_gbs = nbytes / measured["reference"][index] / 1e6
        results.add(
            {**config, "pass": pass_name},
            "GB/s",
            ours_gbs,
            baseline_name="PyTorch reference",
            baseline=theirs_gbs,
            ours_ms=measured["ours"][index],
            baseline_ms=measured["reference"][index],
        )


def bench_rms_norm(results, device, dtype, tokens, hidden, repeats):
    size = torch.finfo(dtype).bits // 8

    def make_inputs():
        return [
            torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True),
            (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype).requires_grad_(True),
            1e-6,
            torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True),
        ]

    elements = tokens * hidden
    bench_pair(
        results,
        {"op": "rms_norm+residual", "T": tokens, "H": hidden},
        device,
        repeats,
        rms_norm,
        reference.rms_norm,
        make_inputs,
        forward_bytes=4 * elements * size,  # read x, residual; write normed, summed
        backward_bytes=4 * elements * size,  # read summed, grad normed, grad summed; write grad x
    )


def bench_rotary(results, device, dtype, tokens, q_heads, kv_heads, head_dim, repeats):
    size = torch.finfo(dtype).bits // 8
    inv_freq = 1.0 / (
        10000 ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    )
    position_ids = (torch.arange(tokens, device=device) % 512).long()

    def make_inputs():
        return [
            torch.randn(tokens, q_heads, head_dim, device=device, dtype=dtype, requires_grad=True),
            torch.randn(tokens, kv_heads, head_dim, device=device, dtype=dtype, requires_grad=True),
            position_ids,
            inv_freq,
        ]

    elements = tokens * (q_heads + kv_heads) * head_dim
    bench_pair(
        results,
        {"op": "rotary", "T": tokens, "Hq": q_heads, "Hkv": kv_heads, "D": head_dim},
        device,
        repeats,
        apply_rotary,
        reference.apply_rotary,
        make_inputs,
        forward_bytes=2 * elements * size,  # read q, k; write q, k
        backward_bytes=2 * elements * size,
    )


def bench_swiglu(results, device, dtype, tokens, intermediate, repeats):
    size = torch.finfo(dtype).bits // 8

    def make_inputs():
        return [
            torch.randn(tokens, 2 * intermediate, device=device, dtype=dtype, requires_grad=True)
        ]

    elements = tokens * intermediate

    def as_tuple(fn):
        return lambda gate_up: (fn(gate_up),)

    bench_pair(
        results,
        {"op": "swiglu", "T": tokens, "I": intermediate},
        device,
        repeats,
        as_tuple(swiglu),
        as_tuple(reference.swiglu),
        make_inputs,
        forward_bytes=3 * elements * size,  # read gate, up; write out
        backward_bytes=5 * elements * size,  # read gate, up, grad out; write grad gate, grad up
    )


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    device = args.device
    on_gpu = device == "cuda"
    dtype = default_dtype(device)
    tokens = (4096 if args.quick else 16384) if on_gpu else 64
    repeats = 3 if args.quick or not on_gpu else 10
    results = Results("fusions", device, args.out)
    for hidden in (576, 4096) if on_gpu else (80,):
        bench_rms_norm(results, device, dtype, tokens, hidden, repeats)
    # SmolLM2-135M (9 q heads, 3 kv heads, D 64) and Llama-3-8B (32, 8, 128)
    for q_heads, kv_heads, head_dim in ((9, 3, 64), (32, 8, 128)) if on_gpu else ((3, 1, 64),):
        bench_rotary(results, device, dtype, tokens, q_heads, kv_heads, head_dim, repeats)
    for intermediate in (1536, 14336) if on_gpu else (96,):
        bench_swiglu(results, device, dtype, tokens, intermediate, repeats)
    results.save()


if __name__ == "__main__":
    main()
