"""Compile every Triton kernel for real GPUs on a machine without one.

The Triton interpreter (the CPU test suite) runs kernels as numpy: it accepts code that the GPU
compiler rejects (mixed-dtype ``tl.dot``, tile shapes below the MMA minimum, shared memory past
the card's limit) and it runs the launchers' interpreter block sizes, not the GPU ones. This
script closes that gap without a GPU. With ``TRITON_INTERPRET`` off, it calls the public kernel
functions forward and backward on CPU tensors with every Triton launch recorded instead of run,
so each launcher picks exactly the block sizes, warps and stages it would pick on a GPU. Each
distinct launch is then compiled by Triton down to a cubin for sm_80 (A100) and sm_90 (H100),
and the shared memory it needs is checked against the card's per-block limit.

    python tests/compile_kernels.py                   # the full matrix (dtypes, head dims, options)
    python tests/compile_kernels.py --quick           # one case per kernel and option (slow tests)
    python tests/compile_kernels.py --representative  # each kernel once (default test suite)

Exit status 1 if any launch fails to compile or does not fit.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit(
        "compile_kernels.py needs TRITON_INTERPRET unset: "
        "it compiles for GPUs instead of interpreting"
    )
os.environ["LLM2VEC_FAST_BACKEND"] = "triton"  # CPU tensors go to the Triton launchers

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction, mangle_type  # noqa: E402

from llm2vec_fast import kernels  # noqa: E402
from llm2vec_fast.kernels.attention import dropout_keep_mask  # noqa: E402

# Largest dynamic shared memory per block (opt-in), bytes: A100 163 KiB, H100 227 KiB.
SHARED_MEMORY_LIMIT = {80: 166_912, 90: 232_448}
_OPTION_KEYS = ("num_warps", "num_stages")


@dataclass(frozen=True)
class Launch:
    """One kernel launch as the GPU compiler sees it."""

    kernel: JITFunction
    signature: tuple[tuple[str, str], ...]  # (parameter, Triton type or "constexpr")
    constexprs: tuple[tuple[str, object], ...]
    options: tuple[tuple[str, int], ...]

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def describe(self) -> str:
        constants = ", ".join(f"{k}={v}" for k, v in self.constexprs)
        types = sorted(
            {
                t
                for _, t in self.signature
                if t.startswith("*") and t not in ("*i32", "*i64", "*u1", "*u8")
            }
        )
        options = ", ".join(f"{k}={v}" for k, v in self.options)
        return f"{self.name}[{'/'.join(types)}] {constants} {options}".strip()


def _launch_of(kernel: JITFunction, args: tuple, kwargs: dict) -> Launch:
    options = {key: kwargs.pop(key) for key in _OPTION_KEYS if key in kwargs}
    values = dict(zip(kernel.arg_names, args))
    values.update(kwargs)
    signature, constexprs = [], []
    for param in kernel.params:
        value = values.get(param.name, param.default)
        if param.is_constexpr or value is None:
            signature.append((param.name, "constexpr"))
            constexprs.append((param.name, value))
        else:
            signature.append(
                (param.name, mangle_type(value))
            )  # the type Triton's JIT gives this value
    return Launch(kernel, tuple(signature), tuple(constexprs), tuple(sorted(options.items())))


def record_launches(workload) -> list[Launch]:
    """Run ``workload()`` with every Triton launch recorded (in order, duplicates kept), none
    run."""
    launches: list[Launch] = []
    original_run = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(_launch_of(self, args, kwargs))

    JITFunction.run = record
    try:
        workload()
    finally:
        JITFunction.run = original_run
    return launches


def compile_launch(launch: Launch, arch: int) -> int:
    """Compile ``launch`` to a cubin for ``sm_{arch}``; returns the shared memory it needs
    (bytes)."""
    source = ASTSource(
        fn=launch.kernel, signature=dict(launch.signature), constexprs=dict(launch.constexprs)
    )
    compiled = triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options=dict(launch.options)
    )
    if not compiled.asm.get("cubin"):
        raise RuntimeError("no cubin produced")
    return int(compiled.metadata.shared)


# ---------------------------------------------------------------------------- workloads


def _randn(*shape: int, dtype: torch.dtype, grad: bool = True) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float32).to(dtype).requires_grad_(grad)


def _backward(*outputs: torch.Tensor) -> None:
    total = sum(o.float().sum() for o in outputs)
    total.backward()


def attention(
    dtype: torch.dtype,
    head_dim: int,
    causal: bool,
    dropout_p: float,
    deterministic: bool = True,
    window: int | None = None,
) -> None:
    cu_seqlens = torch.tensor([0, 5, 5, 70, 200], dtype=torch.int32)
    total = int(cu_seqlens[-1])
    q = _randn(total, 4, head_dim, dtype=dtype)
    k, v = _randn(total, 2, head_dim, dtype=dtype), _randn(total, 2, head_dim, dtype=dtype)
    seed = 2**40 + 7  # seeds are drawn from [0, 2**62): the kernels get an int64
    out = kernels.varlen_attention(
        q,
        k,
        v,
        cu_seqlens,
        130,
        causal=causal,
        window=window,
        dropout_p=dropout_p,
        dropout_seed=seed,
        deterministic=deterministic,
    )
    _backward(out)
    if dropout_p:
        dropout_keep_mask(4, total, dropout_p, seed, "cpu")


def pooling(dtype: torch.dtype, pooling_mode: str, normalize: bool) -> None:
    cu_seqlens = torch.tensor([0, 3, 3, 40], dtype=torch.int32)
    hidden = _randn(40, 576, dtype=dtype)
    pool_mask = torch.arange(40) % 3 != 0
    _backward(kernels.masked_pool(hidden, cu_seqlens, pooling_mode, pool_mask, normalize))


def contrastive(dtype: torch.dtype, symmetric: bool, hard_negatives: bool) -> None:
    queries = _randn(24, 576, dtype=dtype)
    docs = _randn(48 if hard_negatives else 24, 576, dtype=dtype)
    _backward(kernels.contrastive_loss(queries, docs, scale=20.0, symmetric=symmetric))


def mntp(dtype: torch.dtype, vocab: int, weight_grad: bool) -> None:
    hidden = _randn(20, 576, dtype=dtype)
    weight = _randn(vocab, 576, dtype=dtype, grad=weight_grad)
    labels = torch.randint(0, vocab, (20,))
    labels[::4] = -100
    _backward(kernels.mntp_loss(hidden, weight, labels))


def norm(dtype: torch.dtype, hidden_size: int, residual: bool) -> None:
    x = _randn(30, hidden_size, dtype=dtype)
    weight = _randn(hidden_size, dtype=dtype)
    _backward(
        *kernels.rms_norm(
            x, weight, 1e-5, _randn(30, hidden_size, dtype=dtype) if residual else None
        )
    )


def rope(dtype: torch.dtype, head_dim: int) -> None:
    q, k = _randn(30, 4, head_dim, dtype=dtype), _randn(30, 2, head_dim, dtype=dtype)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    _backward(*kernels.apply_rotary(q, k, torch.arange(30) % 17, inv_freq))


def mlp(dtype: torch.dtype, intermediate: int) -> None:
    _backward(kernels.swiglu(_randn(30, 2 * intermediate, dtype=dtype)))


DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def workloads(matrix: str) -> list[tuple[str, object]]:
    """(label, callable) pairs. ``representative`` launches every kernel once, each with its
    options on (causal attention with dropout, symmetric contrastive loss with hard negatives,
    ...); ``quick`` covers each kernel option once; ``full`` every combination."""
    cases: list[tuple[str, object]] = []

    def add(fn, **kw) -> None:
        label = (
            fn.__name__
            + "("
            + ", ".join(f"{k}={str(v).replace('torch.', '')}" for k, v in kw.items())
            + ")"
        )
        cases.append((label, lambda: fn(**kw)))

    if matrix == "representative":
        add(attention, dtype=torch.bfloat16, head_dim=64, causal=True, dropout_p=0.1)
        add(attention, dtype=torch.bfloat16, head_dim=128, causal=False, dropout_p=0.0, window=48)
        add(pooling, dtype=torch.bfloat16, pooling_mode="weighted_mean", normalize=True)
        add(contrastive, dtype=torch.bfloat16, symmetric=True, hard_negatives=True)
        add(mntp, dtype=torch.bfloat16, vocab=1000, weight_grad=True)
        add(norm, dtype=torch.bfloat16, hidden_size=576, residual=True)
        add(rope, dtype=torch.bfloat16, head_dim=128)
        add(mlp, dtype=torch.bfloat16, intermediate=1536)
        return cases
    if matrix == "quick":
        for head_dim in (64, 80, 96, 128, 256):
            add(attention, dtype=torch.bfloat16, head_dim=head_dim, causal=False, dropout_p=0.0)
        add(attention, dtype=torch.float16, head_dim=128, causal=True, dropout_p=0.1)
        add(attention, dtype=torch.float32, head_dim=64, causal=True, dropout_p=0.1)
        add(
            attention,
            dtype=torch.bfloat16,
            head_dim=128,
            causal=True,
            dropout_p=0.1,
            deterministic=False,
        )
        for pooling_mode in kernels.POOLING_MODES:
            add(
                pooling,
                dtype=torch.bfloat16,
                pooling_mode=pooling_mode,
                normalize=pooling_mode == "mean",
            )
        add(contrastive, dtype=torch.bfloat16, symmetric=True, hard_negatives=True)
        add(contrastive, dtype=torch.float32, symmetric=False, hard_negatives=False)
        add(mntp, dtype=torch.bfloat16, vocab=1000, weight_grad=True)
        add(mntp, dtype=torch.float32, vocab=1000, weight_grad=False)
        add(norm, dtype=torch.bfloat16, hidden_size=576, residual=True)
        add(norm, dtype=torch.float32, hidden_size=4096, residual=False)
        add(rope, dtype=torch.bfloat16, head_dim=128)
        add(mlp, dtype=torch.bfloat16, intermediate=1536)
        return cases
    for dtype in DTYPES:
        for head_dim in (64, 80, 96, 128, 256):
            for causal in (False, True):
                for dropout_p in (0.0, 0.1):
                    for deterministic in (True, False):
                        add(
                            attention,
                            dtype=dtype,
                            head_dim=head_dim,
                            causal=causal,
                            dropout_p=dropout_p,
                            deterministic=deterministic,
                        )
        for pooling_mode in kernels.POOLING_MODES:
            for normalize in (False, True):
                add(pooling, dtype=dtype, pooling_mode=pooling_mode, normalize=normalize)
        for symmetric in (False, True):
            for hard_negatives in (False, True):
                add(contrastive, dtype=dtype, symmetric=symmetric, hard_negatives=hard_negatives)
        for vocab in (1000, 49_152):
            for weight_grad in (False, True):
                add(mntp, dtype=dtype, vocab=vocab, weight_grad=weight_grad)
        for hidden_size in (576, 4096):
            for residual in (False, True):
                add(norm, dtype=dtype, hidden_size=hidden_size, residual=residual)
        for head_dim in (64, 80, 128, 256):
            add(rope, dtype=dtype, head_dim=head_dim)
        for intermediate in (1536, 14336):
            add(mlp, dtype=dtype, intermediate=intermediate)
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    matrix = parser.add_mutually_exclusive_group()
    matrix.add_argument(
        "--quick", action="store_true", help="one case per kernel option (the slow tests)"
    )
    matrix.add_argument(
        "--representative",
        action="store_true",
        help="every kernel once, with its options on (the default test suite)",
    )
    parser.add_argument(
        "--arch",
        type=int,
        action="append",
        choices=sorted(SHARED_MEMORY_LIMIT),
        help="compute capability to compile for (repeatable; default: 80 and 90)",
    )
    args = parser.parse_args(argv)
    archs = args.arch or sorted(SHARED_MEMORY_LIMIT)

    unique: dict[Launch, str] = {}
    chosen = "quick" if args.quick else "representative" if args.representative else "full"
    for label, workload in workloads(chosen):
        for launch in record_launches(workload):
            unique.setdefault(launch, label)
    print(
        f"{len(unique)} distinct launches; compiling for sm_{', sm_'.join(map(str, archs))}",
        flush=True,
    )

    failures = 0
    started = time.perf_counter()
    for launch, label in unique.items():
        for arch in archs:
            try:
                shared = compile_launch(launch, arch)
            except Exception as error:  # noqa: BLE001 - every compiler error is reported, then counted
                failures += 1
                first_line = (
                    str(error).strip().splitlines()[0]
                    if str(error).strip()
                    else type(error).__name__
                )
                print(
                    f"FAIL sm_{arch} {launch.describe()}  (from {label}): {first_line}", flush=True
                )
                continue
            if shared > SHARED_MEMORY_LIMIT[arch]:
                failures += 1
                print(
                    f"FAIL sm_{arch} {launch.describe()}  (from {label}): "
                    f"needs {shared} B of shared memory, "
                    f"the card allows {SHARED_MEMORY_LIMIT[arch]}",
                    flush=True,
                )
            else:
                print(f"ok   sm_{arch} {launch.describe()}  shared {shared} B", flush=True)
    elapsed = time.perf_counter() - started
    print(f"{len(unique) * len(archs) - failures} compiled, {failures} failed in {elapsed:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
