// CPU log-prob kernels. This file is compiled once per CPU capability (DEFAULT, AVX2, AVX512) with
// that capability's flags and -DCPU_CAPABILITY=<name>, so at::vec::Vectorized is the real vector type
// in each copy; logprobs.cpp picks the copy the running CPU supports (as ATen's own kernels do).
//
//   forward   logp[n, t] = (x[label] - m) - log s,  m = max_v x_v,  s = sum_v exp(x_v - m),  x = logits[n, t]
//             lse[n, t] = (m, log s): kept apart, never rounded to one fp32 m + log s
//   backward  grad[n, t, v] = g[n, t] * ((v == label) - exp((x_v - m) - log s))
//
// label is the row's column in the vocabulary window (common.h): its global id minus vocab_start, found
// once per row. Where the window does not own the global id it is -1 (x[label] reads as 0, top1 is 0,
// no one-hot term), so the per-element loops are the same as without a window. The backward takes
// (m, log s) as given: for a window, the whole vocabulary's.
//
// The softmax is formed as the reference's log_softmax forms it: exp(x - fl(m + log s)) would carry the
// rounding of the sum, |lse| * 2^-24 relative (6e-5 at logits of size 1000).
//
// Special values as in the reference: a NaN or +inf logit makes the row's log s NaN (the reference's
// x - max is NaN or inf - inf), so its log-prob and whole gradient row are NaN; an all -inf row has
// m = -inf, so x[label] - m and its gradient are NaN. The max propagates NaN (max_nan), and rows
// whose m is not finite are finished here rather than through the vectorized exp, whose polynomial
// need not propagate NaN.
//
// With stats (template flag kStats, only when the caller asks), the same pass over the row also keeps,
// rescaled with s whenever the running max m moves (e_v = exp(x_v - m)):
//   s1 = sum_v e_v (x_v - m)  ->  entropy = lse - sum_v p_v x_v = log s - s1 / s
//   s2 = sum_v e_v^2          ->  lse2 = log sum_v exp(2 x_v) = 2 m + log s2
//   sum_v x_v, and the violations #{v < y: x_v >= x_y} + #{v > y: x_v > x_y}: the label y is the first
//   index of the maximum exactly when there are none (top1), with no argmax.
// s1 is kept relative to m (not sum_v e_v x_v) so that the entropy is not the difference of two values
// of the size of the logits' offset; the -inf logits add e_v = 0 and no NaN (their x_v - m is clamped).
//
// Work is split over the scored rows only (a compacted list), so masked prompt rows cost nothing and
// both threads get the same number of rows whatever the mask looks like.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <limits>
#include <vector>

#include "../common.h"

#ifndef CPU_CAPABILITY
#error "compile this file with -DCPU_CAPABILITY=DEFAULT|AVX2|AVX512"
#endif

namespace dpo_kernels::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;
using fVec = Vectorized<float>;

// 4096 fp32 values = 16 KiB: a tile converted to fp32 stays in L1 for its second (exp) pass, so the
// logits are read from memory once while the max and the sum each get a vectorized pass.
constexpr int64_t kTile = 4096;

// max that returns a NaN argument (std::max(a, NaN) returns a).
template <typename T>
inline T max_nan(T a, T b) {
  return (a > b || a != a) ? a : b;
}

// The two parts (m, log s) of a row's log-sum-exp, from its max m and s = sum_v exp(x_v - m) (s = 0 for
// an all -inf row: log s = -inf). A NaN or +inf max (or a NaN s) gives log s = NaN, as in the reference.
template <typename acc_t>
struct LsePair {
  acc_t m, log_s;
  bool special() const { return !(m < std::numeric_limits<acc_t>::infinity()) || log_s != log_s; }
};

template <typename acc_t>
inline LsePair<acc_t> finish_lse(acc_t m, acc_t s) {
  const bool special = !(m < std::numeric_limits<acc_t>::infinity()) || s != s;
  return {m, special ? std::numeric_limits<acc_t>::quiet_NaN() : std::log(s)};
}

// A row with a NaN or +inf logit: the index of its first NaN, V if it has none. Read only for such
// rows (the reference's argmax ranks NaN above every value, and its logsumexp(2 z) is NaN or +inf).
template <typename scalar_t, typename acc_t>
int64_t first_nan(const scalar_t* row, int64_t V, int64_t stride) {
  for (int64_t v = 0; v < V; ++v) {
    const acc_t z = static_cast<acc_t>(row[v * stride]);
    if (z != z) return v;
  }
  return V;
}

