"""Build of llm2vec-fast and its optional compiled extension ``llm2vec_fast._C``.

The extension has a C++ part (built wherever torch and a C++ compiler are present) and a CUDA
part (built wherever nvcc and a CUDA build of torch are present). Environment switches:

- ``LLM2VEC_FAST_NO_EXTENSION=1``: no extension at all (a pure-Python install).
- ``LLM2VEC_FAST_CUDA``: ``0`` skips the CUDA part, ``1`` requires it (the build fails if it
  cannot be built), unset means: build it when possible.
- ``LLM2VEC_FAST_CUDA_ARCHS``: GPU architectures, ``;``-separated (default ``8.0;9.0a``).

Outside the forced CUDA mode, a missing toolchain or a failing compile only warns: the CUDA part
is dropped first, then the whole extension, and the install goes on in pure Python. The build
imports torch, so install with ``pip install --no-build-isolation`` into an environment that
already has torch.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import warnings

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

EXTENSION_NAME = "llm2vec_fast._C"
CPP_SOURCES = [
    "csrc/module.cpp",
    "csrc/pack_batches.cpp",
    "csrc/varlen_metadata.cpp",
]
CUDA_SOURCES = ["csrc/varlen_metadata_cuda.cu"]
DEFAULT_CUDA_ARCHS = "8.0;9.0a"

INSTALL_REQUIRES = [
    "torch>=2.11,<3",
    "triton>=3.6,<4; platform_system == 'Linux'",
    "transformers>=5.17,<6",
    "tokenizers>=0.21,<1",
    "safetensors>=0.4",
    "numpy>=1.26",
    "tqdm>=4.66",
    "pyarrow>=14",
    "gguf>=0.10",
    "accelerate>=1.0",
]
# llm2vec-fast index / search through an index (faiss-gpu where a GPU build is wanted)
INDEX_REQUIRES = ["faiss-cpu>=1.8"]
# llm2vec-fast eval mteb / llm2vec_fast.mteb
MTEB_REQUIRES = ["mteb>=2,<3"]
# llm2vec_fast.corpus.ray_embed (Ray Data's map_batches) and examples/ray_embed.py
RAY_REQUIRES = ["ray[data]>=2.40"]
# llm2vec_fast.sentence_transformers (the module class of exported folders)
SENTENCE_TRANSFORMERS_REQUIRES = ["sentence-transformers>=6,<7"]
# llm2vec-fast eval probe (logistic regression)
PROBE_REQUIRES = ["scikit-learn>=1.3"]
TEST_REQUIRES = [
    *INDEX_REQUIRES,
    *MTEB_REQUIRES,
    *RAY_REQUIRES,
    *PROBE_REQUIRES,
    *SENTENCE_TRANSFORMERS_REQUIRES,
    "pytest>=8",
    "pytest-benchmark>=4",
    "peft>=0.15",
    "matplotlib>=3.7",
    "scipy>=1.10",
    "ruff==0.17.5",
]


def build_warning(message: str) -> None:
    """A warning that stands out in a long build log."""
    warnings.warn(f"llm2vec-fast: {message}", stacklevel=2)
    print(f"\n*** llm2vec-fast build warning: {message}\n", file=sys.stderr, flush=True)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def cuda_mode() -> str:
    """``auto``, ``on`` or ``off`` from ``LLM2VEC_FAST_CUDA``."""
    value = os.environ.get("LLM2VEC_FAST_CUDA", "").strip()
    modes = {"": "auto", "0": "off", "1": "on"}
    if value not in modes:
        raise SystemExit(f"LLM2VEC_FAST_CUDA must be 0, 1 or unset, got {value!r}")
    return modes[value]


def find_cuda_home() -> str | None:
    """The CUDA toolkit root: ``CUDA_HOME``/``CUDA_PATH``, else located from ``nvcc``.

    torch guesses the root as the parent of nvcc's directory, which is wrong when nvcc is a
    wrapper script outside the toolkit (``/usr/local/bin/nvcc``); the root must hold both
    ``bin/nvcc`` and ``include/cuda_runtime.h``.
    """
    for name in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(name):
            return os.environ[name]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for root in candidates:
        has_nvcc = os.path.exists(os.path.join(root, "bin", "nvcc"))
        if has_nvcc and os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    return None


def nvcc_arch_flags(archs: str) -> list[str]:
    """``8.0;9.0a`` -> ``-gencode`` flags, plus PTX of the lowest plain arch for newer GPUs."""
    names = [arch.strip() for arch in archs.replace(",", ";").split(";") if arch.strip()]
    if not names:
        raise SystemExit("LLM2VEC_FAST_CUDA_ARCHS is empty")
    flags = []
    for name in names:
        match = re.fullmatch(r"(\d+)\.(\d)([af]?)", name)
        if match is None:
            raise SystemExit(
                f"LLM2VEC_FAST_CUDA_ARCHS: {name!r} is not an architecture like 8.0 or 9.0a"
            )
        code = "".join(match.groups())
        flags.append(f"-gencode=arch=compute_{code},code=sm_{code}")
    plain = [name for name in names if name[-1].isdigit()]
    if plain:
        lowest = min(plain, key=float).replace(".", "")
        flags.append(f"-gencode=arch=compute_{lowest},code=compute_{lowest}")
    return flags


def cuda_unavailable_reason(torch) -> str | None:
    """Why the CUDA part cannot be built here, or None when it can."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return "nvcc (the CUDA toolkit) was not found; set CUDA_HOME"
    return None


