"""Shared checks of the kernel tests (attention, pooling, contrastive, rms_norm, rope, swiglu,
mntp_loss).

Tolerance policy (DESIGN.md): the kernel's max error against a high-precision oracle must be at
most ``factor`` times the error of the same op computed by PyTorch in the input dtype, plus a tiny
atol (``ulp_atol`` and ``fp32_ulps_atol`` give the usual ones). ``nan_allocations`` makes every
``torch.empty``/``torch.empty_like`` buffer start as NaN so an element a kernel forgets to write
fails the check; ``fresh_tensor_shapes`` records the shapes of all newly allocated tensors (views
and in-place results excluded), to prove what was never built.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

FORWARD_FACTOR = 2.0
GRADIENT_FACTOR = 3.0
# One unit in the last place of each dtype, relative to 1.
ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def max_error(value: torch.Tensor, oracle: torch.Tensor) -> float:
    if value.numel() == 0:
        return 0.0
    return (value.double() - oracle.double()).abs().max().item()


def ulp_atol(oracle: torch.Tensor, dtype: torch.dtype) -> float:
    """One ULP of ``dtype`` at the oracle's scale: the rounding by which a kernel may differ from
    PyTorch where PyTorch's own error happens to be 0 on a small case."""
    scale = oracle.abs().max().item() if oracle.numel() else 0.0
    return ULP[dtype] * scale


def fp32_ulps_atol(oracle: torch.Tensor) -> float:
    """A few fp32 ulps of the oracle's scale: for kernels that compute in fp32, like the PyTorch
    reference, but sum in another order, where the reference can be exact by luck. Relative to
    the oracle only (no floor), so a kernel that returns zeros for small values still fails."""
    scale = oracle.abs().max().item() if oracle.numel() else 0.0
    return 8 * torch.finfo(torch.float32).eps * scale


def assert_close_to_oracle(
    name: str,
    kernel: torch.Tensor,
    baseline: torch.Tensor,
    oracle: torch.Tensor,
    *,
    factor: float,
    atol: float,
) -> None:
    """Kernel error vs oracle <= factor x (PyTorch-in-input-dtype error vs oracle) + atol."""
    assert kernel.shape == oracle.shape, (
        f"{name}: shape {tuple(kernel.shape)} != {tuple(oracle.shape)}"
    )
    assert kernel.dtype == baseline.dtype, (
        f"{name}: dtype {kernel.dtype} != reference dtype {baseline.dtype}"
    )
    assert bool(torch.isfinite(kernel).all()), (
        f"{name}: non-finite values (an element left unwritten?)"
    )
    error = max_error(kernel, oracle)
    baseline_error = max_error(baseline, oracle)
    bound = factor * baseline_error + atol
    assert error <= bound, (
        f"{name}: kernel error {error:.3e} > {factor} x PyTorch error {baseline_error:.3e} "
        f"+ atol {atol:.1e}"
    )


@contextlib.contextmanager
def nan_allocations() -> Iterator[None]:
    """While active, floating buffers from ``torch.empty``/``torch.empty_like`` start as NaN."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_floating_point():
            tensor.fill_(float("nan"))
        return tensor

    torch.empty = lambda *args, **kwargs: poisoned(real_empty(*args, **kwargs))
    torch.empty_like = lambda *args, **kwargs: poisoned(real_empty_like(*args, **kwargs))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like


class fresh_tensor_shapes(TorchDispatchMode):
    """Records the shape of every tensor an ATen op returns that is not a view or an in-place
    result."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        aliasing = any(ret.alias_info is not None for ret in func._schema.returns)
        if not aliasing:
            for tensor in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(tensor, torch.Tensor):
                    self.shapes.append(tuple(tensor.shape))
        return out
