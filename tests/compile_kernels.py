"""Compile every Triton kernel for real GPUs on a machine without one, as the JIT compiles it.

The Triton interpreter (the CPU test suite) runs kernels as numpy: it accepts code that the GPU
compiler rejects (mixed-dtype ``tl.dot``, tile shapes below the MMA minimum, shared memory past the
card's limit) and it runs the launchers' interpreter block sizes, not the GPU ones. This script
closes that gap without a GPU. With ``TRITON_INTERPRET`` off, it calls the public kernel functions
forward and backward on CPU tensors with every Triton launch recorded instead of run, so each
launcher picks exactly the block sizes, warps and stages it would pick on a GPU (its heuristics, or
the committed tables of ``llm2vec_fast/kernels/tuned/``). Each distinct launch is then compiled down
to a cubin for sm_80 (A100) and sm_90 (H100) with the specialization Triton's JIT gives it on a GPU:
a pointer 16-byte aligned and an integer divisible by 16 carry ``tt.divisibility=16`` (the JIT's "D"
specialization), without which the compiler drops the pipelined, vectorized loads and checks a
smaller kernel than the one that runs. The workloads' tensors are what the model passes: whole
allocations (aligned) with strides that are multiples of 16 where head dims are.

Reported per launch: shared memory against the card's per-block limit, registers and spill
bytes (ptxas' own report: the compile runs in a private, empty Triton cache, because a cache hit
runs no ptxas). A launch fails when it does not compile, needs more shared memory than the card
has, or spills registers at a head dim <= 128 (or in a kernel without a head dim).

``--space`` compiles the attention kernels' tuning space instead (``kernels/tuning.py``: every
candidate config at every head dim, dtype and dropout setting, causal) for sm_90; the record it
writes (``--write``) or compares with (``--check``) is
``llm2vec_fast/kernels/tuned/space/sm_90.json``, from which ``tuning.surviving_configs`` drops what
does not fit or spills.

    python tests/compile_kernels.py                   # the full matrix (dtypes, head dims, options)
    python tests/compile_kernels.py --quick           # one case per kernel and option (slow tests)
    python tests/compile_kernels.py --representative  # each kernel once (default test suite)
    python tests/compile_kernels.py --space --write   # record what the tuning space adds (--all:
                                                      # every entry anew, an hour of one core)
    python tests/compile_kernels.py --space --check   # compare with the record (slow tests)
    python tests/compile_kernels.py --space-sample --check   # a few entries (default test suite)

``--jobs N`` compiles on N processes. Exit status 1 if any launch fails (or differs from the
record with ``--check``).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit(
        "compile_kernels.py needs TRITON_INTERPRET unset: "
        "it compiles for GPUs instead of interpreting"
    )
os.environ["LLM2VEC_FAST_BACKEND"] = "triton"  # CPU tensors go to the Triton launchers
# ptxas reports registers and spills only when it runs: a private cache that starts empty.
_CACHE = tempfile.mkdtemp(prefix="compile-kernels-triton-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ["TRITON_CACHE_DIR"] = _CACHE

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from llm2vec_fast import kernels  # noqa: E402
from llm2vec_fast.kernels import attention as attention_kernels  # noqa: E402
from llm2vec_fast.kernels import tuning  # noqa: E402
from llm2vec_fast.kernels.attention import dropout_keep_mask  # noqa: E402

# Largest dynamic shared memory per block (opt-in), bytes: A100 163 KiB, H100 227 KiB.
SHARED_MEMORY_LIMIT = {80: 166_912, 90: 232_448}
SPILL_FREE_HEAD_DIM = 128  # launches up to this head dim (or without one) must not spill
SPACE_ARCH = 90
_OPTION_KEYS = ("num_warps", "num_stages")
_ATTENTION_KERNELS = {
    "_attn_fwd_kernel": "attn_fwd",
    "_attn_bwd_dkdv_kernel": "attn_bwd_dkdv",
    "_attn_bwd_dq_kernel": "attn_bwd_dq",
}


@dataclass(frozen=True)
class Launch:
    """One kernel launch as the GPU compiler sees it."""

    kernel: JITFunction
    signature: tuple[tuple[str, str], ...]  # (parameter, Triton type or "constexpr")
    constexprs: tuple[tuple[str, object], ...]
    attrs: tuple[tuple[int, str], ...]  # (parameter index, the JIT's specialization, e.g. "D")
    options: tuple[tuple[str, int], ...]

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def constexpr(self, name: str, default: object = None) -> object:
        return dict(self.constexprs).get(name, default)

    @property
    def tuning_kernel(self) -> str | None:
        """The attention kernel's name in ``tuning.KERNELS`` (None for other kernels)."""
        name = _ATTENTION_KERNELS.get(self.name)
        if name == "attn_bwd_dkdv" and self.constexpr("ATOMIC_DQ"):
            return "attn_bwd_dkdv_atomic"
        return name

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
        names = [name for name, _ in self.signature]
        aligned = ",".join(names[index] for index, spec in self.attrs if "D" in spec)
        return f"{self.name}[{'/'.join(types)}] {constants} {options} D:{aligned or '-'}"


