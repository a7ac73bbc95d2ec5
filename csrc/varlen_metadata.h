// Shared input checks of the varlen_metadata op (CPU and CUDA implementations).

#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>

namespace llm2vec_fast {

inline void check_varlen_metadata_inputs(const at::Tensor& cu_seqlens, int64_t total) {
  TORCH_CHECK(cu_seqlens.dim() == 1, "varlen_metadata: cu_seqlens must be 1-D, got shape ",
              cu_seqlens.sizes());
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt, "varlen_metadata: cu_seqlens must be int32, got ",
              cu_seqlens.scalar_type());
  TORCH_CHECK(cu_seqlens.numel() >= 1,
              "varlen_metadata: cu_seqlens needs at least one entry (B + 1 for B sequences)");
  TORCH_CHECK(total >= 0 && total <= std::numeric_limits<int32_t>::max(),
              "varlen_metadata: total must be in [0, 2^31 - 1], got ", total);
}

}  // namespace llm2vec_fast
