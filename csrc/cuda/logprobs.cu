// CUDA fallback of the log-prob ops, for GPUs or stacks where the Triton kernels cannot run. Same
// semantics as dpo_kernels/triton/logprobs.py (see ../common.h): per-token log-probs of the labels,
// the log-sum-exp saved for the backward as its two parts (m, log s), and the one-pass gradient
// w.r.t. the logits, exp((x - m) - log s) as the reference's log_softmax forms it (one rounded fp32
// m + log s would cost |lse| * 2^-24 relative error in every softmax value).
//
// One 256-thread block streams one logits row. A unit-stride row is read in 128-bit packs starting at
// its first 16-byte boundary, so rows of any length and offset (odd vocabularies such as 50257 or
// 32001) are vectorized; the few elements before that boundary and after the last pack take one
// thread each. Rows with any other vocabulary stride are read element by element. Everything is
// accumulated in fp32 (fp64 for fp64 logits) and all offsets are int64.
//
// The forward optionally returns per-token statistics from the same loads (a second instantiation of
// its kernel, kStats; see LogSumExpStats), so the default kernel is unchanged.
//
// Only ATen/c10 headers are included: torch/extension.h would make nvcc take minutes.
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include "../common.h"
#include "logprobs.h"

namespace dpo_kernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPackBytes = 16;

// fp64 logits are scored in fp64 (output_dtype in common.h); every other dtype in fp32.
template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Elements per 128-bit access, or 1 for the strided kernels.
template <typename scalar_t>
constexpr int kPack = kPackBytes / static_cast<int>(sizeof(scalar_t));

// Packs loaded before any is consumed: two 128-bit loads in flight per thread hide HBM latency at the
// occupancy these kernels get. Strided elements of 2 or 4 bytes keep four in flight; fp64 keeps two,
// as four inlined fp64 exp() would spill on sm_90.
template <typename scalar_t, int VEC>
constexpr int kUnroll = VEC > 1 || sizeof(scalar_t) == 8 ? 2 : 4;

// --------------------------------------------------------------------------------------------- math

