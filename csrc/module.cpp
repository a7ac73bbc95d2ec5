// The Python module llm2vec_fast._C and the schemas of its operators.
//
// Importing the module runs the static TORCH_LIBRARY registrations of every source file; the ops
// are then called through torch.ops.llm2vec_fast.<name>. The module itself only tells Python
// whether the CUDA implementations were compiled in.

#include <Python.h>
#include <torch/library.h>

#ifndef LLM2VEC_FAST_WITH_CUDA
#define LLM2VEC_FAST_WITH_CUDA 0
#endif

TORCH_LIBRARY(llm2vec_fast, m) {
  // Greedy token-budget packing; see csrc/pack_batches.cpp for the layout of the outputs.
  m.def(
      "pack_batches(Tensor lengths, int max_batch_tokens, int max_batch_size, bool sort) "
      "-> (Tensor order, Tensor batch_offsets, Tensor cu_seqlens, Tensor position_ids, "
      "Tensor token_offsets)");
  // Per-token sequence index and position from cu_seqlens; see csrc/varlen_metadata.cpp.
  m.def("varlen_metadata(Tensor cu_seqlens, int total) -> (Tensor seq_index, Tensor positions)");
}

static PyModuleDef extension_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "Compiled operators of llm2vec-fast, registered under torch.ops.llm2vec_fast.",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&extension_module);
  if (module == nullptr) {
    return nullptr;
  }
  if (PyModule_AddIntConstant(module, "WITH_CUDA", LLM2VEC_FAST_WITH_CUDA) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