// Loads fVec::size() values starting at p as fp32. 16-bit types are converted in pairs of vectors by
// the caller; this is the fp32 case and the scalar fallback for the tail.
template <typename scalar_t>
inline void tile_to_float(const scalar_t* p, int64_t n, float* out) {
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (; i + fVec::size() <= n; i += fVec::size()) fVec::loadu(p + i).store(out + i);
  } else {
    using sVec = Vectorized<scalar_t>;
    for (; i + sVec::size() <= n; i += sVec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(sVec::loadu(p + i));
      lo.store(out + i);
      hi.store(out + i + fVec::size());
    }
  }
  for (; i < n; ++i) out[i] = static_cast<float>(p[i]);
}

inline float tile_max(const float* x, int64_t n) {
  int64_t i = 0;
  float m = -std::numeric_limits<float>::infinity();
  if (n >= fVec::size()) {
    fVec vm(-std::numeric_limits<float>::infinity());
    for (; i + fVec::size() <= n; i += fVec::size()) vm = at::vec::maximum(vm, fVec::loadu(x + i));
    m = at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return at::vec::maximum(a, b); }, vm);
  }
  for (; i < n; ++i) m = max_nan(m, x[i]);
  return m;
}

inline float tile_sum_exp(const float* x, int64_t n, float m) {
  int64_t i = 0;
  const fVec vm(m);
  fVec vs(0.f);
  for (; i + fVec::size() <= n; i += fVec::size()) vs += (fVec::loadu(x + i) - vm).exp_u20();
  float s = at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, vs);
  for (; i < n; ++i) s += std::exp(x[i] - m);
  return s;
}

// The statistics of a row (see the top of the file) in the accumulation type.
template <typename acc_t>
struct RowStats {
  acc_t sum = 0;       // sum_v x_v
  acc_t s1 = 0;        // sum_v exp(x_v - m) (x_v - m)
  acc_t s2 = 0;        // sum_v exp(2 (x_v - m))
  int64_t violations = 0;  // the v that beat the label (see above)

  // Rescales s1 and s2 (whose partner s the caller rescales) from the reference m to m_new >= m.
  // s is the sum before its rescale. From m = -inf (nothing finite seen) all three are 0.
  void rescale(acc_t m, acc_t m_new, acc_t s) {
    if (m == m_new || m == -std::numeric_limits<acc_t>::infinity()) return;
    const acc_t a = std::exp(m - m_new);
    s1 = a * (s1 + (m - m_new) * s);
    s2 = a * a * s2;
  }

  // Writes (sum_logits, entropy, top1, lse2) given the row's m (finite, or -inf for an all -inf row)
  // and s. For a row with a NaN or +inf logit (lse.special()), nan_at is the index of its first NaN
  // (V: none), from first_nan: the reference's top-1 is then that NaN, its entropy NaN, its lse2 NaN
  // (a NaN) or +inf.
  void store(acc_t* out, acc_t m, acc_t s, bool in_range, const LsePair<acc_t>& lse, int64_t label, int64_t nan_at,
             int64_t V) const {
    const acc_t ref = std::isinf(m) ? acc_t(0) : m;
    out[0] = sum;
    out[1] = std::log(s) - s1 / s;
    out[2] = in_range && violations == 0 ? acc_t(1) : acc_t(0);
    out[3] = 2 * ref + std::log(s2);
    if (lse.special()) {
      out[1] = std::numeric_limits<acc_t>::quiet_NaN();
      if (nan_at < V) out[2] = label == nan_at ? acc_t(1) : acc_t(0);
      out[3] = nan_at < V ? std::numeric_limits<acc_t>::quiet_NaN() : std::numeric_limits<acc_t>::infinity();
    }
  }
};

