// Binds the CUDA kernels to the dpo_kernels ops declared in ../ops.cpp. This lives in a host-compiled
// file because torch/library.h takes nvcc minutes to parse; logprobs.cu sees ATen/c10 headers only.
#include <torch/library.h>

#include "logprobs.h"

TORCH_LIBRARY_IMPL(dpo_kernels, CUDA, m) {
  m.impl("native_token_logps", &dpo_kernels::cuda::token_logps_fwd);
  m.impl("native_token_logps_backward", &dpo_kernels::cuda::token_logps_bwd);
  m.impl("native_token_logps_backward_", &dpo_kernels::cuda::token_logps_bwd_);
}
