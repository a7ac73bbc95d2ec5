"""Fused LM head + cross-entropy (``mntp_loss``) vs ``F.linear`` + ``F.cross_entropy``: time and
peak memory.

Forward + backward of the loss over N masked rows, with the LM head frozen (LoRA training: only the
hidden states get a gradient) and trainable. The baseline materialises the (N, V) logits in the
input dtype, the smallest footprint plain PyTorch gets. Peak memory: above the inputs, during one
forward+backward after a warm-up call, the gradients included for both. Each config records the
backward's logits-gradient block (row chunk x vocab chunk, ``grad_chunk_plan``): at V = 128k all
rows up to 16k share one block height, 32k rows run in row chunks. A baseline that runs out of
memory is recorded as missing. Target on an H100 at V = 128k: >= 3x less peak memory in <= 1.2x
the time.

    python benchmarks/bench_mntp_loss.py [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Results, default_dtype, measure_ms, parse_args, peak_memory_bytes  # noqa: E402

from llm2vec_fast.kernels import mntp_loss  # noqa: E402
from llm2vec_fast.kernels.mntp_loss import grad_chunk_plan  # noqa: E402

BASELINE = "F.linear+F.cross_entropy"


def baseline_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight), labels)


def configs(quick: bool, device: str) -> list[tuple[int, int, int]]:
    """(N, V, H): SmolLM2-135M's head (49,152 x 576) and Llama-3's (128,256 x 4096)."""
    if device != "cuda":
        return [(64, 1000, 64)]
    if quick:
        return [(8192, 49152, 576), (8192, 128256, 4096), (32768, 128256, 4096)]
    return [
        (4096, 49152, 576),
        (16384, 49152, 576),
        (65536, 49152, 576),
        (4096, 128256, 4096),
        (8192, 128256, 4096),
        (16384, 128256, 4096),
        (32768, 128256, 4096),
    ]


def measure(step, device: str, repeats: int) -> tuple[float | None, int | None]:
    """(milliseconds, peak bytes) of ``step()``; (None, None) when it runs out of memory."""
    try:
        return measure_ms(step, device=device, repeats=repeats), peak_memory_bytes(
            step, device=device
        )
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, None


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    device = args.device
    dtype = default_dtype(device)
    results = Results("mntp_loss", device, args.out)
    repeats = 3 if args.quick else 10
    for rows, vocab, hidden_size in configs(args.quick, device):
        torch.manual_seed(0)
        hidden = torch.randn(rows, hidden_size, device=device, dtype=dtype, requires_grad=True)
        for trainable in (False, True):
            weight = (torch.randn(vocab, hidden_size, device=device) / hidden_size**0.5).to(dtype)
            weight.requires_grad_(trainable)
            labels = torch.randint(0, vocab, (rows,), device=device)

            def step(loss_fn):
                # autograd.grad: the gradients are allocated inside each call (and counted in its
                # peak memory), not left in .grad from the call before
                inputs = (hidden, weight) if trainable else (hidden,)
                return lambda: torch.autograd.grad(loss_fn(hidden, weight, labels), inputs)

            row_chunk, vocab_chunk = grad_chunk_plan(rows, vocab)
            config = {
                "N": rows,
                "V": vocab,
                "H": hidden_size,
                "dtype": str(dtype).removeprefix("torch."),
                "weight": "trainable" if trainable else "frozen",
                "grad_block": f"{row_chunk}x{vocab_chunk}",
            }
            ours_ms, ours_peak = measure(step(mntp_loss), device, repeats)
            theirs_ms, theirs_peak = measure(step(baseline_loss), device, repeats)
            del weight
            if ours_ms is None:
                results.note(f"mntp_loss ran out of memory at {config}")
                continue
            matmuls = 3 if trainable else 2  # logits, grad hidden, grad weight
            flops = 2.0 * rows * vocab * hidden_size * matmuls
            results.add(
                config,
                "fwd+bwd ms",
                ours_ms,
                baseline_name=BASELINE,
                baseline=theirs_ms,
                higher_is_better=False,
                tflops=flops / ours_ms / 1e9,
                baseline_tflops=None if theirs_ms is None else flops / theirs_ms / 1e9,
            )
            if ours_peak is not None:
                results.add(
                    config,
                    "peak MiB",
                    ours_peak / 2**20,
                    baseline_name=BASELINE,
                    baseline=None if theirs_peak is None else theirs_peak / 2**20,
                    higher_is_better=False,
                )
    results.save()


if __name__ == "__main__":
    main()