// tile_max plus, in the same pass, the tile's sum and violations. y is the label's index relative to
// the tile (any value), zy its logit.
inline float tile_max_stats(const float* x, int64_t n, int64_t y, float zy, RowStats<float>& st) {
  const int64_t split = std::clamp<int64_t>(y, 0, n);  // [0, split): before the label, ties count
  const fVec vzy(zy);
  fVec vm(-std::numeric_limits<float>::infinity()), vsum(0.f), vviol(0.f);  // exact counts: < 2^24 a lane
  float m = -std::numeric_limits<float>::infinity(), sum = 0.f;
  int64_t viol = 0;
  int64_t i = 0;
  for (; i + fVec::size() <= split; i += fVec::size()) {
    const fVec v = fVec::loadu(x + i);
    vm = at::vec::maximum(vm, v);
    vsum += v;
    vviol += v.ge(vzy);
  }
  for (; i < split; ++i) {
    m = max_nan(m, x[i]);
    sum += x[i];
    viol += x[i] >= zy;
  }
  for (; i + fVec::size() <= n; i += fVec::size()) {
    const fVec v = fVec::loadu(x + i);
    vm = at::vec::maximum(vm, v);
    vsum += v;
    vviol += v.gt(vzy);
  }
  for (; i < n; ++i) {
    m = max_nan(m, x[i]);
    sum += x[i];
    viol += x[i] > zy;
  }
  const auto add = [](fVec& a, fVec& b) { return a + b; };
  m = max_nan(m, at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return at::vec::maximum(a, b); }, vm));
  st.sum += sum + at::vec::vec_reduce_all<float>(add, vsum);
  st.violations += viol + static_cast<int64_t>(at::vec::vec_reduce_all<float>(add, vviol));
  return m;
}

// tile_sum_exp (the same s, summed in the same order) plus the tile's s1 and s2 around m.
inline float tile_sum_exp_stats(const float* x, int64_t n, float m, float& s1, float& s2) {
  int64_t i = 0;
  const fVec vm(m), vlow(std::numeric_limits<float>::lowest());
  fVec vs(0.f), vs1(0.f), vs2(0.f);
  for (; i + fVec::size() <= n; i += fVec::size()) {
    const fVec d = fVec::loadu(x + i) - vm;
    const fVec e = d.exp_u20();
    vs += e;
    vs1 = at::vec::fmadd(e, at::vec::maximum(d, vlow), vs1);  // -inf logits: 0 * lowest, not 0 * -inf
    vs2 = at::vec::fmadd(e, e, vs2);
  }
  const auto add = [](fVec& a, fVec& b) { return a + b; };
  float s = at::vec::vec_reduce_all<float>(add, vs);
  float t1 = at::vec::vec_reduce_all<float>(add, vs1);
  float t2 = at::vec::vec_reduce_all<float>(add, vs2);
  for (; i < n; ++i) {
    const float d = x[i] - m;
    const float e = std::exp(d);
    s += e;
    t1 += e * std::max(d, std::numeric_limits<float>::lowest());
    t2 += e * e;
  }
  s1 += t1;
  s2 += t2;
  return s;
}

// Online log-sum-exp of a contiguous row over fp32 tiles: one read of the row from memory. With
// kStats, also the row's statistics (label y, its logit zy), from the same tiles.
template <bool kStats, typename scalar_t>
LsePair<float> row_lse_contiguous(const scalar_t* row, int64_t V, float* tile, RowStats<float>* st = nullptr,
                                  int64_t y = 0, float zy = 0.f, float* m_out = nullptr, float* s_out = nullptr) {
  float m = -std::numeric_limits<float>::infinity();
  float s = 0.f;
  for (int64_t start = 0; start < V; start += kTile) {
    const int64_t n = std::min(kTile, V - start);
    const float* x = tile;
    if constexpr (std::is_same_v<scalar_t, float>) {
      x = row + start;
    } else {
      tile_to_float(row + start, n, tile);
    }
    float m_new;
    if constexpr (kStats) {
      m_new = max_nan(m, tile_max_stats(x, n, y - start, zy, *st));  // sums and counts -inf tiles too
    } else {
      m_new = max_nan(m, tile_max(x, n));
    }
    if (m_new == -std::numeric_limits<float>::infinity()) continue;  // nothing but -inf so far
    if constexpr (kStats) {
      st->rescale(m, m_new, s);
      s = (m == m_new ? s : s * std::exp(m - m_new)) + tile_sum_exp_stats(x, n, m_new, st->s1, st->s2);
    } else {
      s = (m == m_new ? s : s * std::exp(m - m_new)) + tile_sum_exp(x, n, m_new);
    }
    m = m_new;
  }
  if constexpr (kStats) {
    *m_out = m;
    *s_out = s;
  }
  return finish_lse(m, s);
}

