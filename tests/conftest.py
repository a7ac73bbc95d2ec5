"""Test-wide setup: Triton runs under its interpreter when no GPU is present.

TRITON_INTERPRET must be set before Triton is first imported, so it is set here, at collection.
GPU tests carry the ``gpu`` marker and are deselected by default (see pyproject.toml). Under
Triton < 3.8 with NumPy >= 2.4 the interpreter needs one fix, applied here as well
(``index_interpreted_scalars_on_numpy_2_4``).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def index_interpreted_scalars_on_numpy_2_4() -> None:
    """Triton < 3.8's interpreter turns a scalar into a Python int with ``int(array)``, which
    NumPy >= 2.4 refuses for the 1-element arrays that hold run-time scalars, so ``range()``
    over a run-time bound fails ("only 0-dimensional arrays can be converted to Python
    scalars"). Triton 3.8 squeezes the array first; this does the same on Triton 3.6 and 3.7
    (the GPU machine's Triton is 3.6)."""
    import triton

    if tuple(int(part) for part in triton.__version__.split(".")[:2]) >= (3, 8):
        return
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patch_tensor_with_squeezed_index(tensor, scope) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_tensor_with_squeezed_index


if os.environ.get("TRITON_INTERPRET") == "1":
    index_interpreted_scalars_on_numpy_2_4()


@pytest.fixture(scope="session")
def default_model_folder(tmp_path_factory):
    """The default model folder, converted once into a session-wide temporary cache."""
    from llm2vec_fast.default_model import CACHE_ENV, default_model_path

    previous = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("llm2vec_fast_cache"))
    try:
        yield default_model_path()
    finally:
        if previous is None:
            del os.environ[CACHE_ENV]
        else:
            os.environ[CACHE_ENV] = previous