def jit_specialization(param, value: object) -> tuple[str, str | None]:
    """(Triton type, specialization) of ``value`` as the JIT's binder computes them for a CUDA
    launch (``runtime/jit.py: create_function_from_signature``): "D" marks a 16-byte aligned
    pointer or an integer divisible by 16; ``do_not_specialize`` parameters get none."""
    kind, spec = native_specialize_impl(
        CUDABackend,
        value,
        param.is_const,
        not param.do_not_specialize,
        not param.do_not_specialize_on_alignment,
    )[:2]
    return kind, spec


def _launch_of(kernel: JITFunction, args: tuple, kwargs: dict) -> Launch:
    options = {key: kwargs.pop(key) for key in _OPTION_KEYS if key in kwargs}
    values = dict(zip(kernel.arg_names, args))
    values.update(kwargs)
    signature, constexprs, attrs = [], [], []
    for index, param in enumerate(kernel.params):
        value = values.get(param.name, param.default)
        if param.is_constexpr or value is None:
            signature.append((param.name, "constexpr"))
            constexprs.append((param.name, value))
            continue
        kind, spec = jit_specialization(param, value)
        signature.append((param.name, kind))
        if spec:
            attrs.append((index, spec))
    return Launch(
        kernel,
        tuple(signature),
        tuple(constexprs),
        tuple(attrs),
        tuple(sorted(options.items())),
    )


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


@dataclass(frozen=True)
class Compiled:
    """What a cubin needs per block and per thread."""

    shared: int  # bytes of shared memory per block
    registers: int  # per thread
    spill_stores: int  # bytes per thread
    spill_loads: int

    @property
    def spills(self) -> bool:
        return bool(self.spill_stores or self.spill_loads)


def _ptxas_numbers(log: str, name: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) of entry ``name`` in a ptxas -v log."""
    section = log.split(f"Compiling entry function '{name}'", 1)
    registers = re.search(r"Used (\d+) registers", section[-1])
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", section[-1])
    if len(section) != 2 or registers is None or spills is None:
        raise RuntimeError(f"no ptxas report for {name} (a Triton cache hit?): {log[-500:]!r}")
    return int(registers[1]), int(spills[1]), int(spills[2])


def compile_cubin(launch: Launch, arch: int) -> tuple[triton.compiler.CompiledKernel, str]:
    """Compile ``launch`` to a cubin for ``sm_{arch}`` as the JIT would: the compiled kernel
    (its cubin in ``.asm["cubin"]``) and ptxas' -v report."""
    source = ASTSource(
        fn=launch.kernel,
        signature=dict(launch.signature),
        constexprs=dict(launch.constexprs),
        attrs={(index,): CUDABackend.parse_attr(spec) for index, spec in launch.attrs},
    )
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True  # make_cubin prints ptxas' -v report
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(
            source, target=GPUTarget("cuda", arch, 32), options=dict(launch.options)
        )
    if not compiled.asm.get("cubin"):
        raise RuntimeError("no cubin produced")
    return compiled, log.getvalue()


