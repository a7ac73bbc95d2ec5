"""``llm2vec-fast info``: what this installation has (extension, torch, Triton, devices).

torch is imported only when the command runs, so that ``llm2vec-fast --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
from pathlib import Path


def describe_extension() -> str:
    from llm2vec_fast._ext import extension_status

    status = extension_status()
    if not status.loaded:
        return f"not loaded: {status.reason}"
    if status.has_cuda_ops:
        return "loaded, with CUDA ops"
    return f"loaded, without CUDA ops ({status.reason})"


def describe_torch() -> str:
    import torch

    if torch.version.cuda is not None:
        return f"{torch.__version__} (CUDA {torch.version.cuda} build)"
    if getattr(torch.version, "hip", None):
        return f"{torch.__version__} (ROCm {torch.version.hip} build)"
    return f"{torch.__version__} (CPU-only build)"


def describe_triton() -> str:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def describe_cuda_devices() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        memory_gib = props.total_memory / 2**30
        bf16 = props.major >= 8  # Ampere on; per device, not the current one
        devices.append(
            f"cuda:{index} {props.name} (sm_{props.major}{props.minor}, {memory_gib:.0f} GiB, "
            f"bf16 {'yes' if bf16 else 'no'})"
        )
    return devices


def describe_cpu_bf16() -> str:
    """bf16 always works on a CPU in torch; it is fast only with AVX512-BF16 or AMX."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "emulated or native (unknown CPU features)"
    if "amx_bf16" in flags or "avx512_bf16" in flags:
        return "native (AVX512-BF16/AMX)"
    return "emulated (no AVX512-BF16/AMX)"


def collect_info() -> dict[str, object]:
    from llm2vec_fast import __version__
    from llm2vec_fast.default_model import model_cache_dir
    from llm2vec_fast.kernels import describe

    return {
        "llm2vec-fast": __version__,
        "extension": describe_extension(),
        "torch": describe_torch(),
        "triton": describe_triton(),
        "cuda devices": describe_cuda_devices() or "cpu only",
        "cpu count": os.cpu_count(),
        "cpu bf16": describe_cpu_bf16(),
        "kernel backend": describe(),
        "model cache": str(model_cache_dir()),
    }


def run(args: argparse.Namespace) -> int:
    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(key) for key in info)
    for key, value in info.items():
        lines = value if isinstance(value, list) else [value]
        for i, line in enumerate(lines):
            print(f"{key if i == 0 else '':<{width}}  {line}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("info", help="show versions, the extension, devices")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead")
    parser.set_defaults(run=run)
