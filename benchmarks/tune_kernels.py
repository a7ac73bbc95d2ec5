"""Measure the attention kernels' tuning space on this card and write its table.

For each key (kernel, head dim, dtype, mask, dropout, length bucket; ``kernels/tuning.py``), most
valuable first (bf16 before fp16, head dim 128 before 64 and the rest, the encode path, a
bidirectional forward without dropout, before the training paths), every config that survived the
CPU compile check (``tuning.surviving_configs``) runs through the launchers on a varlen batch of
that bucket's lengths, and the fastest becomes the key's entry. Each candidate's output (forward)
or gradients (backward) must agree with the heuristic config's: a sanity check that throws out a
config the compiler got wrong, not an accuracy test (the gpu tests are that). The backward
kernels are timed as the whole backward pass with the other kernel at its current choice (the
dQ pass after the dK/dV kernel is chosen). With both backwards of a call measured (the dQ-pass
one at its ``attn_bwd_dq`` key, the atomic one at its ``attn_bwd_dkdv_atomic`` key), the table's
``backward`` section records which was faster: the model's training default follows it.

The table (``<card>.json``, from ``torch.cuda.get_device_name``) is rewritten after every key,
starting from the committed ``llm2vec_fast/kernels/tuned/<card>.json`` (its keys are measured last,
so that successive calls fill the table), so a run cut short keeps what it measured. The harness
JSON records each key's best time beside the heuristic's.

    python benchmarks/tune_kernels.py        # every key, into llm2vec_fast/kernels/tuned/
    python benchmarks/tune_kernels.py --quick --table-dir "$OUT" --budget-s 80   # gpu_check.sh

On a CPU (the GPU check's rehearsal, ``TRITON_INTERPRET=1``) it runs the same steps on a tiny
fp32 batch in the Triton interpreter; the times mean nothing there.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import triton
from harness import Results, device_name, measure_ms, parse_args

from llm2vec_fast.kernels import tuning, varlen_attention

HIDDEN = 2048  # Hq x D, as in bench_attention.py
GQA = 4  # query heads per kv head
TOKENS = 16384  # tokens per measured batch (--quick: a quarter)
SANITY_RTOL = {torch.float16: 2e-2, torch.bfloat16: 4e-2, torch.float32: 1e-4}


@dataclass(frozen=True)
class Workload:
    """One varlen batch: its tensors and the call options of a key."""

    q: torch.Tensor  # (T, Hq, D)
    k: torch.Tensor  # (T, Hkv, D)
    v: torch.Tensor  # (T, Hkv, D)
    grad_out: torch.Tensor  # (T, Hq, D)
    cu_seqlens: torch.Tensor  # (B + 1,) int32
    max_seqlen: int
    causal: bool
    window: int | None
    dropout_p: float
    # the work lists per tile size, built once as the model's layers share them
    schedules: dict = field(default_factory=dict)

    def forward(self, deterministic: bool = True) -> torch.Tensor:
        return varlen_attention(
            self.q,
            self.k,
            self.v,
            self.cu_seqlens,
            self.max_seqlen,
            causal=self.causal,
            window=self.window,
            dropout_p=self.dropout_p,
            dropout_seed=12345,
            check_cu_seqlens=False,
            deterministic=deterministic,
            schedules=self.schedules,
        )


def bucket_lengths(bucket: int, tokens: int, generator: torch.Generator) -> list[int]:
    """Sequence lengths drawn uniformly from the upper half of the bucket (from 16 for the
    first), summing to about ``tokens`` (at least one sequence)."""
    low = 16 if bucket == tuning.LENGTH_BUCKETS[0] else bucket // 2 + 1
    lengths: list[int] = []
    while not lengths or sum(lengths) < tokens:
        lengths.append(int(torch.randint(low, bucket + 1, (1,), generator=generator)))
    return lengths


def make_workload(key: tuning.Key, device: str, tokens: int) -> Workload:
    generator = torch.Generator().manual_seed(key.length_bucket + key.head_dim)
    if device == "cpu":  # the rehearsal: a tiny batch for the interpreter
        lengths, heads, kv_heads = [9, 24], 2, 1
    else:
        lengths = bucket_lengths(key.length_bucket, tokens, generator)
        heads = max(GQA, HIDDEN // key.head_dim)
        kv_heads = heads // GQA
    total, dtype = sum(lengths), tuning.DTYPES[key.dtype]

    def tensor(num_heads: int, grad: bool) -> torch.Tensor:
        x = torch.randn(total, num_heads, key.head_dim, generator=generator)
        return x.to(device=device, dtype=dtype).requires_grad_(grad)

    cumulative = torch.tensor([0] + lengths).cumsum(0)
    return Workload(
        q=tensor(heads, True),
        k=tensor(kv_heads, True),
        v=tensor(kv_heads, True),
        grad_out=tensor(heads, False),
        cu_seqlens=cumulative.to(device=device, dtype=torch.int32),
        max_seqlen=max(lengths),
        causal="causal" in key.mask,
        window=max(lengths) // 4 if "window" in key.mask else None,
        dropout_p=0.1 if key.dropout else 0.0,
    )


def keys_by_value(quick: bool, device: str) -> list[tuning.Key]:
    """Every key this run may measure, most valuable first."""
    if device == "cpu":  # fp16: its forward space holds the TMA configs
        return [
            tuning.Key("attn_fwd", 32, "float32", "full", False, 128),
            tuning.Key("attn_fwd", 32, "float16", "full", False, 128),
        ]
    head_dims = (128, 64) if quick else (128, 64, 256, 96, 80)
    dtypes = ("bfloat16",) if quick else ("bfloat16", "float16")
    kernels = ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq", "attn_bwd_dkdv_atomic")
    masks = ("full", "causal") if quick else tuning.MASKS
    keys = []
    for dtype in dtypes:
        for head_dim in head_dims:
            for dropout in (False, True):
                for kernel in kernels:
                    if kernel == "attn_fwd" or not quick or not dropout:
                        for mask in masks:
                            for bucket in tuning.LENGTH_BUCKETS:
                                keys.append(
                                    tuning.Key(kernel, head_dim, dtype, mask, dropout, bucket)
                                )
    return keys


def timed_call(key: tuning.Key, work: Workload):
    """(a function to time, a function returning the tensors to compare) for ``key``'s kernel."""
    if key.kernel == "attn_fwd":

        def run():
            with torch.no_grad():
                return work.forward()

        return run, lambda: [run()]
    deterministic = key.kernel != "attn_bwd_dkdv_atomic"
    inputs = (work.q, work.k, work.v)
    out = work.forward(deterministic)

    def backward():
        return torch.autograd.grad(out, inputs, work.grad_out, retain_graph=True)

    return backward, lambda: list(backward())


