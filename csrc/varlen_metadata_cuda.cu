// varlen_metadata on the GPU: one thread per packed token binary-searches cu_seqlens for its
// sequence, so the result never leaves the device and nothing waits for the host. The inputs
// are not checked for monotonicity here (that would need a device-to-host copy); tokens not
// covered by cu_seqlens get -1, as on the CPU.

#include "varlen_metadata.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

namespace llm2vec_fast {
namespace {

constexpr int kThreadsPerBlock = 256;

__global__ void varlen_metadata_kernel(const int32_t* __restrict__ cu_seqlens, int64_t num_seqs,
                                       int64_t total, int32_t* __restrict__ seq_index,
                                       int32_t* __restrict__ positions) {
  const int64_t token = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (token >= total) {
    return;
  }
  // First entry of cu_seqlens greater than the token: its sequence is the one before.
  int64_t low = 0;
  int64_t high = num_seqs + 1;
  while (low < high) {
    const int64_t mid = (low + high) / 2;
    if (cu_seqlens[mid] <= token) {
      low = mid + 1;
    } else {
      high = mid;
    }
  }
  const int64_t seq = low - 1;
  const bool covered = seq >= 0 && seq < num_seqs;
  seq_index[token] = covered ? static_cast<int32_t>(seq) : -1;
  positions[token] = covered ? static_cast<int32_t>(token - cu_seqlens[seq]) : -1;
}

std::tuple<at::Tensor, at::Tensor> varlen_metadata_cuda(const at::Tensor& cu_seqlens,
                                                        int64_t total) {
  check_varlen_metadata_inputs(cu_seqlens, total);
  TORCH_CHECK(cu_seqlens.is_cuda(), "varlen_metadata: expected a CUDA tensor, got ",
              cu_seqlens.device());
  const c10::cuda::CUDAGuard device_guard(cu_seqlens.device());
  const at::Tensor cu = cu_seqlens.contiguous();
  at::Tensor seq_index = at::empty({total}, cu.options());  // (T,) int32
  at::Tensor positions = at::empty({total}, cu.options());  // (T,) int32
  if (total == 0) {
    return {seq_index, positions};
  }
  const int64_t blocks = (total + kThreadsPerBlock - 1) / kThreadsPerBlock;
  varlen_metadata_kernel<<<blocks, kThreadsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
      cu.data_ptr<int32_t>(), cu.numel() - 1, total, seq_index.data_ptr<int32_t>(),
      positions.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {seq_index, positions};
}

}  // namespace

TORCH_LIBRARY_IMPL(llm2vec_fast, CUDA, m) {
  m.impl("varlen_metadata", &varlen_metadata_cuda);
}

}  // namespace llm2vec_fast