// grad = -g * exp((x - m) - log s) over a contiguous row (finite m and log s), stored in the logits'
// dtype; the caller fixes the label's element. In place when out == row: every element is read before
// it is written.
template <typename scalar_t>
void row_grad_contiguous(const scalar_t* row, scalar_t* out, int64_t V, LsePair<float> lse, float g) {
  const fVec vm(lse.m), vlog_s(lse.log_s), vneg_g(-g);
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (; i + fVec::size() <= V; i += fVec::size())
      (((fVec::loadu(row + i) - vm) - vlog_s).exp_u20() * vneg_g).store(out + i);
  } else {
    using sVec = Vectorized<scalar_t>;
    for (; i + sVec::size() <= V; i += sVec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(sVec::loadu(row + i));
      lo = ((lo - vm) - vlog_s).exp_u20() * vneg_g;
      hi = ((hi - vm) - vlog_s).exp_u20() * vneg_g;
      at::vec::convert_from_float<scalar_t>(lo, hi).store(out + i);
    }
  }
  for (; i < V; ++i) out[i] = static_cast<scalar_t>(-g * std::exp((static_cast<float>(row[i]) - lse.m) - lse.log_s));
}

// Any vocabulary stride, and fp64: plain scalar loops in the accumulation type.
template <typename scalar_t, typename acc_t>
LsePair<acc_t> row_lse_strided(const scalar_t* row, int64_t V, int64_t stride) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t v = 0; v < V; ++v) m = max_nan(m, static_cast<acc_t>(row[v * stride]));
  const acc_t ref = m == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : m;  // all -inf: s = 0, not NaN
  acc_t s = 0;
  for (int64_t v = 0; v < V; ++v) s += std::exp(static_cast<acc_t>(row[v * stride]) - ref);
  return finish_lse(m, s);
}

// row_lse_strided with the statistics: the same two passes, the first also summing and counting.
// Returns the lse; the stats go to out (4 values).
template <typename scalar_t, typename acc_t>
LsePair<acc_t> row_lse_stats_strided(const scalar_t* row, int64_t V, int64_t stride, int64_t y, bool in_range,
                                     acc_t* out) {
  const acc_t zy = in_range ? static_cast<acc_t>(row[y * stride]) : acc_t(0);
  RowStats<acc_t> st;
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t v = 0; v < V; ++v) {
    const acc_t z = static_cast<acc_t>(row[v * stride]);
    m = max_nan(m, z);
    st.sum += z;
    st.violations += v < y ? z >= zy : z > zy;
  }
  const acc_t ref = std::isinf(m) ? acc_t(0) : m;  // an all -inf row: s = 0 and lse = -inf, not NaN
  acc_t s = 0;
  for (int64_t v = 0; v < V; ++v) {
    const acc_t d = static_cast<acc_t>(row[v * stride]) - ref;
    const acc_t e = std::exp(d);
    s += e;
    st.s1 += e * std::max(d, std::numeric_limits<acc_t>::lowest());
    st.s2 += e * e;
  }
  const LsePair<acc_t> lse = finish_lse(m, s);
  st.store(out, m, s, in_range, lse, y, lse.special() ? first_nan<scalar_t, acc_t>(row, V, stride) : V, V);
  return lse;
}

template <typename scalar_t, typename acc_t>
void row_grad_strided(const scalar_t* row, int64_t row_stride, scalar_t* out, int64_t out_stride, int64_t V,
                      LsePair<acc_t> lse, acc_t g) {
  for (int64_t v = 0; v < V; ++v)
    out[v * out_stride] =
        static_cast<scalar_t>(-g * std::exp((static_cast<acc_t>(row[v * row_stride]) - lse.m) - lse.log_s));
}

template <typename scalar_t>
constexpr bool kVectorized = !std::is_same_v<scalar_t, double>;