def agrees(candidate: list[torch.Tensor], reference: list[torch.Tensor], dtype) -> bool:
    for got, want in zip(candidate, reference):
        scale = float(want.float().abs().max()) or 1.0
        error = float((got.float() - want.float()).abs().max())
        if not error <= SANITY_RTOL[dtype] * scale:  # NaN fails too
            return False
    return True


def companions(key: tuning.Key, table: dict) -> dict[str, tuning.Config]:
    """The configs already chosen for the other kernels of ``key``'s call (same head dim, dtype,
    mask, dropout and bucket): the backward pass runs both of its kernels."""
    chosen = {}
    for kernel in tuning.KERNELS:
        other = replace(key, kernel=kernel)
        if kernel != key.kernel and other in table:
            chosen[kernel] = table[other]
    return chosen


def measure_key(key, table, device: str, tokens: int, repeats: int, results: Results):
    """The fastest surviving config of ``key`` that agrees with the launcher's current choice
    and beats it; None when none does (the table keeps what it had)."""
    dtype = tuning.DTYPES[key.dtype]
    arch = 90
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        arch = 10 * major + minor
    candidates = tuning.surviving_configs(key.kernel, key.head_dim, dtype, key.dropout, arch)
    work = make_workload(key, device, tokens)
    others = companions(key, table)
    with tuning.forced(others):
        run, outputs = timed_call(key, work)
        reference = outputs()  # the launcher's current choice (committed table or heuristic)
        current_ms = measure_ms(run, device=device, warmup=1, repeats=repeats)
    best, best_ms = None, current_ms
    for config in candidates:
        try:
            with tuning.forced({**others, key.kernel: config}):
                run, outputs = timed_call(key, work)
                if not agrees(outputs(), reference, dtype):
                    results.note(f"{key}: {config} disagrees with the current choice: dropped")
                    continue
                ms = measure_ms(run, device=device, warmup=1, repeats=repeats)
        except Exception as error:  # noqa: BLE001 - a config the compiler rejects is skipped
            results.note(f"{key}: {config} failed: {str(error).strip()[:200]}")
            continue
        if ms < best_ms:
            best, best_ms = config, ms
    results.add(
        {**key.to_json(), "best": str(best or "current"), "candidates": len(candidates)},
        "ms",
        best_ms,
        baseline_name="current",
        baseline=current_ms,
        higher_is_better=False,
    )
    return best, best_ms