// In fp32 e^x is 2^(x·log2 e) on MUFU.EX2, as Triton's tl.exp, but in its flush-to-zero form: exp2f
// rescales around subnormal results, which took the bf16 forward loop from 120 to 171 instructions
// per 16 logits on sm_90, too close to what the memory stream leaves at H100/H200 bandwidth (expf
// costs more still). Only results below 2^-126 are flushed: in the sum they sit next to the row
// max's term 1, and as gradients they are below 1e-38 |g|.
__device__ __forceinline__ float exp_acc(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
  return y;
}
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }
__device__ __forceinline__ float max_acc(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_acc(double a, double b) { return fmax(a, b); }

// A running log-sum-exp: the max m of the values seen and s = sum_i exp(x_i - ref(m)).
//
// ref(m) is m when it is finite and 0 otherwise. A thread that has seen nothing, or only -inf, holds
// (-inf, 0), and exp(m - ref) = exp(-inf) = 0 scales its s away instead of forming -inf - (-inf) = NaN
// (the naive exp(m - m_new)). A +inf logit drives s and the lse to +inf; a NaN logit makes s NaN
// (fmax ignores NaN, so the NaN travels in s, never in m).
template <typename acc>
struct LogSumExp {
  acc m = -std::numeric_limits<acc>::infinity();
  acc s = 0;

  __device__ __forceinline__ static acc ref(acc m) { return isinf(m) ? acc(0) : m; }

  // Adds K values at once: one rescale of s per K exponentials.
  template <int K>
  __device__ __forceinline__ void add(const acc (&x)[K]) {
    acc m_new = m;
#pragma unroll
    for (int k = 0; k < K; ++k) m_new = max_acc(m_new, x[k]);
    const acc r = ref(m_new);
    acc sum = s * exp_acc(m - r);
#pragma unroll
    for (int k = 0; k < K; ++k) sum += exp_acc(x[k] - r);
    m = m_new;
    s = sum;
  }

  // The union of two disjoint sets of values.
  __device__ __forceinline__ void merge(const LogSumExp& other) {
    const acc m_new = max_acc(m, other.m);
    const acc r = ref(m_new);
    s = s * exp_acc(m - r) + other.s * exp_acc(other.m - r);
    m = m_new;
  }

  // Lane (lane ^ offset)'s state.
  __device__ __forceinline__ LogSumExp shfl_xor(int offset) const {
    LogSumExp other;
    other.m = __shfl_xor_sync(0xffffffffu, m, offset);
    other.s = __shfl_xor_sync(0xffffffffu, s, offset);
    return other;
  }

  // log s of the two parts (m, log s) of log(sum_i exp(x_i)): -inf for an all -inf row (log 0, and m is
  // -inf), NaN where a logit is NaN (s) or +inf (the reference's inf - inf; here ref(inf) = 0 left s = inf).
  __device__ __forceinline__ acc log_sum() const {
    return m == std::numeric_limits<acc>::infinity() ? std::numeric_limits<acc>::quiet_NaN() : log_acc(s);
  }
  // Whether this (partial) state saw a NaN or +inf logit.
  __device__ __forceinline__ bool special() const { return isnan(s) || m == std::numeric_limits<acc>::infinity(); }
};

// LogSumExp plus the row statistics of the forward with_stats, kept around the same reference ref(m)
// and rescaled with s by the same factor a = exp(m - ref(m_new)) when the max moves:
//   s1 = sum_i e_i (x_i - ref(m)), e_i = exp(x_i - ref(m))  ->  entropy = lse - sum_i p_i x_i = log s - s1 / s
//        (when ref moves by d = ref(m) - ref(m_new) <= 0, each x_i - ref grows by d: s1 <- a (s1 + d s))
//   s2 = sum_i e_i^2                                          ->  lse2 = log sum_i exp(2 x_i) = 2 ref(m) + log s2
//        (rescaled by a^2)
//   sum = sum_i x_i, and violations: nonzero exactly when some v < y has x_v >= x_y or some v > y has
//   x_v > x_y, i.e. when the label y is not the first index of the max (exact: the comparisons are on the
//   stored values, widened without rounding; counted per pack, see add). Both are plain sums across
//   threads.
// s1 is relative to ref(m), not sum_i e_i x_i, so the entropy is not a difference of two terms as large
// as the logits' offset. A -inf logit adds e = 0 and 0 * lowest, not 0 * (-inf) = NaN; the empty state
// (-inf, 0, 0, 0) stays the identity of merge because ref(-inf) = 0 keeps (ref(m) - r) * s finite.
template <typename acc>
struct LogSumExpStats {
  acc m = -std::numeric_limits<acc>::infinity();
  acc s = 0;
  acc s1 = 0;
  acc s2 = 0;
  acc sum = 0;
  unsigned violations = 0;  // at most V < 2^32 in all

  __device__ __forceinline__ static acc ref(acc m) { return LogSumExp<acc>::ref(m); }

  // Adds U packs of VEC values, x[u * VEC + j] the logit of vocabulary entry v0(u) + j, against the
  // label's logit xy; before[u] = how many of pack u's values precede the label (0..VEC). The label is
  // voted on a pack at a time: a pack wholly before it violates if its max >= xy, one wholly after it
  // if its max > xy; only the pack that holds the label goes element by element.
  template <int U, int VEC>
  __device__ __forceinline__ void add(const acc (&x)[U * VEC], acc xy, const int (&before)[U]) {
    acc pack_max[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      pack_max[u] = x[u * VEC];
#pragma unroll
      for (int j = 1; j < VEC; ++j) pack_max[u] = max_acc(pack_max[u], x[u * VEC + j]);
    }
    acc m_new = m;
#pragma unroll
    for (int u = 0; u < U; ++u) m_new = max_acc(m_new, pack_max[u]);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (before[u] == 0) {
        violations += pack_max[u] > xy;
      } else if (before[u] == VEC) {
        violations += pack_max[u] >= xy;
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) violations += j < before[u] ? x[u * VEC + j] >= xy : x[u * VEC + j] > xy;
      }
    }
    const acc r = ref(m_new);
    const acc a = exp_acc(m - r);
    acc t = a * (s1 + (ref(m) - r) * s);
    acc sum_e = s * a;
    acc q = a * a * s2;
#pragma unroll
    for (int k = 0; k < U * VEC; ++k) {
      const acc d = x[k] - r;
      const acc e = exp_acc(d);
      sum_e += e;
      t += e * max_acc(d, std::numeric_limits<acc>::lowest());
      q += e * e;
      sum += x[k];
    }
    m = m_new;
    s = sum_e;
    s1 = t;
    s2 = q;
  }

  __device__ __forceinline__ void merge(const LogSumExpStats& o) {
    const acc m_new = max_acc(m, o.m);
    const acc r = ref(m_new);
    const acc a = exp_acc(m - r);
    const acc b = exp_acc(o.m - r);
    s1 = a * (s1 + (ref(m) - r) * s) + b * (o.s1 + (ref(o.m) - r) * o.s);
    s2 = a * a * s2 + b * b * o.s2;
    s = s * a + o.s * b;
    sum += o.sum;
    violations += o.violations;
    m = m_new;
  }

  __device__ __forceinline__ LogSumExpStats shfl_xor(int offset) const {
    LogSumExpStats o;
    o.m = __shfl_xor_sync(0xffffffffu, m, offset);
    o.s = __shfl_xor_sync(0xffffffffu, s, offset);
    o.s1 = __shfl_xor_sync(0xffffffffu, s1, offset);
    o.s2 = __shfl_xor_sync(0xffffffffu, s2, offset);
    o.sum = __shfl_xor_sync(0xffffffffu, sum, offset);
    o.violations = __shfl_xor_sync(0xffffffffu, violations, offset);
    return o;
  }

  __device__ __forceinline__ acc log_sum() const {
    return m == std::numeric_limits<acc>::infinity() ? std::numeric_limits<acc>::quiet_NaN() : log_acc(s);
  }
  __device__ __forceinline__ bool special() const { return isnan(s) || m == std::numeric_limits<acc>::infinity(); }

  // (sum_logits, entropy, top1, lse2) of the whole row, into out[0..3]. A row with a NaN or +inf logit
  // (special) gets the reference's values: nan_at is its first NaN (V: none), which torch.argmax ranks
  // above every value; its entropy is NaN, its lse2 NaN (a NaN) or +inf.
  __device__ __forceinline__ void store(acc* out, bool in_range, bool special, int64_t label, int64_t nan_at,
                                        int64_t V) const {
    const acc log_s = log_acc(s);
    out[0] = sum;
    out[1] = special ? std::numeric_limits<acc>::quiet_NaN() : log_s - s1 / s;
    bool top1 = in_range && violations == 0;
    if (special && nan_at < V) top1 = label == nan_at;
    out[2] = top1 ? acc(1) : acc(0);
    out[3] = !special ? 2 * ref(m) + log_acc(s2)
             : nan_at < V ? std::numeric_limits<acc>::quiet_NaN()
                          : std::numeric_limits<acc>::infinity();
  }
};

