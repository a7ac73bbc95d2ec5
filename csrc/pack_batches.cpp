// Host packer: sort sequences by token length and fill token-budget batches greedily.
//
// Output layout (flat tensors plus offsets, so one call returns the whole plan):
//   order          int64 (N,)        input indices in packing order; batch b's members are
//                                    order[batch_offsets[b] : batch_offsets[b + 1]]
//   batch_offsets  int64 (NB + 1,)   from 0 to N
//   cu_seqlens     int32 (N + NB,)   batch b's cu_seqlens (its size + 1 entries, from 0) are
//                                    cu_seqlens[batch_offsets[b] + b : batch_offsets[b + 1] + b + 1]
//   position_ids   int64 (T_all,)    batch b's are position_ids[token_offsets[b] : token_offsets[b + 1]],
//                                    restarting at 0 for every sequence
//   token_offsets  int64 (NB + 1,)   from 0 to the total token count

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

namespace llm2vec_fast {
namespace {

using PackedPlan = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

at::Tensor int64_tensor(const std::vector<int64_t>& values) {
  at::Tensor out = at::empty({static_cast<int64_t>(values.size())}, at::kLong);
  std::copy(values.begin(), values.end(), out.data_ptr<int64_t>());
  return out;
}

PackedPlan pack_batches_cpu(
    const at::Tensor& lengths, int64_t max_batch_tokens, int64_t max_batch_size, bool sort) {
  // ValueError / TypeError in Python, as the Python twin raises
  TORCH_CHECK_VALUE(lengths.dim() == 1, "pack_batches: lengths must be 1-D, got shape ", lengths.sizes());
  TORCH_CHECK_TYPE(
      lengths.scalar_type() == at::kLong, "pack_batches: lengths must be int64, got ",
      lengths.scalar_type());
  TORCH_CHECK_VALUE(lengths.device().is_cpu(), "pack_batches: lengths must be on the CPU, got ",
              lengths.device());
  TORCH_CHECK_VALUE(max_batch_tokens >= 1, "pack_batches: max_batch_tokens must be >= 1, got ",
              max_batch_tokens);
  TORCH_CHECK_VALUE(max_batch_size >= 0, "pack_batches: max_batch_size must be >= 0 (0 = unlimited), got ",
              max_batch_size);

  const at::Tensor contiguous_lengths = lengths.contiguous();
  const int64_t* length = contiguous_lengths.data_ptr<int64_t>();
  const int64_t count = contiguous_lengths.numel();
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK_VALUE(length[i] >= 0, "pack_batches: lengths must be >= 0, got ", length[i],
                " at index ", i);
  }

  std::vector<int64_t> order(count);
  std::iota(order.begin(), order.end(), 0);
  if (sort) {
    std::stable_sort(order.begin(), order.end(),
                     [length](int64_t a, int64_t b) { return length[a] > length[b]; });
  }

  // Greedy filling: a sequence joins the open batch while the batch stays within both budgets;
  // an empty batch takes any sequence, so one longer than the token budget forms a batch alone.
  std::vector<int64_t> batch_offsets{0};
  std::vector<int64_t> token_offsets{0};
  int64_t batch_tokens = 0;
  int64_t batch_size = 0;
  int64_t total_tokens = 0;
  for (int64_t k = 0; k < count; ++k) {
    const int64_t seq_len = length[order[k]];
    const bool fits = batch_size == 0 ||
                      (batch_tokens + seq_len <= max_batch_tokens &&
                       (max_batch_size == 0 || batch_size < max_batch_size));
    if (!fits) {
      batch_offsets.push_back(k);
      token_offsets.push_back(total_tokens);
      batch_tokens = 0;
      batch_size = 0;
    }
    TORCH_CHECK_VALUE(batch_tokens + seq_len <= std::numeric_limits<int32_t>::max(),
                "pack_batches: a batch of ", batch_tokens + seq_len,
                " tokens does not fit the int32 cu_seqlens");
    batch_tokens += seq_len;
    batch_size += 1;
    total_tokens += seq_len;
  }
  if (batch_size > 0) {
    batch_offsets.push_back(count);
    token_offsets.push_back(total_tokens);
  }
  const int64_t num_batches = static_cast<int64_t>(batch_offsets.size()) - 1;

  at::Tensor cu_seqlens = at::empty({count + num_batches}, at::kInt);
  at::Tensor position_ids = at::empty({total_tokens}, at::kLong);
  int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  int64_t* position = position_ids.data_ptr<int64_t>();
  for (int64_t b = 0; b < num_batches; ++b) {
    int32_t* batch_cu = cu + batch_offsets[b] + b;
    batch_cu[0] = 0;
    for (int64_t k = batch_offsets[b]; k < batch_offsets[b + 1]; ++k) {
      const int64_t seq_len = length[order[k]];
      for (int64_t p = 0; p < seq_len; ++p) {
        *position++ = p;
      }
      batch_cu[1] = batch_cu[0] + static_cast<int32_t>(seq_len);
      ++batch_cu;
    }
  }

  return {int64_tensor(order), int64_tensor(batch_offsets), cu_seqlens, position_ids,
          int64_tensor(token_offsets)};
}

}  // namespace

TORCH_LIBRARY_IMPL(llm2vec_fast, CPU, m) {
  m.impl("pack_batches", &pack_batches_cpu);
}

}  // namespace llm2vec_fast
