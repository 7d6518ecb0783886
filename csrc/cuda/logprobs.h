// Host entry points of the CUDA log-prob kernels (logprobs.cu), registered in register.cpp under the
// schemas of ../ops.cpp. Semantics: ../common.h and dpo_kernels/triton/logprobs.py; vocab_start places
// the logits' columns in a larger vocabulary (../common.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace dpo_kernels::cuda {

// -> (logp, lse, stats): logp a new contiguous (N, T - shift) tensor of output_dtype(logits), lse
// (N, T - shift, 2) of that dtype (row max, log of the sum of exp(z - max));
// stats (N, T - shift, 4) of the same dtype with with_stats, else (N, T - shift, 0).
std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logps_fwd(const at::Tensor& logits, const at::Tensor& labels,
                                                               int64_t ignore_index, bool shift, bool with_stats,
                                                               int64_t vocab_start);

// -> grad_logp * (onehot(label) - softmax(logits)) as a new tensor shaped like logits (empty_like).
at::Tensor token_logps_bwd(const at::Tensor& grad_logp, const at::Tensor& logits, const at::Tensor& labels,
                           const at::Tensor& lse, int64_t ignore_index, bool shift, int64_t vocab_start);

// The same gradient written over the logits.
void token_logps_bwd_(const at::Tensor& grad_logp, const at::Tensor& logits, const at::Tensor& labels,
                      const at::Tensor& lse, int64_t ignore_index, bool shift, int64_t vocab_start);

}  // namespace dpo_kernels::cuda
