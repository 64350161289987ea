// MetaBalance (He et al., WWW 2022, Algorithm 2) as one torch op: the schema (the contract for every device)
// and the CPU kernel. The math is stated once, in mb_kernels/backends/reference.py (docs/design.md §1); the
// per-tensor EMA and weight step shared with the CUDA kernels is metabalance_math.h.
//
// CPU plan (bitwise deterministic by construction, whatever the thread count):
//   * Every squared sum is taken over fixed spans in a fixed order: kLanes independent lanes along the span, a
//     fixed tree across lanes, and spans of one tensor added in order in float64. No result depends on which
//     thread ran what.
//   * Squares of float32/bfloat16 values are summed in float, and a span whose float sum may have overflowed or
//     underflowed is summed again in double (sum_squares: the norm contract of docs/design.md §1 at the speed of
//     the float loop, since the retry only runs for extreme or all-zero spans).
//   * Small tensors (<= kCpuChunk elements) are packed into bundles of about kCpuChunk elements; one task runs
//     norm -> EMA -> weights -> combine for each tensor of its bundle while its T rows are still in L1/L2.
//   * Large tensors are split into kCpuChunk spans: a parallel pass of squared sums per span, a short serial pass
//     of EMA + weights per large tensor, then a parallel combine pass.
#include <Python.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "metabalance_checks.h"
#include "metabalance_math.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

// `import mb_kernels._C` loads this library, whose static initialisers register the op. The module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace mb_kernels {
namespace {

// Elements per CPU work item. T rows of it (T * 64 KiB in fp32) stay in the 1 MiB L2 between the norm and the
// combine of a small tensor; large enough that the per-item overhead is noise.
constexpr int64_t kCpuChunk = 16384;
// Independent accumulators per squared sum: 32 floats = 4 AVX2 / 8 SSE registers (or 32 doubles, 8 AVX2 registers,
// in the retry), enough to hide add latency. Fixed lanes + fixed tree give a fixed summation order the compiler can
// vectorise without reassociating.
constexpr int kLanes = 32;
// Elements per block of the combine loop: the accumulators stay in registers across the T rows.
constexpr int kCombineBlock = 64;

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// All ones when `condition` holds, else 0: selects without branches.
inline uint32_t select_mask(bool condition) {
  return 0u - static_cast<uint32_t>(condition);
}

// float16 <-> float32 written with integer selects only, so that the loops around them vectorise (c10::Half's
// scalar conversions do not, which made float16 ~10x slower than bfloat16 here). Bit-identical to c10's
// conversions, round to nearest even (checked exhaustively against c10::detail::fp16_ieee_{to,from}_fp32_value).
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t magnitude = h & 0x7fffu;
  const uint32_t inf_nan = select_mask(magnitude >= 0x7c00u);
  // Rebias the exponent (127 - 15 = 112); Inf/NaN (exponent 31) need another 112 to reach 255.
  const uint32_t normal = (magnitude << 13) + 0x38000000u + (inf_nan & 0x38000000u);
  const uint32_t subnormal = bits_of(static_cast<float>(static_cast<int32_t>(magnitude)) * 5.9604644775390625e-08f);
  const uint32_t is_subnormal = select_mask(magnitude < 0x400u);  // exponent 0: magnitude * 2^-24, exactly
  return float_of(((subnormal & is_subnormal) | (normal & ~is_subnormal)) | sign);
}