// Flat ids n * T + t of the logits rows that are scored, and of those that are not.
template <typename label_t>
void split_rows(const RowGeometry& g, const label_t* labels, int64_t ignore_index, std::vector<int64_t>& scored,
                std::vector<int64_t>* unscored) {
  for (int64_t n = 0; n < g.N; ++n) {
    for (int64_t t = 0; t < g.T; ++t) {
      const bool is_scored =
          t < g.T_out && static_cast<int64_t>(labels[n * g.labels_n + (t + g.shift) * g.labels_t]) != ignore_index;
      if (is_scored) {
        scored.push_back(n * g.T + t);
      } else if (unscored) {
        unscored->push_back(n * g.T + t);
      }
    }
  }
}

// Rows of about this many logits per task: fewer tasks than rows for a small V, one row for a large V.
inline int64_t grain_rows(int64_t V) { return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(V, 1)); }

// stats: (N, T_out, 4) contiguous when kStats, else unused.
template <bool kStats, typename scalar_t, typename label_t>
void forward(const RowGeometry& g, const at::Tensor& logits, const at::Tensor& labels, at::Tensor& logp,
             at::Tensor& lse, at::Tensor& stats, int64_t ignore_index) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  const label_t* y = labels.const_data_ptr<label_t>();
  acc_t* out_logp = logp.mutable_data_ptr<acc_t>();
  acc_t* out_lse = lse.mutable_data_ptr<acc_t>();
  acc_t* out_stats = kStats ? stats.mutable_data_ptr<acc_t>() : nullptr;
  std::vector<int64_t> rows;
  split_rows(g, y, ignore_index, rows, nullptr);
  const bool contiguous = g.logits_v == 1;
  at::parallel_for(0, static_cast<int64_t>(rows.size()), grain_rows(g.V), [&](int64_t begin, int64_t end) {
    std::vector<float> tile(kVectorized<scalar_t> && contiguous ? kTile : 0);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = rows[i] / g.T, t = rows[i] % g.T;
      const scalar_t* row = x + n * g.logits_n + t * g.logits_t;
      const int64_t label =
          local_label(static_cast<int64_t>(y[n * g.labels_n + (t + g.shift) * g.labels_t]), g.vocab_start, g.V);
      const bool in_range = label >= 0;  // the window owns the label
      const int64_t out = n * g.T_out + t;
      LsePair<acc_t> row_lse;
      if constexpr (kStats) {
        acc_t* row_stats = out_stats + out * 4;
        bool done = false;
        if constexpr (kVectorized<scalar_t>) {  // acc_t is float
          if (contiguous) {
            RowStats<float> st;
            float m, s;
            const float zy = in_range ? static_cast<float>(row[label]) : 0.f;
            row_lse = row_lse_contiguous<true>(row, g.V, tile.data(), &st, label, zy, &m, &s);
            const int64_t nan_at = row_lse.special() ? first_nan<scalar_t, float>(row, g.V, 1) : g.V;
            st.store(row_stats, m, s, in_range, row_lse, label, nan_at, g.V);
            done = true;
          }
        }
        if (!done) row_lse = row_lse_stats_strided<scalar_t, acc_t>(row, g.V, g.logits_v, label, in_range, row_stats);
      } else if constexpr (kVectorized<scalar_t>) {
        row_lse = contiguous ? row_lse_contiguous<false>(row, g.V, tile.data())
                             : row_lse_strided<scalar_t, acc_t>(row, g.V, g.logits_v);
      } else {
        row_lse = row_lse_strided<scalar_t, acc_t>(row, g.V, g.logits_v);
      }
      out_lse[2 * out] = row_lse.m;
      out_lse[2 * out + 1] = row_lse.log_s;
      // A label the window does not own scores as a logit of 0: -lse, which the shards' merge expects.
      const acc_t x_label = in_range ? static_cast<acc_t>(row[label * g.logits_v]) : acc_t(0);
      out_logp[out] = (x_label - row_lse.m) - row_lse.log_s;
    }
  });
}

