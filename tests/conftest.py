"""Test-wide setup: Triton runs under its interpreter when no GPU is present.

TRITON_INTERPRET must be set before Triton is first imported, so it is set here, at collection.
GPU tests carry the ``gpu`` marker and are deselected by default (see pyproject.toml).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def default_model_folder(tmp_path_factory):
    """The default model folder, converted once into a session-wide temporary cache."""
    from llm2vec_fast.default_model import default_model_path
    from llm2vec_fast.info import CACHE_ENV

    previous = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("llm2vec_fast_cache"))
    try:
        yield default_model_path()
    finally:
        if previous is None:
            del os.environ[CACHE_ENV]
        else:
            os.environ[CACHE_ENV] = previous