inline uint16_t float_to_half_bits(float f) {
  const uint32_t x = bits_of(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t magnitude = x & 0x7fffffffu;
  // Below 2^-14 the result is subnormal: adding 0.5f rounds |f| to a multiple of 2^-24 (nearest even).
  const uint32_t subnormal = bits_of(float_of(magnitude) + 0.5f) - 0x3f000000u;
  const uint32_t rebiased = magnitude - 0x38000000u;
  const uint32_t normal = (rebiased + 0x0fffu + ((rebiased >> 13) & 1u)) >> 13;  // round to nearest even
  const uint32_t is_subnormal = select_mask(magnitude < 0x38800000u);
  uint32_t h = (subnormal & is_subnormal) | (normal & ~is_subnormal);
  const uint32_t overflow = select_mask(magnitude >= 0x477ff000u);  // >= 65520 rounds to Inf
  h = (h & ~overflow) | (0x7c00u & overflow);
  const uint32_t nan = select_mask(magnitude > 0x7f800000u);  // NaN -> quiet NaN
  h = (h & ~nan) | (0x7e00u & nan);
  return static_cast<uint16_t>(h | sign);
}

// The hot loops are compiled twice: for the x86-64 baseline (SSE2) and, picked at run time when the CPU has them,
// for AVX2 + FMA + F16C (twice the vector width, hardware float16 conversions). Every other function is baseline.
#if defined(__GNUC__) && defined(__x86_64__)
#define MB_X86_CLONES 1
#define MB_ALWAYS_INLINE inline __attribute__((always_inline))
#define MB_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define MB_X86_CLONES 0
#define MB_ALWAYS_INLINE inline
#endif
// _Float16 conversions become vcvtph2ps / vcvtps2ph (round to nearest even) where F16C is enabled.
#if MB_X86_CLONES && defined(__FLT16_MAX__)
#define MB_HAVE_FLOAT16 1
#else
#define MB_HAVE_FLOAT16 0
#endif

template <bool kAvx2, typename acc_t, typename scalar_t>
MB_ALWAYS_INLINE acc_t load(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
#if MB_HAVE_FLOAT16
    if constexpr (kAvx2) {
      _Float16 h;
      std::memcpy(&h, p, sizeof(h));
      return static_cast<float>(h);
    }
#endif
    return half_bits_to_float(p->x);
  } else {
    return static_cast<acc_t>(*p);
  }
}

// Rounds the accumulator once into the gradient dtype (nearest even).
template <bool kAvx2, typename scalar_t, typename acc_t>
MB_ALWAYS_INLINE scalar_t to_grad(acc_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    uint16_t bits;
#if MB_HAVE_FLOAT16
    if constexpr (kAvx2) {
      const _Float16 h = static_cast<_Float16>(v);
      std::memcpy(&bits, &h, sizeof(bits));
      return c10::Half(bits, c10::Half::from_bits());
    }
#endif
    bits = float_to_half_bits(v);
    return c10::Half(bits, c10::Half::from_bits());
  } else {
    return static_cast<scalar_t>(v);
  }
}

// Squared L2 norm of x[0..n) in sum_t (float or double), summed in a fixed order (lane j takes elements j,
// j + kLanes, ...). With sum_t = double every element is widened before it is squared: the square of a float32 (so
// float16, bfloat16) value is then exact (24 + 24 bits < 53) and within range, so the sum can neither overflow nor
// lose tiny elements, and a fused multiply-add gives the same bits as a multiply and an add.
template <bool kAvx2, typename sum_t, typename scalar_t, typename acc_t>
MB_ALWAYS_INLINE sum_t sum_squares_in(const scalar_t* x, int64_t n) {
  sum_t lanes[kLanes];
  for (int j = 0; j < kLanes; ++j) lanes[j] = sum_t(0);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const sum_t v = static_cast<sum_t>(load<kAvx2, acc_t>(x + i + j));
      lanes[j] += v * v;
    }
  }
  for (int j = 0; i + j < n; ++j) {
    const sum_t v = static_cast<sum_t>(load<kAvx2, acc_t>(x + i + j));
    lanes[j] += v * v;
  }
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int j = 0; j < width; ++j) lanes[j] += lanes[j + width];
  }
  return lanes[0];
}

// Whether the float sum s of the squares of n float32/bfloat16 values is as good as a double sum: finite, and at
// least n 2^-90. Squares only grow a sum, so an overflow anywhere leaves s = Inf (NaN input: NaN, also refused). An
// underflowed or subnormal square errs by at most 2^-150 (2^-126 under flush-to-zero), as does each addition in the
// subnormal range, so at s >= n 2^-90 they cost at most 2^-35 relative, far below float32's own rounding. Otherwise
// (extreme values, or a span of zeros) the caller sums again in double: docs/design.md §1, §5.
inline bool float_sum_in_range(float s, int64_t n) {
  return static_cast<double>(s) >= static_cast<double>(n) * 0x1p-90 && s <= std::numeric_limits<float>::max();
}

// Squared L2 norm of x[0..n) as a double (docs/design.md §1): float32 and bfloat16 in float, summed again in double
// when float_sum_in_range refuses the float sum; float16 in float (its squares, 2^-48 to 2^32, and any practical sum
// of them lie well inside float's range); float64 in double (squares overflow above ~1e154: documented in
// mb_kernels/backends/reference.py).
template <bool kAvx2, typename scalar_t, typename acc_t>
MB_ALWAYS_INLINE double sum_squares(const scalar_t* x, int64_t n) {
  if constexpr (std::is_same_v<acc_t, double>) {
    return sum_squares_in<kAvx2, double, scalar_t, acc_t>(x, n);
  } else {
    const float s = sum_squares_in<kAvx2, float, scalar_t, acc_t>(x, n);
    if (std::is_same_v<scalar_t, c10::Half> || float_sum_in_range(s, n)) return s;
    return sum_squares_in<kAvx2, double, scalar_t, acc_t>(x, n);
  }
}

