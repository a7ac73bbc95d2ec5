"""Test-wide setup: Triton runs under its interpreter when no GPU is present.

TRITON_INTERPRET must be set before Triton is first imported, so it is set here, at collection.
GPU tests carry the ``gpu`` marker and are deselected by default (see pyproject.toml).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
