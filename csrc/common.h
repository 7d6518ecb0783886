// Shared by the CPU and CUDA kernels: argument checks and the row geometry of the log-prob ops.
//
// Semantics (the same as dpo_kernels/triton/logprobs.py): logits (N, T, V) with any strides, labels
// (N, T). With a shift, logits row t is scored against label t + 1 and the last row against nothing.
// Rows whose label is ignore_index are not read; their log-prob, lse, stats and gradient are zero.
//
// Vocabulary window: the V columns of logits are the columns [vocab_start, vocab_start + V) of a larger
// vocabulary (a shard of the LM head), and labels are ids in that larger vocabulary. A label the window
// does not own (any other id, negative or past the end included) scores as a label logit of 0: the row's
// lse and stats are the window's, its log-prob -lse, top1 0, and its backward has no one-hot term. So the
// kernels never read out of bounds whatever the labels hold; the Python op checks them against the
// whole vocabulary.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace dpo_kernels {

struct RowGeometry {
  int64_t N, T, T_out, V;
  int64_t shift;
  int64_t vocab_start;                   // the global id of column 0 (see above)
  int64_t logits_n, logits_t, logits_v;  // logits strides, in elements
  int64_t labels_n, labels_t;            // labels strides, in elements
};

inline RowGeometry row_geometry(const at::Tensor& logits, const at::Tensor& labels, bool shift,
                                int64_t vocab_start) {
  RowGeometry g;
  g.vocab_start = vocab_start;
  g.N = logits.size(0);
  g.T = logits.size(1);
  g.V = logits.size(2);
  g.shift = shift ? 1 : 0;
  g.T_out = std::max<int64_t>(g.T - g.shift, 0);
  g.logits_n = logits.stride(0);
  g.logits_t = logits.stride(1);
  g.logits_v = logits.stride(2);
  g.labels_n = labels.stride(0);
  g.labels_t = labels.stride(1);
  return g;
}

// The column of global label y in a window of V columns starting at vocab_start >= 0, or -1 where the
// window does not own y. y >= vocab_start >= 0 comes first, so y - vocab_start cannot overflow int64
// (nor is vocab_start + V ever formed), whatever id y is.
#if defined(__CUDACC__)
__host__ __device__
#endif
inline int64_t local_label(int64_t y, int64_t vocab_start, int64_t V) {
  return y >= vocab_start && y - vocab_start < V ? y - vocab_start : -1;
}

inline void check_logits_labels(const at::Tensor& logits, const at::Tensor& labels, int64_t vocab_start) {
  TORCH_CHECK_VALUE(logits.dim() == 3, "logits must have shape (N, T, V), got ", logits.sizes());
  TORCH_CHECK_VALUE(logits.size(2) > 0, "logits has an empty vocabulary dimension: ", logits.sizes());
  // Every id of the window fits in int64 (the CUDA backward relies on it, see logprobs.cu).
  TORCH_CHECK_VALUE(vocab_start >= 0 && vocab_start <= std::numeric_limits<int64_t>::max() - logits.size(2),
                    "vocab_start must be >= 0 with vocab_start + V <= 2^63 - 1, got vocab_start = ", vocab_start,
                    " and V = ", logits.size(2));
  auto dtype = logits.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kDouble,
                   "logits must be float32, bfloat16, float16 or float64, got ", dtype);
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt,
                   "labels must be int64 or int32 token ids, got ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 2 && labels.size(0) == logits.size(0) && labels.size(1) == logits.size(1),
                    "labels must have shape (N, T) = (", logits.size(0), ", ", logits.size(1),
                    ") to match logits, got ", labels.sizes());
  TORCH_CHECK_VALUE(labels.device() == logits.device(), "labels are on ", labels.device(), " but logits is on ",
                    logits.device());
}

inline void check_backward(const at::Tensor& grad_logp, const at::Tensor& logits, const at::Tensor& labels,
                           const at::Tensor& lse, bool shift, int64_t vocab_start) {
  check_logits_labels(logits, labels, vocab_start);
  const int64_t t_out = std::max<int64_t>(logits.size(1) - (shift ? 1 : 0), 0);
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const auto* t : {&grad_logp, &lse}) {
    const bool is_lse = t == &lse;
    const char* name = is_lse ? "lse" : "grad_logp";
    // lse: the forward's (m, log s) per row, kept apart so the backward forms exp((x - m) - log s).
    TORCH_CHECK_VALUE(t->dim() == (is_lse ? 3 : 2) && t->size(0) == logits.size(0) && t->size(1) == t_out &&
                          (!is_lse || t->size(2) == 2),
                      name, is_lse ? " must have shape (N, T - shift, 2) = (" : " must have shape (N, T - shift) = (",
                      logits.size(0), ", ", t_out, is_lse ? ", 2), got " : "), got ", t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == acc, name, " must be ", acc, ", got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == logits.device(), name, " is on ", t->device(), " but logits is on ",
                      logits.device());
  }
  TORCH_CHECK_VALUE(lse.is_contiguous(), "lse must be contiguous (it is the forward's output)");
}

// Columns of the optional per-token statistics (dpo_kernels.reference.STATS), in this order:
// sum_v z_v, the entropy, 1 where the label is the first index of the max logit (else 0), log sum_v exp(2 z_v).
constexpr int64_t kNumStats = 4;

// The dtype of the per-token outputs: fp64 logits are scored in fp64, everything else in fp32.
inline at::ScalarType output_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace dpo_kernels