// The smallest index seen: the block's first NaN of a row (see LogSumExpStats::store).
struct MinIndex {
  int64_t v;
  __device__ __forceinline__ void merge(const MinIndex& o) { v = min(v, o.v); }
  __device__ __forceinline__ MinIndex shfl_xor(int offset) const {
    return {static_cast<int64_t>(__shfl_xor_sync(0xffffffffu, static_cast<long long>(v), offset))};
  }
};

// Butterfly within a warp: every lane ends with the warp's combined state.
template <typename State>
__device__ __forceinline__ void warp_reduce(State& state) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) state.merge(state.shfl_xor(offset));
}

// The block's combined state, valid in thread 0: butterfly within each warp, then warp 0 merges the
// kWarps partial states. Warp 0's lanes past kWarps bring the empty state, the identity of merge.
template <typename State>
__device__ __forceinline__ State block_reduce(State state, State identity = State()) {
  // Raw storage: a __shared__ State cannot have State's member initializers.
  __shared__ alignas(State) unsigned char storage[kWarps * sizeof(State)];
  State* warp_state = reinterpret_cast<State*>(storage);
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  warp_reduce(state);
  if (lane == 0) warp_state[warp] = state;
  __syncthreads();
  State block = identity;
  if (warp == 0) {
    if (lane < kWarps) block = warp_state[lane];
    warp_reduce(block);
  }
  return block;
}

// ------------------------------------------------------------------------------------------ row layout

// VEC consecutive elements, 16-byte aligned when VEC > 1 so that one access is one 128-bit instruction.
template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