def compile_launch(launch: Launch, arch: int) -> Compiled:
    """Compile ``launch`` for ``sm_{arch}``; what it needs."""
    compiled, log = compile_cubin(launch, arch)
    registers, stores, loads = _ptxas_numbers(log, compiled.metadata.name)
    return Compiled(int(compiled.metadata.shared), registers, stores, loads)


_JOBS: list[tuple[Launch, int]] = []  # what the worker processes compile (inherited by fork)


def _compile_job(index: int) -> Compiled | str:
    launch, arch = _JOBS[index]
    try:
        return compile_launch(launch, arch)
    except Exception as error:  # noqa: BLE001 - every compiler error is reported, then counted
        text = str(error).strip()
        return text.splitlines()[0] if text else type(error).__name__


def compile_all(jobs: list[tuple[Launch, int]], processes: int):
    """Yield (launch, arch, Compiled or the first line of the error) in order."""
    _JOBS[:] = jobs
    if processes <= 1:
        results = map(_compile_job, range(len(jobs)))
        yield from ((*job, result) for job, result in zip(jobs, results))
        return
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        results = pool.imap(_compile_job, range(len(jobs)))
        yield from ((*job, result) for job, result in zip(jobs, results))


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


def tuned_table_workloads() -> list[tuple[str, object]]:
    """One attention workload per entry of every committed card table, run with the entry's
    config: the configs a launcher picks on that card."""
    cases: list[tuple[str, object]] = []
    for path in sorted(tuning.TUNED_DIR.glob("*.json")):
        for key, config in tuning.load_table(path).items():

            def run(key=key, config=config) -> None:
                with tuning.forced({key.kernel: config}):
                    attention(
                        dtype=tuning.DTYPES[key.dtype],
                        head_dim=key.head_dim,
                        causal="causal" in key.mask,
                        dropout_p=0.1 if key.dropout else 0.0,
                        deterministic=key.kernel != "attn_bwd_dkdv_atomic",
                        window=48 if "window" in key.mask else None,
                    )

            cases.append((f"{path.name}: {key}", run))
    return cases


# ---------------------------------------------------------------------------- tuning space

# The record holds one twin per padded head dim (BLOCK_D 64, 128, 256), in bf16, for the others
# (tuning.space_twin): every head dim and dtype would take hours of a shared 2-core CPU.
SPACE_HEAD_DIMS = tuning.SPACE_HEAD_DIMS
SPACE_DTYPES = tuple(tuning.DTYPES[name] for name in tuning.SPACE_DTYPES)
SPACE_SAMPLE = dict(dtype="bfloat16", head_dim=128, dropout=True)  # the default suite's entries


def space_launches(sample: bool) -> list[tuple[dict, Launch]]:
    """(entry, launch) for each candidate config of each attention kernel at each head dim,
    dtype and dropout setting, causal; ``entry`` names it as the record does. ``sample``: one
    config per kernel at SPACE_SAMPLE, a different one for each kernel, and one with TMA."""
    cases: list[tuple[dict, Launch]] = []
    for dtype in SPACE_DTYPES:
        for head_dim in SPACE_HEAD_DIMS:
            for dropout in (False, True):
                where = dict(dtype=tuning.dtype_name(dtype), head_dim=head_dim, dropout=dropout)
                if sample and where != SPACE_SAMPLE:
                    continue
                kernels_seen: set[str] = set()
                for deterministic in (True, False):
                    workload = functools.partial(
                        attention,
                        dtype,
                        head_dim,
                        causal=True,
                        dropout_p=0.1 if dropout else 0.0,
                        deterministic=deterministic,
                    )
                    for launch in record_launches(workload):
                        kernel = launch.tuning_kernel
                        if kernel is None or kernel in kernels_seen:
                            continue
                        kernels_seen.add(kernel)
                        space = tuning.config_space(kernel, dtype)
                        if sample:  # and the first TMA config (the forward's)
                            first_tma = [config for config in space if config.kv_tma][:1]
                            space = (*space[len(kernels_seen) % len(space) :][:1], *first_tma)
                        for config in space:
                            entry = dict(kernel=kernel, **where, config=config.to_json())
                            cases.append((entry, launch_with_config(workload, kernel, config)))
    return cases


