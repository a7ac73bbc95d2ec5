"""Every Triton kernel compiles for an H100 (sm_90) with the launch settings it uses on a GPU.

The interpreter tests check what the kernels compute; this checks that the GPU compiler accepts
them (``tests/compile_kernels.py`` explains how, without a GPU). Each test runs the script in a
subprocess, because this test process has the interpreter switched on. The default suite
compiles every kernel once; the ``slow`` test (``make test-slow``) compiles one case per kernel
option.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("compile_kernels.py")
KERNELS = {
    "_attn_fwd_kernel",
    "_bwd_delta_kernel",
    "_attn_bwd_dkdv_kernel",
    "_attn_bwd_dq_kernel",
    "_dropout_mask_kernel",
    "_pool_forward_kernel",
    "_pool_backward_kernel",
    "_inverse_norm_kernel",
    "_scale_rows_kernel",
    "_normalize_backward_kernel",
    "_forward_kernel",
    "_score_grad_kernel",
    "_row_grad_kernel",
    "_col_grad_kernel",
    "_mntp_forward_kernel",
    "_mntp_logits_grad_kernel",
    "_rms_norm_forward_kernel",
    "_rms_norm_backward_kernel",
    "_rotary_kernel",
    "_swiglu_forward_kernel",
    "_swiglu_backward_kernel",
}


def compile_for_sm90(matrix_flag: str) -> None:
    """Run the script with ``matrix_flag``; every launch compiles and every kernel is among them."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), matrix_flag, "--arch", "90"],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    assert "0 failed" in report, report
    compiled = {
        line.split()[2].split("[")[0]
        for line in result.stdout.splitlines()
        if line.startswith("ok ")
    }
    assert KERNELS <= compiled, f"kernels never compiled: {sorted(KERNELS - compiled)}"


def test_every_kernel_compiles_for_sm90():
    compile_for_sm90("--representative")


@pytest.mark.slow
def test_every_kernel_option_compiles_for_sm90():
    compile_for_sm90("--quick")