// A row of V elements as [0, head) ++ nvec packs ++ [tail, V). With VEC > 1 (unit stride) the packs
// start at the row's first 16-byte boundary and head, V - tail < VEC: those at most 2 (VEC - 1) edge
// elements take one thread each. With VEC == 1 every element is a "pack" at v * stride_v.
struct RowSplit {
  int64_t head, nvec, tail;
};

template <int VEC, typename scalar_t>
__device__ __forceinline__ RowSplit split_row(const scalar_t* row, int64_t V) {
  if constexpr (VEC == 1) {
    return {0, V, V};
  } else {
    const int misaligned = static_cast<int>(reinterpret_cast<uintptr_t>(row) % kPackBytes / sizeof(scalar_t));
    const int64_t head = min(static_cast<int64_t>((VEC - misaligned) % VEC), V);
    const int64_t nvec = (V - head) / VEC;
    return {head, nvec, head + nvec * VEC};
  }
}

// The edge element of this thread (see RowSplit), or -1.
__device__ __forceinline__ int64_t edge_element(const RowSplit& split, int64_t V) {
  const int64_t tid = threadIdx.x;
  if (tid < split.head) return tid;
  const int64_t v = split.tail + (tid - split.head);
  return v < V ? v : -1;
}

// The vocabulary index of element 0 of pack i.
template <int VEC>
__device__ __forceinline__ int64_t pack_start(const RowSplit& split, int64_t i) {
  return split.head + i * VEC;
}

template <int VEC, typename scalar_t>
__device__ __forceinline__ Pack<scalar_t, VEC> load_pack(const scalar_t* row, const RowSplit& split, int64_t i,
                                                         int64_t stride_v) {
  if constexpr (VEC == 1) {
    return {row[i * stride_v]};
  } else {
    return reinterpret_cast<const Pack<scalar_t, VEC>*>(row + split.head)[i];
  }
}

template <int VEC, typename scalar_t>
__device__ __forceinline__ void store_pack(scalar_t* row, const RowSplit& split, int64_t i, int64_t stride_v,
                                           const Pack<scalar_t, VEC>& pack) {
  if constexpr (VEC == 1) {
    row[i * stride_v] = pack.v[0];
  } else {
    reinterpret_cast<Pack<scalar_t, VEC>*>(row + split.head)[i] = pack;
  }
}

// --------------------------------------------------------------------------------------------- kernels

// How many of the VEC elements starting at vocabulary index v0 lie before the label y, in [0, VEC].
template <int VEC>
__device__ __forceinline__ int before_label(int64_t y, int64_t v0) {
  return static_cast<int>(min(max(y - v0, int64_t{0}), static_cast<int64_t>(VEC)));
}

