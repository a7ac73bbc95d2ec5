"""Names, defaults and file names shared by encoding, training and the corpus job.

Each setting has one name and one default here; the CLI, the Python API and the runtime import
them, so that a default changes in one place. torch is imported only by the dtype functions:
the command-line parsers read their defaults here, and ``llm2vec-fast --help`` stays light.
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# Files of a model folder and of an adapter folder (transformers' and PEFT's names).
CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
# Encoder settings beside a model or adapter (llm2vec's file), and the training config our
# trainer writes beside each adapter it saves.
LLM2VEC_CONFIG_FILE = "llm2vec_config.json"
TRAIN_CONFIG_FILE = "train_config.json"

DEFAULT_POOLING_MODE = "mean"
DEFAULT_MAX_LENGTH = 512
LLM2VEC_DOC_MAX_LENGTH = 400  # llm2vec's default doc_max_length
# Tokens per packed batch: bounds activation memory; never changes the numbers.
DEFAULT_MAX_BATCH_TOKENS = 16384


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/``"auto"``: bf16 on a GPU, fp32 on a CPU; else a torch dtype or its name."""
    import torch

    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(
                f"dtype {dtype} is not supported; expected float32, float16 or bfloat16"
            )
        resolved = dtype
    else:
        names = {
            "float32": torch.float32,
            "fp32": torch.float32,
            "float16": torch.float16,
            "fp16": torch.float16,
            "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16,
        }
        if str(dtype) not in names:
            raise ValueError(
                f"unknown dtype {dtype!r}; expected one of {', '.join(names)} or 'auto'"
            )
        resolved = names[str(dtype)]
    if device.type == "cpu" and resolved == torch.float16:
        warnings.warn(
            "float16 on a CPU is slow and imprecise; prefer bfloat16 or float32", stacklevel=3
        )
    return resolved


def resolve_training_dtype(name: str, device: torch.device) -> torch.dtype:
    """Like ``resolve_dtype`` on a GPU; a CPU always trains in fp32 (its bf16 matmuls are slow)."""
    import torch

    if device.type != "cuda":
        if name not in ("auto", "float32"):
            logger.info("torch_dtype=%s applies on a GPU; training on the CPU in float32", name)
        return torch.float32
    return resolve_dtype(name, device)
