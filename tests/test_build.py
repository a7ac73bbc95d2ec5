"""The installation: the console command, the optional extension, the build switches."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from llm2vec_fast.cli import main

REPO = Path(__file__).resolve().parents[1]


def load_setup_module():
    """setup.py as a module, without running setup() (it only runs as __main__)."""
    spec = importlib.util.spec_from_file_location("llm2vec_fast_setup", REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def built_extension() -> ModuleType | None:
    """``llm2vec_fast._C`` imported directly, or None when it is not built or does not load.

    The expected values of these tests come from here, not from ``llm2vec_fast._ext``, which is
    what they check. torch is imported first: the module links against its libraries.
    """
    importlib.import_module("torch")
    try:
        return importlib.import_module("llm2vec_fast._C")
    except ImportError:
        return None


def expected_extension_line() -> str:
    """The start of the ``extension`` line of ``llm2vec-fast info`` in this environment."""
    switch = os.environ.get("LLM2VEC_FAST_NO_EXTENSION", "").strip().lower()
    module = None if switch in ("1", "true", "yes", "on") else built_extension()
    if module is None:
        return "not loaded"
    return "loaded, with CUDA ops" if module.WITH_CUDA else "loaded, without CUDA ops"


def test_info_console_script_reports_extension():
    script = Path(sys.executable).with_name("llm2vec-fast")
    assert script.exists(), f"{script} missing: reinstall with `make venv`"
    result = subprocess.run(
        [str(script), "info"], capture_output=True, text=True, timeout=120, check=True
    )
    lines = {line.split("  ")[0]: line for line in result.stdout.splitlines()}
    assert expected_extension_line() in lines["extension"]
    for key in ("llm2vec-fast", "torch", "triton", "cuda devices", "kernel backend", "model cache"):
        assert key in lines, result.stdout


def test_info_json(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("LLM2VEC_FAST_CACHE", str(tmp_path / "models"))
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["extension"].startswith(expected_extension_line())
    assert info["model cache"] == str(tmp_path / "models")
    assert info["cpu count"] == os.cpu_count()


def test_everything_works_without_extension():
    code = """
import sys, torch
from llm2vec_fast.info import describe_extension
from llm2vec_fast.packed import pack_batches
from llm2vec_fast.varlen import varlen_metadata
print(describe_extension())
print([p.indices.tolist() for p in pack_batches([[7] * 2, [7] * 5, [7]], max_batch_tokens=6)])
print(varlen_metadata(torch.tensor([0, 2, 3], dtype=torch.int32), 3)[0].tolist())
print("llm2vec_fast._C" in sys.modules)
"""
    env = dict(os.environ, LLM2VEC_FAST_NO_EXTENSION="1")
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    assert result.stdout.splitlines() == [
        "not loaded: disabled by LLM2VEC_FAST_NO_EXTENSION=1",
        "[[1], [0, 2]]",
        "[0, 0, 1]",
        "False",
    ]


def test_missing_extension_is_reported_as_not_built():
    from llm2vec_fast._ext import import_extension

    assert import_extension("llm2vec_fast._C_never_built") == (
        None,
        "not built (reinstall with torch and a C++ compiler present; see setup.py)",
    )
    module, reason = import_extension()
    built = built_extension() is not None
    assert (module is not None, reason is None) == (built, built)


def test_no_top_level_kernels_module_installed():
    distribution = importlib.metadata.distribution("llm2vec-fast")
    top_level = (distribution.read_text("top_level.txt") or "").split()
    assert top_level == ["llm2vec_fast"]
    for file in distribution.files or []:
        assert file.parts[0] != "kernels", f"installed a top-level kernels file: {file}"
        if file.suffix in (".py", ".pth") and len(file.parts) == 1:  # editable-install hooks
            text = Path(file.locate()).read_text()
            assert not re.search(r"['\"]kernels['\"]\s*:", text), f"{file} maps a top-level kernels"


def test_setup_cuda_switch_and_archs(monkeypatch):
    setup_module = load_setup_module()
    assert setup_module.package_version() == importlib.metadata.version("llm2vec-fast")
    assert setup_module.nvcc_arch_flags("8.0;9.0a") == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_80,code=compute_80",
    ]
    with pytest.raises(SystemExit, match="'sm90' is not an architecture"):
        setup_module.nvcc_arch_flags("8.0;sm90")
    for value, mode in (("", "auto"), ("0", "off"), ("1", "on")):
        monkeypatch.setenv("LLM2VEC_FAST_CUDA", value)
        assert setup_module.cuda_mode() == mode


def test_setup_rejects_bad_cuda_switch():
    result = subprocess.run(
        [sys.executable, "setup.py", "--version"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, LLM2VEC_FAST_CUDA="yes please"),
    )
    assert result.returncode != 0
    assert "LLM2VEC_FAST_CUDA must be 0, 1 or unset, got 'yes please'" in result.stderr


def test_setup_without_cuda_toolkit(monkeypatch):
    """Auto mode warns and builds the C++ part only; forced mode stops with the reason."""
    setup_module = load_setup_module()
    monkeypatch.setenv("CUDA_HOME", "/nonexistent")
    monkeypatch.setattr(setup_module, "cuda_unavailable_reason", lambda torch: "no nvcc here")
    monkeypatch.delenv("LLM2VEC_FAST_NO_EXTENSION", raising=False)
    monkeypatch.delenv("LLM2VEC_FAST_CUDA", raising=False)
    with pytest.warns(UserWarning, match="without its CUDA part: no nvcc here"):
        extensions, cmdclass = setup_module.plan_extension()
    assert [ext.name for ext in extensions] == ["llm2vec_fast._C"]
    assert ("LLM2VEC_FAST_WITH_CUDA", "0") in extensions[0].define_macros
    assert not any(source.endswith(".cu") for source in extensions[0].sources)
    assert "build_ext" in cmdclass

    monkeypatch.setenv("LLM2VEC_FAST_CUDA", "1")
    with pytest.raises(
        SystemExit, match="LLM2VEC_FAST_CUDA=1 but the CUDA part cannot be built: no nvcc"
    ):
        setup_module.plan_extension()

    monkeypatch.setenv("LLM2VEC_FAST_NO_EXTENSION", "1")
    assert setup_module.plan_extension() == ([], {})


def test_every_registered_subcommand_has_a_run_function():
    """Every leaf command (nested ones like ``eval sts`` included) sets ``run``."""
    import argparse

    from llm2vec_fast.cli import build_parser

    def leaves(parser: argparse.ArgumentParser, path: str):
        nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not nested:
            yield path, parser
        for action in nested:
            for name, subparser in action.choices.items():
                yield from leaves(subparser, f"{path} {name}".strip())

    commands = dict(leaves(build_parser(), ""))
    assert "info" in commands
    for name, parser in commands.items():
        assert callable(parser.get_default("run")), f"{name!r} sets no run function"


def test_help_does_not_import_torch():
    """Building the command's parser (what ``llm2vec-fast --help`` does) stays free of torch."""
    code = (
        "import sys; from llm2vec_fast.cli import build_parser; build_parser(); "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