// Row r = n * T_out + t of the outputs, x = logits[n, t, :], y = labels[n, t + shift] - vocab_start (the
// label's column in the vocabulary window, see ../common.h):
//   lse[r] = (m, log s): m = max_v x_v, s = sum_v exp(x_v - m) (online),  logp[r] = (x_y - m) - log s.
// labels[n, t + shift] == ignore_index: both are 0 and x is not read. y outside [0, V) (a label the window
// does not own): x_y reads as 0, so logp = -(m + log s), and x is not read there.
// kStats: also stats[r, 0:4] = (sum_logits, entropy, top1, lse2) from the same loads (LogSumExpStats),
// zeros where the label is ignore_index and top1 = 0 where y is outside [0, V).
template <typename scalar_t, typename index_t, int VEC, bool kStats>
__global__ void __launch_bounds__(kThreads) token_logps_fwd_kernel(
    const scalar_t* __restrict__ logits,  // (N, T, V), strides geo.logits_{n,t,v}; unit vocab stride if VEC > 1
    const index_t* __restrict__ labels,   // (N, T), strides geo.labels_{n,t}
    acc_t<scalar_t>* __restrict__ logp,   // (N, T_out), contiguous
    acc_t<scalar_t>* __restrict__ lse,    // (N, T_out, 2), contiguous: (m, log s)
    acc_t<scalar_t>* __restrict__ stats,  // (N, T_out, 4), contiguous; unused unless kStats
    const RowGeometry geo, const int64_t ignore_index) {
  using acc = acc_t<scalar_t>;
  using State = std::conditional_t<kStats, LogSumExpStats<acc>, LogSumExp<acc>>;
  // The stats' three more fp64 accumulators left 2 packs of fp64 (4 inlined exp()) spilling 72 bytes
  // on sm_90: one pack at a time there.
  constexpr int U = kStats && sizeof(scalar_t) == 8 && VEC > 1 ? 1 : kUnroll<scalar_t, VEC>;
  const int64_t r = blockIdx.x;
  const int64_t n = r / geo.T_out;
  const int64_t t = r - n * geo.T_out;
  // Every thread reads the label (one broadcast transaction per warp), so a masked row leaves at once.
  const int64_t label = static_cast<int64_t>(labels[n * geo.labels_n + (t + geo.shift) * geo.labels_t]);
  if (label == ignore_index) {
    if (threadIdx.x == 0) {
      logp[r] = 0;
      lse[2 * r] = 0;
      lse[2 * r + 1] = 0;
      if constexpr (kStats) {
#pragma unroll
        for (int k = 0; k < kNumStats; ++k) stats[r * kNumStats + k] = 0;
      }
    }
    return;
  }
  const int64_t V = geo.V;
  const scalar_t* row = logits + n * geo.logits_n + t * geo.logits_t;
  // The column of the label, -1 where the window does not own it (in_range false; never read). Once per
  // row: the per-element code below is as without a window.
  const int64_t y = local_label(label, geo.vocab_start, V);
  const bool in_range = y >= 0;
  // Issued early. With stats every thread compares against it (one broadcast load per warp).
  acc x_label = 0;
  if ((kStats || threadIdx.x == 0) && in_range) x_label = static_cast<acc>(row[y * geo.logits_v]);

  State state;
  const RowSplit split = split_row<VEC>(row, V);
  int64_t i = threadIdx.x;
  for (; i + (U - 1) * kThreads < split.nvec; i += U * kThreads) {
    Pack<scalar_t, VEC> packs[U];
#pragma unroll
    for (int u = 0; u < U; ++u) packs[u] = load_pack<VEC>(row, split, i + u * kThreads, geo.logits_v);
    acc x[U * VEC];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int j = 0; j < VEC; ++j) x[u * VEC + j] = static_cast<acc>(packs[u].v[j]);
    if constexpr (kStats) {
      int before[U];
#pragma unroll
      for (int u = 0; u < U; ++u) before[u] = before_label<VEC>(y, pack_start<VEC>(split, i + u * kThreads));
      state.template add<U, VEC>(x, x_label, before);
    } else {
      state.add(x);
    }
  }
  for (; i < split.nvec; i += kThreads) {
    const Pack<scalar_t, VEC> pack = load_pack<VEC>(row, split, i, geo.logits_v);
    acc x[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) x[j] = static_cast<acc>(pack.v[j]);
    if constexpr (kStats) {
      const int before[1] = {before_label<VEC>(y, pack_start<VEC>(split, i))};
      state.template add<1, VEC>(x, x_label, before);
    } else {
      state.add(x);
    }
  }
  if constexpr (VEC > 1) {
    const int64_t v = edge_element(split, V);
    if (v >= 0) {
      const acc x[1] = {static_cast<acc>(row[v])};
      if constexpr (kStats) {
        const int before[1] = {v < y};
        state.template add<1, 1>(x, x_label, before);
      } else {
        state.add(x);
      }
    }
  }

  // A NaN or +inf logit anywhere in the row (rare): the statistics need its first NaN, found by a
  // second read of the row rather than in the loop. The vote is block-wide, so the branch is uniform.
  bool special = false;
  if constexpr (kStats) special = __syncthreads_or(state.special());
  state = block_reduce(state);
  MinIndex nan_at{V};
  if constexpr (kStats) {
    if (special) {
      for (int64_t v = threadIdx.x; v < V; v += kThreads) {
        const acc z = static_cast<acc>(row[v * geo.logits_v]);
        if (z != z) {
          nan_at.v = v;
          break;
        }
      }
      nan_at = block_reduce(nan_at, MinIndex{V});
    }
  }
  if (threadIdx.x == 0) {
    const acc log_s = state.log_sum();
    logp[r] = (x_label - state.m) - log_s;  // x_label = 0 where the window does not own the label
    lse[2 * r] = state.m;
    lse[2 * r + 1] = log_s;
    if constexpr (kStats) state.store(stats + r * kNumStats, in_range, special, y, nan_at.v, V);
  }
}