// out[i] = g[0][i] + sum_{t>=1} w[t] g[t][i] for i in [begin, end): accumulated in acc_t, rounded once.
// Always multiplies (never skips w == 1 or g == 0), so a non-finite g_t makes the output non-finite.
template <bool kAvx2, typename scalar_t, typename acc_t>
MB_ALWAYS_INLINE void combine(
    const scalar_t* grads, int64_t row_stride, int64_t num_tasks, int64_t begin, int64_t end, const acc_t* w,
    scalar_t* out) {
  int64_t i = begin;
  for (; i + kCombineBlock <= end; i += kCombineBlock) {
    acc_t acc[kCombineBlock];
    for (int j = 0; j < kCombineBlock; ++j) acc[j] = load<kAvx2, acc_t>(grads + i + j);
    for (int64_t t = 1; t < num_tasks; ++t) {
      const scalar_t* row = grads + t * row_stride + i;
      const acc_t wt = w[t];
      for (int j = 0; j < kCombineBlock; ++j) acc[j] += wt * load<kAvx2, acc_t>(row + j);
    }
    for (int j = 0; j < kCombineBlock; ++j) out[i + j] = to_grad<kAvx2, scalar_t>(acc[j]);
  }
  for (; i < end; ++i) {
    acc_t acc = load<kAvx2, acc_t>(grads + i);
    for (int64_t t = 1; t < num_tasks; ++t) acc += w[t] * load<kAvx2, acc_t>(grads + t * row_stride + i);
    out[i] = to_grad<kAvx2, scalar_t>(acc);
  }
}

template <typename scalar_t, typename acc_t>
double sum_squares_baseline(const scalar_t* x, int64_t n) {
  return sum_squares<false, scalar_t, acc_t>(x, n);
}

template <typename scalar_t, typename acc_t>
void combine_baseline(
    const scalar_t* grads, int64_t row_stride, int64_t num_tasks, int64_t begin, int64_t end, const acc_t* w,
    scalar_t* out) {
  combine<false, scalar_t, acc_t>(grads, row_stride, num_tasks, begin, end, w, out);
}

#if MB_X86_CLONES
// float16 / bfloat16 on AVX2 + F16C, written with intrinsics (compilers do not vectorise scalar float16 conversions,
// and barely bfloat16 ones). Same lanes, same order and same rounding as sum_squares / combine with kAvx2 (lane
// j = 8 k + l of 8-float register k, of 4-double register 2 k + l / 4 in the double retry; round to nearest even;
// bfloat16 NaN -> 0x7fc0 as c10 does).
template <typename scalar_t>
MB_TARGET_AVX2 inline __m256 load8(const scalar_t* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    return _mm256_cvtph_ps(raw);
  } else {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  }
}

template <typename scalar_t>
MB_TARGET_AVX2 inline void store8(scalar_t* p, __m256 v) {
  __m128i packed;
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    packed = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  } else {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), nan);
    // Every value fits 16 bits, so the unsigned saturating pack is exact.
    packed = _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
  }
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}

template <typename scalar_t>
MB_TARGET_AVX2 float sum_squares_reduced_float(const scalar_t* x, int64_t n) {
  static_assert(kLanes == 32, "four 8-float registers");
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int k = 0; k < 4; ++k) {
      const __m256 v = load8(x + i + 8 * k);
      acc[k] = _mm256_fmadd_ps(v, v, acc[k]);
    }
  }
  float lanes[kLanes];
  for (int k = 0; k < 4; ++k) _mm256_storeu_ps(lanes + 8 * k, acc[k]);
  for (int j = 0; i + j < n; ++j) {
    const float v = load<true, float>(x + i + j);
    lanes[j] += v * v;
  }
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int j = 0; j < width; ++j) lanes[j] += lanes[j + width];
  }
  return lanes[0];
}