template <typename scalar_t, typename label_t>
void backward(const RowGeometry& g, const at::Tensor& grad_logp, const at::Tensor& logits, const at::Tensor& labels,
              const at::Tensor& lse, at::Tensor& out, int64_t ignore_index) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  scalar_t* grad = out.data_ptr<scalar_t>();  // may be x itself (in place)
  const label_t* y = labels.const_data_ptr<label_t>();
  const acc_t* g_tok = grad_logp.const_data_ptr<acc_t>();
  const acc_t* row_lse = lse.const_data_ptr<acc_t>();
  const int64_t g_n = grad_logp.stride(0), g_t = grad_logp.stride(1);
  const int64_t o_n = out.stride(0), o_t = out.stride(1), o_v = out.stride(2);
  std::vector<int64_t> rows, zero_rows;
  split_rows(g, y, ignore_index, rows, &zero_rows);
  const bool contiguous = g.logits_v == 1 && o_v == 1;

  at::parallel_for(0, static_cast<int64_t>(zero_rows.size()), grain_rows(g.V), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* o = grad + (zero_rows[i] / g.T) * o_n + (zero_rows[i] % g.T) * o_t;
      if (o_v == 1) {
        std::fill(o, o + g.V, scalar_t(0));
      } else {
        for (int64_t v = 0; v < g.V; ++v) o[v * o_v] = scalar_t(0);
      }
    }
  });
  at::parallel_for(0, static_cast<int64_t>(rows.size()), grain_rows(g.V), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = rows[i] / g.T, t = rows[i] % g.T;
      const scalar_t* row = x + n * g.logits_n + t * g.logits_t;
      scalar_t* o = grad + n * o_n + t * o_t;
      const int64_t label =
          local_label(static_cast<int64_t>(y[n * g.labels_n + (t + g.shift) * g.labels_t]), g.vocab_start, g.V);
      const acc_t gt = g_tok[n * g_n + t * g_t];
      const LsePair<acc_t> l = {row_lse[2 * (n * g.T_out + t)], row_lse[2 * (n * g.T_out + t) + 1]};
      if (!std::isfinite(l.m) || l.log_s != l.log_s) {  // a NaN, +inf or all -inf row: NaN, as the reference
        for (int64_t v = 0; v < g.V; ++v) o[v * o_v] = static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN());
        continue;
      }
      // Read before the row is overwritten (in place), and formed in fp32 to avoid a double rounding.
      const bool in_range = label >= 0;  // the one-hot term only where the window owns the label
      const acc_t label_grad =
          in_range ? gt - gt * std::exp((static_cast<acc_t>(row[label * g.logits_v]) - l.m) - l.log_s) : 0;
      if constexpr (kVectorized<scalar_t>) {
        if (contiguous) {
          row_grad_contiguous(row, o, g.V, l, gt);
        } else {
          row_grad_strided<scalar_t, acc_t>(row, g.logits_v, o, o_v, g.V, l, gt);
        }
      } else {
        row_grad_strided<scalar_t, acc_t>(row, g.logits_v, o, o_v, g.V, l, gt);
      }
      if (in_range) o[label * o_v] = static_cast<scalar_t>(label_grad);
    }
  });
}

}  // namespace

void token_logps_fwd(const at::Tensor& logits, const at::Tensor& labels, at::Tensor& logp, at::Tensor& lse,
                     at::Tensor& stats, int64_t ignore_index, bool shift, bool with_stats, int64_t vocab_start) {
  const RowGeometry g = row_geometry(logits, labels, shift, vocab_start);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_logps_fwd", [&] {
    const auto run = [&](auto stats_flag) {
      constexpr bool kStats = decltype(stats_flag)::value;
      if (labels.scalar_type() == at::kLong) {
        forward<kStats, scalar_t, int64_t>(g, logits, labels, logp, lse, stats, ignore_index);
      } else {
        forward<kStats, scalar_t, int32_t>(g, logits, labels, logp, lse, stats, ignore_index);
      }
    };
    if (with_stats) {
      run(std::true_type{});
    } else {
      run(std::false_type{});
    }
  });
}

void token_logps_bwd(const at::Tensor& grad_logp, const at::Tensor& logits, const at::Tensor& labels,
                     const at::Tensor& lse, at::Tensor& out, int64_t ignore_index, bool shift,
                     int64_t vocab_start) {
  const RowGeometry g = row_geometry(logits, labels, shift, vocab_start);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_logps_bwd", [&] {
    if (labels.scalar_type() == at::kLong) {
      backward<scalar_t, int64_t>(g, grad_logp, logits, labels, lse, out, ignore_index);
    } else {
      backward<scalar_t, int32_t>(g, grad_logp, logits, labels, lse, out, ignore_index);
    }
  });
}

}  // namespace dpo_kernels::cpu::CPU_CAPABILITY