// Row r = n * T + t of the gradient (every logits row), x = logits[n, t, :], y = labels[n, t + shift] -
// vocab_start (outside [0, V), no one-hot term, where the window does not own the label):
//   grad[n, t, v] = g * ((v == y) - exp((x_v - m) - log s)),  (m, log s) = lse[n, t],  g = grad_logp[n, t],
// computed in fp32 (fp64) and rounded once to the logits' dtype. (m, log s) is taken as given: for a
// window, the whole vocabulary's, so the row is the window's columns of the whole gradient. Rows with t >= T_out or
// y == ignore_index are zeros and x is not read. Each element is read once and written once, by the
// same thread and read first, so grad may be the logits themselves. A NaN log s (a NaN or +inf logit)
// or m = -inf (an all -inf row) makes the whole row NaN, as in the reference.
template <typename scalar_t, typename index_t, int VEC>
__global__ void __launch_bounds__(kThreads) token_logps_bwd_kernel(
    scalar_t* grad,          // (N, T, V), strides (grad_n, grad_t, grad_v); may alias logits: no __restrict__
    const scalar_t* logits,  // (N, T, V), strides geo.logits_{n,t,v}; if VEC > 1 both have unit vocab
                             // stride and every logits row starts at grad's row address mod 16 bytes
    const index_t* __restrict__ labels,              // (N, T), strides geo.labels_{n,t}
    const acc_t<scalar_t>* __restrict__ grad_logp,   // (N, T_out), strides (grad_logp_n, grad_logp_t), 0 allowed
    const acc_t<scalar_t>* __restrict__ lse,         // (N, T_out, 2), contiguous, from the forward: (m, log s)
    const RowGeometry geo, const int64_t grad_n, const int64_t grad_t, const int64_t grad_v,
    const int64_t grad_logp_n, const int64_t grad_logp_t, const int64_t ignore_index) {
  using acc = acc_t<scalar_t>;
  constexpr int U = kUnroll<scalar_t, VEC>;
  const int64_t r = blockIdx.x;
  const int64_t n = r / geo.T;
  const int64_t t = r - n * geo.T;
  const int64_t V = geo.V;
  const int64_t label =
      t < geo.T_out ? static_cast<int64_t>(labels[n * geo.labels_n + (t + geo.shift) * geo.labels_t]) : ignore_index;
  scalar_t* out = grad + n * grad_n + t * grad_t;
  // The packs are aligned for out; the launcher guarantees the logits row shares that alignment.
  const RowSplit split = split_row<VEC>(out, V);
  const int64_t edge = VEC > 1 ? edge_element(split, V) : -1;

  if (label == ignore_index) {
    Pack<scalar_t, VEC> zeros;
#pragma unroll
    for (int j = 0; j < VEC; ++j) zeros.v[j] = static_cast<scalar_t>(0);
    for (int64_t i = threadIdx.x; i < split.nvec; i += kThreads) store_pack<VEC>(out, split, i, grad_v, zeros);
    if (edge >= 0) out[edge] = static_cast<scalar_t>(0);
    return;
  }

  const acc g = grad_logp[n * grad_logp_n + t * grad_logp_t];
  const acc row_m = lse[2 * (n * geo.T_out + t)];
  const acc row_log_s = lse[2 * (n * geo.T_out + t) + 1];
  const scalar_t* row = logits + n * geo.logits_n + t * geo.logits_t;
  // The label's column as label - vocab_start mod 2^64: equal to a column v in [0, V) exactly when the
  // window owns the label, since check_logits_labels keeps vocab_start + V <= 2^63 (no wrapped
  // difference can land in [0, V)). Not local_label's -1 sentinel: its select left the fp64 strided
  // kernel spilling 16 bytes on sm_90.
  const uint64_t y = static_cast<uint64_t>(label) - static_cast<uint64_t>(geo.vocab_start);
  // g - g·p at the label and -g·p elsewhere, as the Triton kernel rounds it.
  auto grad_of = [&](scalar_t x, int64_t v) -> scalar_t {
    const acc gp = g * exp_acc((static_cast<acc>(x) - row_m) - row_log_s);
    return static_cast<scalar_t>(static_cast<uint64_t>(v) == y ? g - gp : -gp);
  };

  int64_t i = threadIdx.x;
  for (; i + (U - 1) * kThreads < split.nvec; i += U * kThreads) {
    Pack<scalar_t, VEC> packs[U];
#pragma unroll
    for (int u = 0; u < U; ++u) packs[u] = load_pack<VEC>(row, split, i + u * kThreads, geo.logits_v);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t v0 = pack_start<VEC>(split, i + u * kThreads);
#pragma unroll
      for (int j = 0; j < VEC; ++j) packs[u].v[j] = grad_of(packs[u].v[j], v0 + j);
      store_pack<VEC>(out, split, i + u * kThreads, grad_v, packs[u]);
    }
  }
  for (; i < split.nvec; i += kThreads) {
    Pack<scalar_t, VEC> pack = load_pack<VEC>(row, split, i, geo.logits_v);
    const int64_t v0 = pack_start<VEC>(split, i);
#pragma unroll
    for (int j = 0; j < VEC; ++j) pack.v[j] = grad_of(pack.v[j], v0 + j);
    store_pack<VEC>(out, split, i, grad_v, pack);
  }
  if (edge >= 0) out[edge] = grad_of(row[edge], edge);
}