def launch_with_config(workload, kernel: str, config: tuning.Config) -> Launch:
    """The launch of ``kernel`` (a ``tuning.KERNELS`` name) in ``workload`` with ``config``
    forced, as its launcher makes it (TMA descriptors included)."""
    with tuning.forced({kernel: config}):
        return next(
            launch for launch in record_launches(workload) if launch.tuning_kernel == kernel
        )


def kernels_fingerprint() -> str:
    """Changes whenever the source of a Triton function of kernels/attention.py changes (not when
    lines move: Triton's own cache key counts line numbers)."""
    sources = sorted(
        (name, value.src)
        for name, value in vars(attention_kernels).items()
        if isinstance(value, JITFunction)
    )
    return hashlib.sha256(json.dumps(sources).encode()).hexdigest()[:32]


def _entry_id(entry: dict) -> tuple:
    return tuple(
        json.dumps(entry[k], sort_keys=True)
        for k in ("kernel", "head_dim", "dtype", "dropout", "config")
    )


def check_space_record(record: dict, compiled: list[dict], complete: bool) -> list[str]:
    """Differences between the committed record and what compiled now."""
    problems = []
    if record.get("kernels_fingerprint") != kernels_fingerprint():
        problems.append(
            "the attention kernels changed since the record was written: run "
            "`python tests/compile_kernels.py --space --write --jobs 2` (every entry anew: about"
            " an hour of one core)"
        )
    if record.get("triton") != triton.__version__:
        problems.append(
            f"the record is of Triton {record.get('triton')}, this is {triton.__version__}"
        )
    recorded = {_entry_id(e): e for e in record.get("entries", [])}
    for entry in compiled:
        old = recorded.get(_entry_id(entry))
        if old is None:
            problems.append(f"not in the record: {entry}")
        elif old != entry:
            problems.append(f"recorded {old}, compiled {entry}")
    if complete and len(recorded) != len(compiled):
        problems.append(f"the record has {len(recorded)} entries, the space {len(compiled)}")
    return problems


