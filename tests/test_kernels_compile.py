"""Every Triton kernel compiles for an H100 (sm_90) with the launch settings it uses on a GPU,
specialized as Triton's JIT specializes it, within the card's shared memory and without register
spills at head dims <= 128; the record of the attention kernels' tuning space matches the
compiler.

The interpreter tests check what the kernels compute; this checks that the GPU compiler accepts
them (``tests/compile_kernels.py`` explains how, without a GPU). Each test runs the script in a
subprocess, because this test process has the interpreter switched on. The default suite
compiles every kernel once and a few entries of the tuning space; the ``slow`` tests
(``make test-slow``) compile one case per kernel option and the whole tuning space.
"""

from __future__ import annotations

import json
import os
import re
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


def run_script(*flags: str, script: Path = SCRIPT) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    return subprocess.run(
        [sys.executable, str(script), *flags],
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
    )


def compile_for_sm90(matrix_flag: str) -> list[str]:
    """Run the script with ``matrix_flag``; every launch compiles, fits and does not spill (at
    head dims <= 128), every kernel is among them. Returns the report's ``ok`` lines."""
    result = run_script(matrix_flag, "--arch", "90")
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    assert "0 failed" in report, report
    ok = [line for line in result.stdout.splitlines() if line.startswith("ok ")]
    compiled = {line.split()[2].split("[")[0] for line in ok}
    assert KERNELS <= compiled, f"kernels never compiled: {sorted(KERNELS - compiled)}"
    assert all(re.search(r"\d+ registers, spills \d+/\d+ B", line) for line in ok), ok
    return ok


def test_every_kernel_compiles_for_sm90_as_the_jit_specializes_it():
    ok = compile_for_sm90("--representative")
    forward = next(line for line in ok if "_attn_fwd_kernel" in line)
    aligned = forward.split(" D:")[1].split()[0].split(",")
    # 16-byte aligned pointers and strides divisible by 16 carry the JIT's "D"; the token count
    # of the workload (200) and the seed (never specialized) do not
    expected = {"Q", "K", "V", "Out", "Lse", "Items", "Segments", "stride_qt", "stride_kh"}
    assert expected <= set(aligned)
    assert "total_tokens" not in aligned and "seed" not in aligned


def test_a_sample_of_the_tuning_space_compiles_as_recorded():
    result = run_script("--space-sample", "--check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 differences" in result.stdout


@pytest.mark.slow
def test_every_kernel_option_compiles_for_sm90():
    compile_for_sm90("--quick")


@pytest.mark.slow
def test_the_whole_tuning_space_compiles_as_recorded():
    result = run_script("--space", "--check", "--jobs", "2")
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    assert "0 differences" in result.stdout


@pytest.mark.slow
def test_attention_sass_finds_the_key_block_loops(tmp_path):
    """``benchmarks/attention_sass.py`` (static SASS of the attention loops): each kernel's loops
    are found, and the forward's hold its two matmuls and, with dropout, Philox's multiplies."""
    script = SCRIPT.parent.parent / "benchmarks" / "attention_sass.py"
    result = run_script("--out", str(tmp_path), script=script)
    assert result.returncode == 0, result.stdout + result.stderr
    (saved,) = tmp_path.glob("*attention-sass.json")
    records = json.loads(saved.read_text())["records"]
    kernels = {record["config"]["kernel"] for record in records}
    assert kernels == {"_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"}
    forward = [r for r in records if r["config"]["kernel"] == "_attn_fwd_kernel"]
    assert len(forward) >= 2, forward  # the unmasked and the masked key blocks
    for loop in forward:
        assert loop["opcodes"].get("HGMMA", 0) >= 2, loop
        assert loop["opcodes"].get("IMAD.HI.U32", 0) > 0, loop