// -------------------------------------------------------------------------------------------- launchers

bool element_aligned(const void* p, size_t size) { return reinterpret_cast<uintptr_t>(p) % size == 0; }

// blockIdx.x indexes rows.
void check_rows(int64_t rows) {
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), "dpo_kernels: ", rows,
              " logits rows exceed the CUDA kernels' grid limit of 2^31 - 1");
}

template <typename scalar_t, typename index_t, bool kStats>
void launch_fwd(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& logp, const at::Tensor& lse,
                const at::Tensor& stats, const RowGeometry& geo, int64_t rows, int64_t ignore_index) {
  const auto* x = logits.const_data_ptr<scalar_t>();
  const auto* y = labels.const_data_ptr<index_t>();
  auto* logp_ptr = logp.mutable_data_ptr<acc_t<scalar_t>>();
  auto* lse_ptr = lse.mutable_data_ptr<acc_t<scalar_t>>();
  auto* stats_ptr = kStats ? stats.mutable_data_ptr<acc_t<scalar_t>>() : nullptr;
  const auto stream = at::cuda::getCurrentCUDAStream();
  // Unit vocab stride is all the packed kernel needs: split_row finds each row's 16-byte boundary.
  const bool packed = geo.logits_v == 1 && element_aligned(x, sizeof(scalar_t));
  if (packed) {
    token_logps_fwd_kernel<scalar_t, index_t, kPack<scalar_t>, kStats><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        x, y, logp_ptr, lse_ptr, stats_ptr, geo, ignore_index);
  } else {
    token_logps_fwd_kernel<scalar_t, index_t, 1, kStats><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        x, y, logp_ptr, lse_ptr, stats_ptr, geo, ignore_index);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename index_t>
void launch_bwd(const at::Tensor& grad_logp, const at::Tensor& logits, const at::Tensor& labels,
                const at::Tensor& lse, const at::Tensor& out, const RowGeometry& geo, int64_t rows,
                int64_t ignore_index) {
  // For in-place, out is logits: read the pointer through the mutable accessor once.
  auto* g = out.mutable_data_ptr<scalar_t>();
  const auto* x = logits.is_same(out) ? g : logits.const_data_ptr<scalar_t>();
  const auto* y = labels.const_data_ptr<index_t>();
  const auto* dy = grad_logp.const_data_ptr<acc_t<scalar_t>>();
  const auto* lse_ptr = lse.const_data_ptr<acc_t<scalar_t>>();
  const int64_t out_n = out.stride(0), out_t = out.stride(1), out_v = out.stride(2);
  const auto stream = at::cuda::getCurrentCUDAStream();
  // The packs are aligned for the gradient row, so the logits row must sit at the same address mod 16
  // bytes in every row: equal base offsets and row strides that differ by whole packs (empty_like and
  // in-place give identical strides). A dimension of size 1 never moves the row.
  const int64_t bytes = sizeof(scalar_t);
  const auto congruent = [](int64_t byte_delta) { return byte_delta % kPackBytes == 0; };
  const bool packed = geo.logits_v == 1 && out_v == 1 && element_aligned(x, sizeof(scalar_t)) &&
                      element_aligned(g, sizeof(scalar_t)) &&
                      congruent(static_cast<int64_t>(reinterpret_cast<uintptr_t>(g) - reinterpret_cast<uintptr_t>(x))) &&
                      (geo.N == 1 || congruent((out_n - geo.logits_n) * bytes)) &&
                      (geo.T == 1 || congruent((out_t - geo.logits_t) * bytes));
  // grad_logp's strides are taken as given: a (N, T_out) expand has zero strides.
  const int64_t dn = grad_logp.stride(0), dt = grad_logp.stride(1);
  if (packed) {
    token_logps_bwd_kernel<scalar_t, index_t, kPack<scalar_t>><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        g, x, y, dy, lse_ptr, geo, out_n, out_t, out_v, dn, dt, ignore_index);
  } else {
    token_logps_bwd_kernel<scalar_t, index_t, 1><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        g, x, y, dy, lse_ptr, geo, out_n, out_t, out_v, dn, dt, ignore_index);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Writes the gradient into out (a fresh tensor or the logits themselves); arguments already checked.