def run_space(args, archs: list[int]) -> int:
    if archs != [SPACE_ARCH]:
        print(f"--space compiles for sm_{SPACE_ARCH} only", file=sys.stderr)
        return 2
    cases = space_launches(sample=args.space_sample)
    path = tuning.space_path(SPACE_ARCH)
    kept = {}
    if args.write and not args.all and path.is_file():
        record = json.loads(path.read_text())
        if not check_space_record(record, [], complete=False):  # same kernels, same Triton
            kept = {_entry_id(e): e for e in record["entries"]}
    entries = [kept[_entry_id(entry)] for entry, _ in cases if _entry_id(entry) in kept]
    cases = [(entry, launch) for entry, launch in cases if _entry_id(entry) not in kept]
    print(
        f"{len(cases)} tuning-space configs to compile for sm_{SPACE_ARCH}"
        f" ({len(entries)} kept from the record)",
        flush=True,
    )
    limit = SHARED_MEMORY_LIMIT[SPACE_ARCH]
    started = time.perf_counter()
    jobs = [(launch, SPACE_ARCH) for _, launch in cases]
    for (entry, _), (launch, arch, result) in zip(cases, compile_all(jobs, args.jobs)):
        if isinstance(result, str):
            entry = dict(entry, fits=False, error=result)
            print(f"FAIL sm_{arch} {launch.describe()}: {result}", flush=True)
        else:
            entry = dict(
                entry,
                fits=result.shared <= limit,
                shared=result.shared,
                registers=result.registers,
                spill_stores=result.spill_stores,
                spill_loads=result.spill_loads,
            )
            verdict = "ok  " if entry["fits"] and not result.spills else "drop"
            print(f"{verdict} sm_{arch} {launch.describe()}  {describe(result, arch)}", flush=True)
        entries.append(entry)
    print(f"{len(cases)} compiled in {time.perf_counter() - started:.0f} s")
    if args.write:
        entries.sort(key=_entry_id)
        record = dict(
            format=tuning.SPACE_FORMAT,
            arch=SPACE_ARCH,
            triton=triton.__version__,
            shared_memory_limit=limit,
            kernels_fingerprint=kernels_fingerprint(),
            entries=entries,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {path}")
    if args.check:
        problems = check_space_record(
            json.loads(path.read_text()), entries, complete=not args.space_sample
        )
        for problem in problems:
            print(f"MISMATCH {problem}")
        print(f"{len(problems)} differences from {path}")
        return 1 if problems else 0
    return 0


def describe(result: Compiled, arch: int) -> str:
    return (
        f"shared {result.shared} B of {SHARED_MEMORY_LIMIT[arch]}, "
        f"{result.registers} registers, spills {result.spill_stores}/{result.spill_loads} B"
    )


def launch_problem(launch: Launch, result: Compiled, arch: int) -> str | None:
    """Why a launch a launcher picks is not acceptable (None when it is)."""
    if result.shared > SHARED_MEMORY_LIMIT[arch]:
        return (
            f"needs {result.shared} B of shared memory, the card allows {SHARED_MEMORY_LIMIT[arch]}"
        )
    head_dim = launch.constexpr("HEAD_DIM")
    if result.spills and (head_dim is None or head_dim <= SPILL_FREE_HEAD_DIM):
        return f"spills registers ({result.spill_stores} B stored, {result.spill_loads} B loaded)"
    return None


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
    matrix.add_argument(
        "--space", action="store_true", help="the attention kernels' whole tuning space"
    )
    matrix.add_argument(
        "--space-sample", action="store_true", help="a few entries of the tuning space"
    )
    parser.add_argument(
        "--write",
        action="store_true",
        help="--space: write the record (compiling only what an up-to-date record lacks)",
    )
    parser.add_argument("--all", action="store_true", help="--write: compile every entry anew")
    parser.add_argument("--check", action="store_true", help="compare with the record")
    parser.add_argument("--jobs", type=int, default=1, help="compiler processes (default 1)")
    parser.add_argument(
        "--arch",
        type=int,
        action="append",
        choices=sorted(SHARED_MEMORY_LIMIT),
        help="compute capability to compile for (repeatable; default: 80 and 90)",
    )
    args = parser.parse_args(argv)
    if args.space or args.space_sample:
        if args.write and args.space_sample:
            parser.error("--write records the whole space: use --space")
        return run_space(args, args.arch or [SPACE_ARCH])
    if args.write or args.check:
        parser.error("--write and --check go with --space or --space-sample")
    archs = args.arch or sorted(SHARED_MEMORY_LIMIT)

    unique: dict[Launch, str] = {}
    chosen = "quick" if args.quick else "representative" if args.representative else "full"
    for label, workload in workloads(chosen) + tuned_table_workloads():
        for launch in record_launches(workload):
            unique.setdefault(launch, label)
    print(
        f"{len(unique)} distinct launches; compiling for sm_{', sm_'.join(map(str, archs))}",
        flush=True,
    )

    failures = spill_bytes = 0
    started = time.perf_counter()
    jobs = [(launch, arch) for launch in unique for arch in archs]
    for launch, arch, result in compile_all(jobs, args.jobs):
        label = unique[launch]
        problem = result if isinstance(result, str) else launch_problem(launch, result, arch)
        if not isinstance(result, str) and arch == SPACE_ARCH and launch.tuning_kernel:
            spill_bytes += result.spill_stores
        if problem:
            failures += 1
            print(f"FAIL sm_{arch} {launch.describe()}  (from {label}): {problem}", flush=True)
        else:
            print(f"ok   sm_{arch} {launch.describe()}  {describe(result, arch)}", flush=True)
    elapsed = time.perf_counter() - started
    print(f"attention spill stores at sm_{SPACE_ARCH}, all launches: {spill_bytes} B")
    print(f"{len(jobs) - failures} compiled, {failures} failed in {elapsed:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