template <typename scalar_t>
MB_TARGET_AVX2 double sum_squares_reduced_double(const scalar_t* x, int64_t n) {
  static_assert(kLanes == 32, "eight 4-double registers");
  __m256d acc[8];
  for (int k = 0; k < 8; ++k) acc[k] = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int k = 0; k < 4; ++k) {
      const __m256 v = load8(x + i + 8 * k);
      const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
      const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
      acc[2 * k] = _mm256_fmadd_pd(lo, lo, acc[2 * k]);  // exact products: the same bits as multiply, then add
      acc[2 * k + 1] = _mm256_fmadd_pd(hi, hi, acc[2 * k + 1]);
    }
  }
  double lanes[kLanes];
  for (int k = 0; k < 8; ++k) _mm256_storeu_pd(lanes + 4 * k, acc[k]);
  for (int j = 0; i + j < n; ++j) {
    const double v = static_cast<double>(load<true, float>(x + i + j));
    lanes[j] += v * v;
  }
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int j = 0; j < width; ++j) lanes[j] += lanes[j + width];
  }
  return lanes[0];
}

template <typename scalar_t>
MB_TARGET_AVX2 void combine_reduced(
    const scalar_t* grads, int64_t row_stride, int64_t num_tasks, int64_t begin, int64_t end, const float* w,
    scalar_t* out) {
  constexpr int kRegs = kCombineBlock / 8;
  int64_t i = begin;
  for (; i + kCombineBlock <= end; i += kCombineBlock) {
    __m256 acc[kRegs];
    for (int k = 0; k < kRegs; ++k) acc[k] = load8(grads + i + 8 * k);
    for (int64_t t = 1; t < num_tasks; ++t) {
      const scalar_t* row = grads + t * row_stride + i;
      const __m256 wt = _mm256_set1_ps(w[t]);
      for (int k = 0; k < kRegs; ++k) acc[k] = _mm256_fmadd_ps(wt, load8(row + 8 * k), acc[k]);
    }
    for (int k = 0; k < kRegs; ++k) store8(out + i + 8 * k, acc[k]);
  }
  combine<true, scalar_t, float>(grads, row_stride, num_tasks, i, end, w, out);
}

template <typename scalar_t, typename acc_t>
MB_TARGET_AVX2 double sum_squares_avx2(const scalar_t* x, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>) {
    const float s = sum_squares_reduced_float(x, n);  // as sum_squares: float, double where the float sum is refused
    if (std::is_same_v<scalar_t, c10::Half> || float_sum_in_range(s, n)) return s;
    return sum_squares_reduced_double(x, n);
  } else {
    return sum_squares<true, scalar_t, acc_t>(x, n);
  }
}

template <typename scalar_t, typename acc_t>
MB_TARGET_AVX2 void combine_avx2(
    const scalar_t* grads, int64_t row_stride, int64_t num_tasks, int64_t begin, int64_t end, const acc_t* w,
    scalar_t* out) {
  if constexpr (std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>) {
    combine_reduced(grads, row_stride, num_tasks, begin, end, w, out);
  } else {
    combine<true, scalar_t, acc_t>(grads, row_stride, num_tasks, begin, end, w, out);
  }
}