void token_logps_bwd_into(const at::Tensor& grad_logp, const at::Tensor& logits, const at::Tensor& labels,
                          const at::Tensor& lse, int64_t ignore_index, bool shift, int64_t vocab_start,
                          const at::Tensor& out) {
  const RowGeometry geo = row_geometry(logits, labels, shift, vocab_start);
  // Every logits row gets a gradient row, the unscored ones zeros; with T_out == 0 that is all of them
  // and grad_logp / lse (empty, perhaps null) are never read.
  const int64_t rows = geo.N * geo.T;
  if (rows == 0) return;
  check_rows(rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "token_logps_bwd", [&] {
    AT_DISPATCH_INDEX_TYPES(labels.scalar_type(), "token_logps_bwd", [&] {
      launch_bwd<scalar_t, index_t>(grad_logp, logits, labels, lse, out, geo, rows, ignore_index);
    });
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logps_fwd(const at::Tensor& logits, const at::Tensor& labels,
                                                               int64_t ignore_index, bool shift, bool with_stats,
                                                               int64_t vocab_start) {
  check_logits_labels(logits, labels, vocab_start);
  const c10::cuda::CUDAGuard guard(logits.device());
  const RowGeometry geo = row_geometry(logits, labels, shift, vocab_start);
  const auto options = logits.options().dtype(output_dtype(logits));
  at::Tensor logp = at::empty({geo.N, geo.T_out}, options);
  at::Tensor lse = at::empty({geo.N, geo.T_out, 2}, options);
  at::Tensor stats = at::empty({geo.N, geo.T_out, with_stats ? kNumStats : 0}, options);
  const int64_t rows = geo.N * geo.T_out;
  if (rows == 0) return {logp, lse, stats};
  check_rows(rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "token_logps_fwd", [&] {
    AT_DISPATCH_INDEX_TYPES(labels.scalar_type(), "token_logps_fwd", [&] {
      if (with_stats) {
        launch_fwd<scalar_t, index_t, true>(logits, labels, logp, lse, stats, geo, rows, ignore_index);
      } else {
        launch_fwd<scalar_t, index_t, false>(logits, labels, logp, lse, stats, geo, rows, ignore_index);
      }
    });
  });
  return {logp, lse, stats};
}

at::Tensor token_logps_bwd(const at::Tensor& grad_logp, const at::Tensor& logits, const at::Tensor& labels,
                           const at::Tensor& lse, int64_t ignore_index, bool shift, int64_t vocab_start) {
  check_backward(grad_logp, logits, labels, lse, shift, vocab_start);
  const c10::cuda::CUDAGuard guard(logits.device());
  // empty_like keeps the strides of dense logits; the kernel takes the gradient's strides either way.
  at::Tensor grad = at::empty_like(logits);
  token_logps_bwd_into(grad_logp, logits, labels, lse, ignore_index, shift, vocab_start, grad);
  return grad;
}

void token_logps_bwd_(const at::Tensor& grad_logp, const at::Tensor& logits, const at::Tensor& labels,
                      const at::Tensor& lse, int64_t ignore_index, bool shift, int64_t vocab_start) {
  check_backward(grad_logp, logits, labels, lse, shift, vocab_start);
  // Rows that share memory (an expanded logits) would be read after another row wrote them.
  at::assert_no_internal_overlap(logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  token_logps_bwd_into(grad_logp, logits, labels, lse, ignore_index, shift, vocab_start, logits);
}

}  // namespace dpo_kernels::cuda
