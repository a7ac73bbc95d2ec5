// varlen_metadata on the CPU: for each of the first `total` packed tokens, the index of its
// sequence and its position inside it (both int32, shape (total,)). Tokens not covered by
// cu_seqlens (at or past cu_seqlens[-1]) get -1 in both outputs.

#include "varlen_metadata.h"

#include <ATen/ops/full.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

namespace llm2vec_fast {
namespace {

std::tuple<at::Tensor, at::Tensor> varlen_metadata_cpu(const at::Tensor& cu_seqlens, int64_t total) {
  check_varlen_metadata_inputs(cu_seqlens, total);
  TORCH_CHECK(cu_seqlens.device().is_cpu(), "varlen_metadata: expected a CPU tensor, got ",
              cu_seqlens.device());
  const at::Tensor cu_contiguous = cu_seqlens.contiguous();
  const int32_t* cu = cu_contiguous.data_ptr<int32_t>();
  const int64_t num_seqs = cu_contiguous.numel() - 1;
  TORCH_CHECK(cu[0] == 0, "varlen_metadata: cu_seqlens must start at 0, got ", cu[0]);
  for (int64_t b = 0; b < num_seqs; ++b) {
    TORCH_CHECK(cu[b + 1] >= cu[b], "varlen_metadata: cu_seqlens must be non-decreasing, got ",
                cu[b], " then ", cu[b + 1], " at index ", b);
  }

  const auto options = at::TensorOptions().dtype(at::kInt);
  at::Tensor seq_index = at::full({total}, -1, options);    // (T,)
  at::Tensor positions = at::full({total}, -1, options);    // (T,)
  int32_t* seq_out = seq_index.data_ptr<int32_t>();
  int32_t* pos_out = positions.data_ptr<int32_t>();
  for (int64_t b = 0; b < num_seqs; ++b) {
    const int64_t end = std::min<int64_t>(cu[b + 1], total);
    for (int64_t t = cu[b]; t < end; ++t) {
      seq_out[t] = static_cast<int32_t>(b);
      pos_out[t] = static_cast<int32_t>(t - cu[b]);
    }
  }
  return {seq_index, positions};
}

}  // namespace

TORCH_LIBRARY_IMPL(llm2vec_fast, CPU, m) {
  m.impl("varlen_metadata", &varlen_metadata_cpu);
}

}  // namespace llm2vec_fast