def cuda_extra_include_dirs(torch) -> list[str]:
    """Headers a minimal toolkit lacks (cublas_v2.h, cusparse.h) from the nvidia-* wheels."""
    major = torch.version.cuda.split(".")[0]
    site_packages = os.path.dirname(os.path.dirname(torch.__file__))
    include = os.path.join(site_packages, "nvidia", f"cu{major}", "include")
    return [include] if os.path.isdir(include) else []


def make_extension(with_cuda: bool) -> Extension:
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    macros = [("LLM2VEC_FAST_WITH_CUDA", "1" if with_cuda else "0")]
    if not with_cuda:
        return CppExtension(
            EXTENSION_NAME,
            CPP_SOURCES,
            define_macros=macros,
            extra_compile_args={"cxx": ["-O3"]},
        )
    archs = os.environ.get("LLM2VEC_FAST_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
    extension = CUDAExtension(
        EXTENSION_NAME,
        CPP_SOURCES + CUDA_SOURCES,
        define_macros=macros,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", *nvcc_arch_flags(archs)]},
    )
    # Appended after torch's own include dirs, so these only fill in what the toolkit lacks.
    extension.include_dirs.extend(cuda_extra_include_dirs(torch))
    return extension


def drop_cuda_part(extension: Extension) -> None:
    """Make a CUDA extension C++-only in place (setuptools has annotated the object already)."""
    cpp_only = make_extension(with_cuda=False)
    for field in (
        "sources",
        "include_dirs",
        "define_macros",
        "library_dirs",
        "libraries",
        "extra_compile_args",
        "extra_link_args",
    ):
        setattr(extension, field, getattr(cpp_only, field))


def plan_extension() -> tuple[list[Extension], dict]:
    """The extension modules and build command for this environment (possibly none)."""
    if env_flag("LLM2VEC_FAST_NO_EXTENSION"):
        return [], {}
    mode = cuda_mode()
    cuda_home = find_cuda_home()
    if cuda_home is not None and mode != "off":
        os.environ.setdefault("CUDA_HOME", cuda_home)
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension
    except ImportError as error:
        if mode == "on":
            raise SystemExit(
                f"LLM2VEC_FAST_CUDA=1 but torch cannot be imported: {error}"
            ) from error
        build_warning(
            f"torch cannot be imported ({error}); installing without the compiled extension. "
            "Install torch first and use `pip install --no-build-isolation` to build it."
        )
        return [], {}

    with_cuda = False
    if mode != "off":
        reason = cuda_unavailable_reason(torch)
        if reason is None:
            with_cuda = True
        elif mode == "on":
            raise SystemExit(f"LLM2VEC_FAST_CUDA=1 but the CUDA part cannot be built: {reason}")
        else:
            build_warning(f"building the extension without its CUDA part: {reason}")

    class BuildExtensionOrWarn(BuildExtension):
        """torch's BuildExtension (ninja), falling back instead of failing the install."""

        def run(self) -> None:
            # run() replaces the compiler option by an object and clears inplace until it ends
            initial_state = (self.compiler, self.inplace)
            try:
                super().run()
                return
            except Exception as error:  # noqa: BLE001 - any compiler failure, reported below
                if mode == "on" or not self.extensions:
                    raise
                failure = error
            if with_cuda:
                build_warning(f"the CUDA build failed ({failure}); retrying with C++ only")
                for extension in self.extensions:
                    drop_cuda_part(extension)
                self.compiler, self.inplace = initial_state
                try:
                    super().run()
                    return
                except Exception as error:  # noqa: BLE001
                    failure = error
            build_warning(
                f"the extension failed to build ({failure}); llm2vec-fast is installed without "
                "it and uses its pure-Python paths"
            )
            self.compiler, self.inplace = initial_state
            self.extensions = []

    return [make_extension(with_cuda)], {"build_ext": BuildExtensionOrWarn}


def package_version() -> str:
    """The version, kept in one place: ``llm2vec_fast.__version__``."""
    init = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llm2vec_fast", "__init__.py")
    with open(init, encoding="utf-8") as file:
        match = re.search(r'^__version__ = "([^"]+)"', file.read(), re.MULTILINE)
    if match is None:
        raise SystemExit(f"no __version__ in {init}")
    return match.group(1)


def main() -> None:
    ext_modules, cmdclass = plan_extension()
    setup(
        name="llm2vec-fast",
        version=package_version(),
        description="Decoder LLMs as fast text encoders, the LLM2Vec way",
        python_requires=">=3.10",
        packages=find_packages(include=["llm2vec_fast", "llm2vec_fast.*"]),
        # the default encoder's LoRA adapters (llm2vec_fast/default_encoder.py)
        package_data={
            "llm2vec_fast": ["default_adapters/*.md", "default_adapters/*/*/*"],
            # launch-config tables (llm2vec_fast/kernels/tuning.py)
            "llm2vec_fast.kernels": ["tuned/*.json", "tuned/space/*.json"],
        },
        ext_modules=ext_modules,
        cmdclass=cmdclass or {"build_ext": build_ext},
        install_requires=INSTALL_REQUIRES,
        extras_require={
            "index": INDEX_REQUIRES,
            "mteb": MTEB_REQUIRES,
            "probe": PROBE_REQUIRES,
            "ray": RAY_REQUIRES,
            "sentence-transformers": SENTENCE_TRANSFORMERS_REQUIRES,
            "test": TEST_REQUIRES,
        },
        entry_points={"console_scripts": ["llm2vec-fast = llm2vec_fast.cli:main"]},
        zip_safe=False,
    )


if __name__ == "__main__":
    main()