def note_backward_time(key, ms: float, times: dict, backward: dict) -> None:
    """Keep the whole backward's time of ``key`` (the dQ-pass backward, timed at its
    ``attn_bwd_dq`` key, or the atomic one, at its ``attn_bwd_dkdv_atomic`` key); once both of a
    call are known, its choice in ``backward`` (the table's section, keyed on attn_bwd_dq)."""
    if key.kernel not in ("attn_bwd_dq", "attn_bwd_dkdv_atomic"):
        return
    call = replace(key, kernel="attn_bwd_dq")
    times.setdefault(call, {})[key.kernel] = ms
    if len(times[call]) == 2:
        separate, atomic = times[call]["attn_bwd_dq"], times[call]["attn_bwd_dkdv_atomic"]
        backward[call] = dict(atomic_dq=atomic < separate, separate_ms=separate, atomic_ms=atomic)


def write_table(path: Path, table: dict, backward: dict, device: str, started: str) -> None:
    data = tuning.table_json(
        table,
        device_name=device_name(device),
        backward=backward,
        torch=torch.__version__,
        triton=triton.__version__,
        tuned=started,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    partial.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(partial, path)  # a reader (or a cut) never sees half a table


def main() -> None:
    args = parse_args(
        __doc__.splitlines()[0],
        lambda p: (
            p.add_argument("--table-dir", type=Path, default=tuning.TUNED_DIR),
            p.add_argument(
                "--budget-s",
                type=float,
                default=None,
                help="start no key after this many seconds (default: 75 with --quick)",
            ),
        ),
    )
    device = torch.device(args.device).type
    os.environ["LLM2VEC_FAST_BACKEND"] = "triton"  # the kernels even on CPU tensors (rehearsal)
    budget = args.budget_s if args.budget_s is not None else (75.0 if args.quick else None)
    tokens = TOKENS // 4 if args.quick else TOKENS
    repeats = 2 if device == "cpu" else 10
    card = tuning.card_name(device_name(device))
    committed = tuning.table_path(card)
    table = tuning.load_table(committed) if committed.is_file() else {}
    backward = {}  # per attn_bwd_dq key: which backward was faster, with both times
    if committed.is_file():
        for call, atomic in tuning.load_backward_choices(committed).items():
            backward[call] = dict(atomic_dq=atomic)
    times: dict = {}
    keys = keys_by_value(args.quick, device)
    keys = [k for k in keys if k not in table] + [k for k in keys if k in table]
    path = args.table_dir / f"{card}.json"
    results = Results("tuning", args.device, args.out)
    started, clock = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), time.monotonic()
    measured = 0
    try:
        for key in keys:
            if budget is not None and time.monotonic() - clock > budget:
                results.note(f"budget of {budget:.0f} s spent: {len(keys) - measured} keys left")
                break
            best, best_ms = measure_key(key, table, device, tokens, repeats, results)
            if best is not None:
                table[key] = best
            note_backward_time(key, best_ms, times, backward)
            write_table(path, table, backward, device, started)
            measured += 1
    except KeyboardInterrupt:  # gpu_check.sh's limit: the table holds every finished key
        results.note(f"interrupted after {measured} keys")
    print(f"{measured} keys measured; table: {path} ({len(table)} entries)")
    results.save()


if __name__ == "__main__":
    main()
