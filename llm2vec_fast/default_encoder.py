"""The embedded default encoder: SmolLM2-135M-Instruct (``default_model``) made an LLM2Vec encoder
by the MNTP and SimCSE LoRA adapters shipped in this package (``default_adapters/``, with their
provenance and STS-B score in the README beside them).

``embed`` and ``make demo`` use it when no ``--model`` is given.
"""

from __future__ import annotations

from pathlib import Path

from .settings import ADAPTER_WEIGHTS_FILE

DEFAULT_ENCODER_NAME = "smollm2-135m-instruct"
ADAPTER_STAGES = ("mntp", "simcse")  # merged in this order
ADAPTERS_ROOT = Path(__file__).with_name("default_adapters") / DEFAULT_ENCODER_NAME


def default_adapter_paths() -> tuple[Path, ...]:
    """The shipped adapter folders, in merge order (MNTP, then SimCSE)."""
    paths = tuple(ADAPTERS_ROOT / stage for stage in ADAPTER_STAGES)
    missing = [str(path) for path in paths if not (path / ADAPTER_WEIGHTS_FILE).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the default encoder's adapters are missing ({', '.join(missing)}): reinstall"
            " llm2vec-fast, or give --model"
        )
    return paths
