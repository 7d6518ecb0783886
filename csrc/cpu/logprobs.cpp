// CPU implementations of the native ops: argument checks, output allocation, and the choice of the
// kernel copy (logprobs_kernel.cpp, compiled per capability) that the running CPU supports.
#include <ATen/MemoryOverlap.h>
#include <ATen/Version.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "../common.h"

#define DPO_DECLARE_CPU_KERNELS(CAP)                                                                          \
  namespace dpo_kernels::cpu::CAP {                                                                           \
  void token_logps_fwd(const at::Tensor& logits, const at::Tensor& labels, at::Tensor& logp, at::Tensor& lse, \
                       at::Tensor& stats, int64_t ignore_index, bool shift, bool with_stats,                  \
                       int64_t vocab_start);                                                                  \
  void token_logps_bwd(const at::Tensor& grad_logp, const at::Tensor& logits, const at::Tensor& labels,       \
                       const at::Tensor& lse, at::Tensor& out, int64_t ignore_index, bool shift,              \
                       int64_t vocab_start);                                                                  \
  }

DPO_DECLARE_CPU_KERNELS(DEFAULT)
#ifdef DPO_KERNELS_HAVE_AVX2
DPO_DECLARE_CPU_KERNELS(AVX2)
#endif
#ifdef DPO_KERNELS_HAVE_AVX512
DPO_DECLARE_CPU_KERNELS(AVX512)
#endif

namespace dpo_kernels::cpu {
namespace {

struct Kernels {
  decltype(&DEFAULT::token_logps_fwd) fwd;
  decltype(&DEFAULT::token_logps_bwd) bwd;
};

// ATen's own answer (it honours ATEN_CPU_CAPABILITY=default|avx2|avx512), so these kernels and
// ATen's run on the same instruction set.
Kernels select_kernels() {
  const std::string capability = at::get_cpu_capability();
#ifdef DPO_KERNELS_HAVE_AVX512
  if (capability == "AVX512") return {AVX512::token_logps_fwd, AVX512::token_logps_bwd};
#endif
#ifdef DPO_KERNELS_HAVE_AVX2
  if (capability == "AVX2" || capability == "AVX512") return {AVX2::token_logps_fwd, AVX2::token_logps_bwd};
#endif
  return {DEFAULT::token_logps_fwd, DEFAULT::token_logps_bwd};
}

const Kernels& kernels() {
  static const Kernels chosen = select_kernels();
  return chosen;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logps(const at::Tensor& logits, const at::Tensor& labels,
                                                           int64_t ignore_index, bool shift, bool with_stats,
                                                           int64_t vocab_start) {
  check_logits_labels(logits, labels, vocab_start);
  const auto t_out = std::max<int64_t>(logits.size(1) - (shift ? 1 : 0), 0);
  const auto options = logits.options().dtype(output_dtype(logits));
  // Zeros: unscored rows are never visited by the kernel.
  at::Tensor logp = at::zeros({logits.size(0), t_out}, options);
  at::Tensor lse = at::zeros({logits.size(0), t_out, 2}, options);  // (m, log s) per row
  at::Tensor stats = at::zeros({logits.size(0), t_out, with_stats ? kNumStats : 0}, options);
  kernels().fwd(logits, labels, logp, lse, stats, ignore_index, shift, with_stats, vocab_start);
  return {logp, lse, stats};
}

at::Tensor token_logps_backward(const at::Tensor& grad_logp, const at::Tensor& logits, const at::Tensor& labels,
                                const at::Tensor& lse, int64_t ignore_index, bool shift, int64_t vocab_start) {
  check_backward(grad_logp, logits, labels, lse, shift, vocab_start);
  at::Tensor out = at::empty_like(logits);
  kernels().bwd(grad_logp, logits, labels, lse, out, ignore_index, shift, vocab_start);
  return out;
}

void token_logps_backward_(const at::Tensor& grad_logp, const at::Tensor& logits, const at::Tensor& labels,
                           const at::Tensor& lse, int64_t ignore_index, bool shift, int64_t vocab_start) {
  check_backward(grad_logp, logits, labels, lse, shift, vocab_start);
  // Rows that share memory (an expanded logits) would be read after another row wrote them.
  at::assert_no_internal_overlap(logits);
  at::Tensor out = logits;
  kernels().bwd(grad_logp, logits, labels, lse, out, ignore_index, shift, vocab_start);
}

}  // namespace
}  // namespace dpo_kernels::cpu

TORCH_LIBRARY_IMPL(dpo_kernels, CPU, m) {
  m.impl("native_token_logps", &dpo_kernels::cpu::token_logps);
  m.impl("native_token_logps_backward", &dpo_kernels::cpu::token_logps_backward);
  m.impl("native_token_logps_backward_", &dpo_kernels::cpu::token_logps_backward_);
}