// MB_KERNELS_NO_AVX2=1 (read once) forces the baseline loops: tests use it to cover them on AVX2 machines.
bool cpu_has_avx2() {
  static const bool has = [] {
    const char* off = std::getenv("MB_KERNELS_NO_AVX2");
    if (off != nullptr && off[0] != '\0' && off[0] != '0') return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return has;
}
#endif

// The two hot loops for this CPU. Which variant runs depends only on the machine, so results stay bitwise
// reproducible run to run (the AVX2 variant contracts multiply-adds into FMAs: its bits may differ from the
// baseline's on another machine, within the same error bound).
template <typename scalar_t, typename acc_t>
struct HotLoops {
  double (*sum_squares)(const scalar_t*, int64_t);
  void (*combine)(const scalar_t*, int64_t, int64_t, int64_t, int64_t, const acc_t*, scalar_t*);
};

template <typename scalar_t, typename acc_t>
HotLoops<scalar_t, acc_t> hot_loops() {
#if MB_X86_CLONES
  if (cpu_has_avx2()) return {&sum_squares_avx2<scalar_t, acc_t>, &combine_avx2<scalar_t, acc_t>};
#endif
  return {&sum_squares_baseline<scalar_t, acc_t>, &combine_baseline<scalar_t, acc_t>};
}

// EMA and weights of one tensor from its squared sums (float64): the square root in double, rounded once to acc_t.
template <typename acc_t>
void ema_and_weights_from_sumsq(const double* sumsq, acc_t* ema, int64_t num_tasks, const Hyper<acc_t>& h, acc_t* w) {
  // w doubles as the norms' buffer: update_ema_and_weights reads every norm before it writes a weight.
  for (int64_t t = 0; t < num_tasks; ++t) w[t] = static_cast<acc_t>(std::sqrt(sumsq[t]));
  update_ema_and_weights<acc_t>(w, ema, num_tasks, h, w);
}

// Units of parallel work: a bundle of whole small tensors [first_tensor, end_tensor), or one span [begin, end) of a
// large tensor (`large` numbers it among the large tensors, for its weights).
struct Bundle {
  int64_t first_tensor, end_tensor;
};

struct Span {
  int64_t begin, end, large;
};

struct Plan {
  std::vector<Bundle> bundles;
  std::vector<Span> spans;
  std::vector<int64_t> large_tensors;  // tensor index of each large tensor
  std::vector<int64_t> first_span;     // per large tensor: index of its first span in `spans`, plus an end marker
};

Plan make_plan(const int64_t* offsets, int64_t num_tensors) {
  Plan plan;
  int64_t bundle_start = 0;
  int64_t bundle_elems = 0;
  auto close_bundle = [&](int64_t end_tensor) {
    if (end_tensor > bundle_start) plan.bundles.push_back({bundle_start, end_tensor});
    bundle_start = end_tensor;
    bundle_elems = 0;
  };
  for (int64_t p = 0; p < num_tensors; ++p) {
    const int64_t begin = offsets[p];
    const int64_t size = offsets[p + 1] - begin;
    if (size <= kCpuChunk) {
      bundle_elems += size;
      if (bundle_elems >= kCpuChunk) close_bundle(p + 1);
      continue;
    }
    close_bundle(p);
    bundle_start = p + 1;
    const int64_t large = static_cast<int64_t>(plan.large_tensors.size());
    plan.large_tensors.push_back(p);
    plan.first_span.push_back(static_cast<int64_t>(plan.spans.size()));
    for (int64_t s = begin; s < begin + size; s += kCpuChunk) {
      plan.spans.push_back({s, std::min(s + kCpuChunk, begin + size), large});
    }
  }
  close_bundle(num_tensors);
  plan.first_span.push_back(static_cast<int64_t>(plan.spans.size()));
  return plan;
}

template <typename scalar_t>
void metabalance_cpu_typed(
    const at::Tensor& task_grads, const int64_t* offsets, at::Tensor& norm_ema, at::Tensor& out, double relax_factor,
    double beta, int64_t strategy) {
  using acc_t = at::opmath_type<scalar_t>;  // float for half/bfloat16/float, double for double
  const int64_t num_tasks = task_grads.size(0);
  const int64_t numel = task_grads.size(1);
  const int64_t num_tensors = norm_ema.size(0);
  const scalar_t* grads = task_grads.const_data_ptr<scalar_t>();
  scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
  acc_t* ema = norm_ema.mutable_data_ptr<acc_t>();
  const Hyper<acc_t> hyper = Hyper<acc_t>::make(relax_factor, beta, strategy);

  const HotLoops<scalar_t, acc_t> loops = hot_loops<scalar_t, acc_t>();
  const Plan plan = make_plan(offsets, num_tensors);
  const int64_t num_bundles = static_cast<int64_t>(plan.bundles.size());
  const int64_t num_spans = static_cast<int64_t>(plan.spans.size());
  std::vector<double> partials(static_cast<size_t>(num_spans * num_tasks));

  // Pass 1: whole small tensors (norm, EMA, weights, combine back to back), and squared sums of large-tensor spans.
  at::parallel_for(0, num_bundles + num_spans, 1, [&](int64_t item_begin, int64_t item_end) {
    std::vector<double> sumsq(num_tasks);
    std::vector<acc_t> w(num_tasks);
    for (int64_t item = item_begin; item < item_end; ++item) {
      if (item >= num_bundles) {
        const Span& span = plan.spans[item - num_bundles];
        for (int64_t t = 0; t < num_tasks; ++t) {
          partials[(item - num_bundles) * num_tasks + t] =
              loops.sum_squares(grads + t * numel + span.begin, span.end - span.begin);
        }
        continue;
      }
      const Bundle& bundle = plan.bundles[item];
      for (int64_t p = bundle.first_tensor; p < bundle.end_tensor; ++p) {
        const int64_t begin = offsets[p];
        const int64_t end = offsets[p + 1];
        for (int64_t t = 0; t < num_tasks; ++t) {
          sumsq[t] = loops.sum_squares(grads + t * numel + begin, end - begin);
        }
        ema_and_weights_from_sumsq<acc_t>(sumsq.data(), ema + p * num_tasks, num_tasks, hyper, w.data());
        loops.combine(grads, numel, num_tasks, begin, end, w.data(), out_ptr);
      }
    }
  });
  if (num_spans == 0) return;

  // Pass 2: per large tensor, its spans' squared sums added in span order, then EMA and weights.
  const int64_t num_large = static_cast<int64_t>(plan.large_tensors.size());
  std::vector<acc_t> weights(static_cast<size_t>(num_large * num_tasks));
  std::vector<double> sumsq(num_tasks);
  for (int64_t large = 0; large < num_large; ++large) {
    for (int64_t t = 0; t < num_tasks; ++t) sumsq[t] = 0.0;
    for (int64_t s = plan.first_span[large]; s < plan.first_span[large + 1]; ++s) {
      for (int64_t t = 0; t < num_tasks; ++t) sumsq[t] += partials[s * num_tasks + t];
    }
    const int64_t p = plan.large_tensors[large];
    ema_and_weights_from_sumsq<acc_t>(
        sumsq.data(), ema + p * num_tasks, num_tasks, hyper, weights.data() + large * num_tasks);
  }

  // Pass 3: combine the large tensors' spans.
  at::parallel_for(0, num_spans, 1, [&](int64_t span_begin, int64_t span_end) {
    for (int64_t s = span_begin; s < span_end; ++s) {
      const Span& span = plan.spans[s];
      loops.combine(
          grads, numel, num_tasks, span.begin, span.end, weights.data() + span.large * num_tasks, out_ptr);
    }
  });
}

// Host-side validation of the boundaries (cheap: P + 1 reads), so that a bad layout raises instead of reading
// out of bounds.
void check_offsets_values(const int64_t* offsets, int64_t num_tensors, int64_t numel) {
  TORCH_CHECK(offsets[0] == 0, "mb_kernels::metabalance_: offsets[0] must be 0, got ", num(offsets[0]));
  for (int64_t p = 0; p < num_tensors; ++p) {
    TORCH_CHECK(
        offsets[p + 1] >= offsets[p], "mb_kernels::metabalance_: offsets must be non-decreasing; offsets[",
        num(p + 1), "] = ", num(offsets[p + 1]), " < offsets[", num(p), "] = ", num(offsets[p]));
  }
  TORCH_CHECK(
      offsets[num_tensors] == numel, "mb_kernels::metabalance_: offsets[-1] = ", num(offsets[num_tensors]),
      " must equal task_grads.size(1) = ", num(numel));
}

void metabalance_cpu(
    const at::Tensor& task_grads, const at::Tensor& offsets, const std::optional<at::Tensor>& chunks,
    at::Tensor norm_ema, at::Tensor out, double relax_factor, double beta, int64_t strategy) {
  // `chunks` is the GPU kernels' work table; the CPU kernel plans its own work from the offsets.
  (void)chunks;
  check_metabalance_args(task_grads, offsets, norm_ema, out, strategy);
  const int64_t num_tensors = offsets.size(0) - 1;
  const int64_t* offsets_ptr = offsets.const_data_ptr<int64_t>();
  check_offsets_values(offsets_ptr, num_tensors, task_grads.size(1));
  if (num_tensors == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, task_grads.scalar_type(), "metabalance_cpu", [&] {
    metabalance_cpu_typed<scalar_t>(task_grads, offsets_ptr, norm_ema, out, relax_factor, beta, strategy);
  });
}

}  // namespace

TORCH_LIBRARY(mb_kernels, m) {
  // task_grads [T, N] per-task gradients (read); offsets [P + 1] int64 tensor boundaries on the data's device;
  // chunks: the GPU work table, FlatLayout.chunk_table (None on CPU); norm_ema [P, T] moving averages (updated);
  // out [N] combined gradient (written); strategy: metabalance_math.h's Strategy (0/1/2 = "A"/"B"/"C").
  m.def(
      "metabalance_(Tensor task_grads, Tensor offsets, Tensor? chunks, Tensor(a!) norm_ema, Tensor(b!) out, "
      "float relax_factor, float beta, int strategy) -> ()");
}

TORCH_LIBRARY_IMPL(mb_kernels, CPU, m) {
  m.impl("metabalance_", &metabalance_cpu);
}

}  // namespace mb_kernels
