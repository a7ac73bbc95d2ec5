"""Static SASS of the attention kernels' key-block loops, compiled for sm_90 without a GPU.

Not a timing: the instruction count and mix of each loop body of the forward, dK/dV and dQ
kernels (the launchers' configs, compiled as the JIT compiles them: ``tests/compile_kernels.py``)
as Triton's bundled ``nvdisasm`` shows it. It tells where a change moves work (e.g. dropout's
Philox: IMAD.HI and LOP3 by the hundred) when no GPU is at hand. A loop is the code between a
backward branch and its target; loops under 40 instructions (address arithmetic) are left out.

Run: ``python benchmarks/attention_sass.py [--causal] [--dropout P] [--dtype bf16|fp16]``.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import compile_kernels  # noqa: E402 - sets up the compile-only Triton environment first
import torch  # noqa: E402
import triton  # noqa: E402
from harness import Results  # noqa: E402

ARCH = 90
SHOWN_OPCODES = (
    "HGMMA",
    "HMMA",
    "IMAD.HI.U32",
    "IMAD",
    "LOP3.LUT",
    "MUFU.EX2",
    "LDS",
    "STS",
    "BAR",
)
# counted with their variants (HGMMA.64x64x16.F32.BF16, LDS.128, BAR.SYNC, ...)
OPCODE_FAMILIES = ("HGMMA", "HMMA", "LDS", "STS", "BAR")
INSTRUCTION = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)([^;]*);")
LABEL = re.compile(r"\s*\.(L_x_\d+):")
BRANCH_TARGET = re.compile(r"`?\(?\.(L_x_\d+)")


def disassemble(cubin: bytes) -> list[str]:
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        result = subprocess.run([str(nvdisasm), "-c", file.name], capture_output=True, text=True)
    result.check_returncode()
    return result.stdout.splitlines()


def loops(lines: list[str]) -> list[collections.Counter]:
    """The opcode counts of each loop body, in code order."""
    instructions: list[tuple[int, str, str]] = []  # (address, opcode, operands)
    address_of: dict[str, int] = {}
    pending: list[str] = []
    for line in lines:
        if label := LABEL.match(line):
            pending.append(label[1])
        elif instruction := INSTRUCTION.match(line):
            address = int(instruction[1], 16)
            address_of.update((name, address) for name in pending)
            pending = []
            instructions.append((address, instruction[2], instruction[3]))
    bodies = []
    for address, opcode, operands in instructions:
        target = BRANCH_TARGET.search(operands) if opcode == "BRA" else None
        if target and address_of.get(target[1], address) < address:
            start = address_of[target[1]]
            body = collections.Counter(op for a, op, _ in instructions if start <= a <= address)
            if sum(body.values()) >= 40:
                bodies.append(body)
    return bodies


def opcode_mix(body: collections.Counter) -> dict[str, int]:
    """The counts of SHOWN_OPCODES in a loop body (families with their variants)."""
    mix = {}
    for shown in SHOWN_OPCODES:
        family = shown in OPCODE_FAMILIES
        count = sum(n for op, n in body.items() if op == shown or family and op.startswith(shown))
        if count:
            mix[shown] = count
    return mix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    launches = compile_kernels.record_launches(
        lambda: compile_kernels.attention(dtype, args.head_dim, args.causal, args.dropout)
    )
    name = "attention-sass" + ("-causal" if args.causal else "")
    results = Results(name, "cpu", args.out)
    seen = set()
    for launch in launches:
        name = launch.kernel.fn.__name__
        if not name.startswith("_attn_") or name in seen:
            continue
        seen.add(name)
        compiled, _ = compile_kernels.compile_cubin(launch, ARCH)
        for index, body in enumerate(loops(disassemble(compiled.asm["cubin"]))):
            config = {
                "kernel": name,
                "loop": index,
                "arch": f"sm_{ARCH}",
                "dtype": args.dtype,
                "head_dim": args.head_dim,
                "causal": args.causal,
                "dropout": args.dropout,
            }
            mix = opcode_mix(body)
            results.add(config, "instructions", sum(body.values()), opcodes=mix)
            print(f"{name} loop {index}: {sum(body.values())} instructions {mix}")
    results.save()


if __name__ == "__main__":
    main()
