// The per-tensor MetaBalance math shared by the CPU kernel (metabalance.cpp) and the CUDA kernels
// (cuda/metabalance.cu): the strategy codes, the hyperparameters rounded to the state dtype, and the EMA + weight
// step. The definition of record is mb_kernels/backends/reference.py; docs/design.md §1 states the formula.
//
// No torch and no CUDA headers: the .cu compiles with plain nvcc (scripts/check_cuda.sh), the .cpp with any C++17
// compiler.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MB_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MB_HOST_DEVICE inline
#endif

namespace mb_kernels {

// Which auxiliary tasks are rescaled; the values are the op's `strategy` argument and the index into
// mb_kernels.backends.contract.STRATEGIES ("A", "B", "C").
enum class Strategy : int {
  kShrinkDominant = 0,  // "A": rescale task t only when m_t > m_0
  kBoostWeak = 1,       // "B": only when m_t < m_0
  kAll = 2,             // "C": always
};

constexpr int64_t kNumStrategies = 3;

// Hyperparameters rounded once to the state dtype (float, or double for float64 gradients), as the reference's
// float32 tensor arithmetic rounds them; 1 - beta and 1 - r are rounded from the double values.
template <typename acc_t>
struct Hyper {
  acc_t beta, one_minus_beta, relax, one_minus_relax;
  Strategy strategy;

  static Hyper make(double relax_factor, double beta, int64_t strategy) {
    return Hyper{
        static_cast<acc_t>(beta), static_cast<acc_t>(1.0 - beta), static_cast<acc_t>(relax_factor),
        static_cast<acc_t>(1.0 - relax_factor), static_cast<Strategy>(strategy)};
  }
};

// m <- beta m + (1 - beta) n, except for a non-finite norm (NaN/Inf gradient), which leaves m unchanged. n >= 0, so
// n - n == 0 exactly when n is finite (Inf - Inf and NaN - NaN are NaN); no <cmath>, same code on host and device.
template <typename acc_t>
MB_HOST_DEVICE acc_t ema_step(acc_t old_ema, acc_t norm, const Hyper<acc_t>& h) {
  return norm - norm == acc_t(0) ? old_ema * h.beta + norm * h.one_minus_beta : old_ema;
}

// The largest finite value of the accumulation type (no <limits> on the device side).
template <typename acc_t>
struct Largest;
template <>
struct Largest<float> {
  static constexpr float value = 3.40282346638528859811704183484516925e+38F;
};
template <>
struct Largest<double> {
  static constexpr double value = 1.79769313486231570814527423731704357e+308;
};

// w_t for an auxiliary task t >= 1 from the updated averages m_t and m_0 (w_0 is 1 by definition).
// m_t == 0 (the task never reached the tensor) gives w = 1, never 0/0. (m_0/m_t - 1) r + 1 is evaluated as
// r m_0/m_t + (1 - r): both terms are >= 0, so there is no cancellation when m_0/m_t << 1. m_0/m_t is capped at the
// largest finite value (it overflows when m_t is subnormal): r = 0 then still gives w = 1, and w * 0 stays 0.
template <typename acc_t>
MB_HOST_DEVICE acc_t aux_weight(acc_t m_t, acc_t m_0, const Hyper<acc_t>& h) {
  const bool rescale = h.strategy == Strategy::kAll ||
      (h.strategy == Strategy::kShrinkDominant ? m_t > m_0 : m_t < m_0);
  if (!rescale || m_t == acc_t(0)) return acc_t(1);
  const acc_t ratio = m_0 / m_t;
  return (ratio < Largest<acc_t>::value ? ratio : Largest<acc_t>::value) * h.relax + h.one_minus_relax;
}

// One tensor's step: ema[t] updated from norm[t] = sqrt(sum of squares), then w[t] from the updated averages.
// `norms` and `w` may alias (the CUDA kernel keeps both in one shared array).
template <typename acc_t>
MB_HOST_DEVICE void update_ema_and_weights(const acc_t* norms, acc_t* ema, int64_t num_tasks, const Hyper<acc_t>& h,
                                           acc_t* w) {
  for (int64_t t = 0; t < num_tasks; ++t) ema[t] = ema_step(ema[t], norms[t], h);
  const acc_t target = ema[0];
  w[0] = acc_t(1);
  for (int64_t t = 1; t < num_tasks; ++t) w[t] = aux_weight(ema[t], target, h);
}

}  // namespace mb_kernels
