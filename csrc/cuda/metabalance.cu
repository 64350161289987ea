// MetaBalance CUDA kernels: two launches per bucket, however many tensors (docs/design.md §3, "two launches").
//
// The work table (mb_kernels.layout.FlatLayout.chunk_table) splits every tensor into chunks, at least one per tensor, and
// both launches run one thread block per chunk:
//   launch 1 (metabalance_norms_kernel): per (chunk, task) squared sum, in double (see thread_sum_squares)
//            -> partials[chunk, task]; the first chunk of
//            each tensor also copies the tensor's pre-step averages norm_ema[p, :] -> ema_old[p, :].
//   launch 2 (metabalance_combine_kernel): every block of tensor p reduces p's partials in a fixed order, updates
//            the EMA from ema_old and computes the weights (metabalance_math.h, shared with the CPU kernel), and
//            writes its span of G = g_0 + sum_t w_t g_t; the first chunk's block writes the new averages to norm_ema.
// Race freedom: norm_ema is read only in launch 1 and written only in launch 2, which the stream orders after it;
// in launch 2 every block reads the old averages from ema_old, which nobody writes there. Determinism: no
// atomics; every sum has a fixed assignment of elements to threads and a fixed reduction tree, so results are
// bitwise reproducible run to run.
//
// Kernel code depends on CUDA headers only, so `nvcc -c` checks it without torch (scripts/check_cuda.sh).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "metabalance.h"
#include "metabalance_math.h"

namespace mb_kernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Per gradient dtype: the accumulation type (float32, float64 for float64) and the conversions. Squared sums are
// double for every dtype (thread_sum_squares).
template <typename scalar_t>
struct Elem;
template <>
struct Elem<float> {
  using acc_t = float;
  static __device__ __forceinline__ float load(float x) { return x; }
  static __device__ __forceinline__ float store(float x) { return x; }
};
template <>
struct Elem<double> {
  using acc_t = double;
  static __device__ __forceinline__ double load(double x) { return x; }
  static __device__ __forceinline__ double store(double x) { return x; }
};
template <>
struct Elem<__half> {
  using acc_t = float;
  static __device__ __forceinline__ float load(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half store(float x) { return __float2half_rn(x); }
};
template <>
struct Elem<__nv_bfloat16> {
  using acc_t = float;
  static __device__ __forceinline__ float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};

// Elements per 16-byte vector access.
template <typename scalar_t>
constexpr int kVec = 16 / static_cast<int>(sizeof(scalar_t));

template <typename scalar_t>
__device__ __forceinline__ void load_vec(const scalar_t* ptr, scalar_t (&v)[kVec<scalar_t>]) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(ptr));  // ptr is 16-byte aligned (caller's peel)
  memcpy(&v[0], &raw, sizeof(raw));
}

template <typename scalar_t>
__device__ __forceinline__ void store_vec(scalar_t* ptr, const scalar_t (&v)[kVec<scalar_t>]) {
  uint4 raw;
  memcpy(&raw, &v[0], sizeof(raw));
  *reinterpret_cast<uint4*>(ptr) = raw;
}

// Elements before `ptr` reaches a 16-byte boundary (ptr is aligned to its element size).
template <typename scalar_t>
__device__ __forceinline__ int64_t head_to_alignment(const scalar_t* ptr) {
  const unsigned misalign = static_cast<unsigned>(reinterpret_cast<uintptr_t>(ptr) & 15u);
  return misalign == 0 ? 0 : static_cast<int64_t>((16u - misalign) / sizeof(scalar_t));
}

// Sum of `v` over the block in a fixed tree (warp shuffles, then the warp sums); the result is valid in thread 0.
// `scratch` holds kWarps values; the trailing barrier lets the caller reuse it at once.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(kFullMask, v, offset);
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? scratch[lane] : acc_t(0);
    for (int offset = kWarps / 2; offset > 0; offset >>= 1) v += __shfl_down_sync(kFullMask, v, offset);
  }
  __syncthreads();
  return v;
}

// Element -> double for the squared sums: the square of a finite float32/float16/bfloat16 value is exact in double
// and within range, so a norm is right for any finite gradient whose norm fits in float32 (docs/design.md §1; a
// float32 sum overflows above ~1.8e19 and drops elements below ~1e-19). float64 gradients: plain double squares.
template <typename scalar_t>
__device__ __forceinline__ double widen(scalar_t x) {
  return static_cast<double>(Elem<scalar_t>::load(x));
}

// This thread's share of sum(x[0..len)^2) in double: an unaligned head (< kVec elements), 16-byte vectors, a tail.
// The element -> thread assignment depends only on len and x's alignment, never on timing.
template <typename scalar_t>
__device__ __forceinline__ double thread_sum_squares(const scalar_t* x, int64_t len) {
  constexpr int V = kVec<scalar_t>;
  double sum = 0.0;
  const int64_t head = min(len, head_to_alignment(x));
  if (threadIdx.x < head) {
    const double a = widen(x[threadIdx.x]);
    sum += a * a;
  }
  const int64_t num_vec = (len - head) / V;
#pragma unroll 4
  for (int64_t i = threadIdx.x; i < num_vec; i += kThreads) {
    scalar_t v[V];
    load_vec(x + head + i * V, v);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const double a = widen(v[j]);
      sum += a * a;
    }
  }
  for (int64_t i = head + num_vec * V + threadIdx.x; i < len; i += kThreads) {
    const double a = widen(x[i]);
    sum += a * a;
  }
  return sum;
}

// G at one element: g_0 + sum_{t>=1} w_t g_t in acc_t, rounded once. Always multiplies, so a non-finite g_t makes
// G non-finite (GradScaler must see the overflow).
template <typename scalar_t>
__device__ __forceinline__ scalar_t combine_one(
    const scalar_t* g, int64_t numel, int num_tasks, const typename Elem<scalar_t>::acc_t* w) {
  using acc_t = typename Elem<scalar_t>::acc_t;
  acc_t acc = Elem<scalar_t>::load(g[0]);
  for (int t = 1; t < num_tasks; ++t) acc += w[t] * Elem<scalar_t>::load(g[t * numel]);
  return Elem<scalar_t>::store(acc);
}

// The block writes out[begin..end). Vector path when every task row and `out` share the same 16-byte phase
// (row stride numel * size a multiple of 16, equal misalignment of g_0 and out): scalar head, vectors, scalar
// tail. Otherwise all scalar.
template <typename scalar_t>
__device__ __forceinline__ void combine_span(
    const scalar_t* grads, int64_t numel, int num_tasks, int64_t begin, int64_t end,
    const typename Elem<scalar_t>::acc_t* w, scalar_t* out) {
  using acc_t = typename Elem<scalar_t>::acc_t;
  constexpr int V = kVec<scalar_t>;
  const int64_t len = end - begin;
  const scalar_t* g = grads + begin;
  scalar_t* o = out + begin;
  const bool same_phase = (numel * static_cast<int64_t>(sizeof(scalar_t))) % 16 == 0 &&
      (reinterpret_cast<uintptr_t>(g) & 15u) == (reinterpret_cast<uintptr_t>(o) & 15u);
  const int64_t head = same_phase ? min(len, head_to_alignment(g)) : len;
  for (int64_t i = threadIdx.x; i < head; i += kThreads) o[i] = combine_one(g + i, numel, num_tasks, w);
  if (!same_phase) return;
  const int64_t num_vec = (len - head) / V;
#pragma unroll 2
  for (int64_t i = threadIdx.x; i < num_vec; i += kThreads) {
    const int64_t e = head + i * V;
    scalar_t v[V];
    acc_t acc[V];
    load_vec(g + e, v);
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = Elem<scalar_t>::load(v[j]);
    for (int t = 1; t < num_tasks; ++t) {
      load_vec(g + t * numel + e, v);
      const acc_t wt = w[t];
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] += wt * Elem<scalar_t>::load(v[j]);
    }
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = Elem<scalar_t>::store(acc[j]);
    store_vec(o + e, v);
  }
  for (int64_t i = head + num_vec * V + threadIdx.x; i < len; i += kThreads) {
    o[i] = combine_one(g + i, numel, num_tasks, w);
  }
}

// Launch 1: partials[c, t] = sum of g[t, chunk c]^2; the first chunk of each tensor saves its pre-step averages.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) metabalance_norms_kernel(
    const scalar_t* __restrict__ grads,                       // [T, numel] gradients
    const int64_t* __restrict__ chunks,                       // [C, kChunkColumns] work table
    int64_t numel, int num_tasks,
    const typename Elem<scalar_t>::acc_t* __restrict__ norm_ema,  // [P, T] averages before this step
    typename Elem<scalar_t>::acc_t* __restrict__ ema_old,         // [P, T] copy of them for launch 2
    double* __restrict__ partials) {                              // [C, T] per-chunk squared sums
  __shared__ double scratch[kWarps];
  const int64_t c = blockIdx.x;
  const int64_t* row = chunks + c * kChunkColumns;
  const int64_t p = row[kChunkTensor];
  const int64_t begin = row[kChunkBegin];
  const int64_t end = row[kChunkEnd];
  if (c == row[kChunkFirst]) {
    for (int t = threadIdx.x; t < num_tasks; t += kThreads) ema_old[p * num_tasks + t] = norm_ema[p * num_tasks + t];
  }
  for (int t = 0; t < num_tasks; ++t) {
    const double sum = block_sum(thread_sum_squares(grads + t * numel + begin, end - begin), scratch);
    if (threadIdx.x == 0) partials[c * num_tasks + t] = sum;
  }
}

// Launch 2: reduce the tensor's partials (fixed order), EMA + weights, then G over this chunk's span.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) metabalance_combine_kernel(
    const scalar_t* __restrict__ grads,                           // [T, numel] gradients
    const int64_t* __restrict__ chunks,                           // [C, kChunkColumns] work table
    int64_t numel, int num_tasks,
    const typename Elem<scalar_t>::acc_t* __restrict__ ema_old,   // [P, T] averages before this step
    const double* __restrict__ partials,                          // [C, T] per-chunk squared sums
    typename Elem<scalar_t>::acc_t* __restrict__ norm_ema,        // [P, T] updated averages (first chunk writes)
    scalar_t* __restrict__ out,                                   // [numel] combined gradient
    Hyper<typename Elem<scalar_t>::acc_t> hyper) {
  using acc_t = typename Elem<scalar_t>::acc_t;
  __shared__ double scratch[kWarps];
  extern __shared__ __align__(16) unsigned char dynamic_smem[];
  double* sumsq = reinterpret_cast<double*>(dynamic_smem);        // [T] squared norms
  acc_t* w = reinterpret_cast<acc_t*>(dynamic_smem + num_tasks * sizeof(double));  // [T] averages, then weights
  const int64_t c = blockIdx.x;
  const int64_t* row = chunks + c * kChunkColumns;
  const int64_t p = row[kChunkTensor];
  const int64_t first = row[kChunkFirst];
  const int64_t count = row[kChunkCount];

  for (int t = 0; t < num_tasks; ++t) {
    double part = 0.0;
    for (int64_t k = threadIdx.x; k < count; k += kThreads) part += partials[(first + k) * num_tasks + t];
    const double sum = block_sum(part, scratch);
    if (threadIdx.x == 0) sumsq[t] = sum;
  }
  if (threadIdx.x == 0) {
    // The norm is the double square root rounded once to acc_t; w holds the averages, then the weights. The
    // averages are written to norm_ema by the first chunk only (the others read ema_old, which nobody writes here).
    for (int t = 0; t < num_tasks; ++t) {
      w[t] = ema_step(ema_old[p * num_tasks + t], static_cast<acc_t>(sqrt(sumsq[t])), hyper);
      if (c == first) norm_ema[p * num_tasks + t] = w[t];
    }
    const acc_t target = w[0];
    for (int t = 1; t < num_tasks; ++t) w[t] = aux_weight(w[t], target, hyper);
    w[0] = acc_t(1);
  }
  __syncthreads();
  combine_span(grads, numel, num_tasks, row[kChunkBegin], row[kChunkEnd], w, out);
}

template <typename scalar_t>
cudaError_t launch_typed(const BalanceArgs& args, cudaStream_t stream) {
  using acc_t = typename Elem<scalar_t>::acc_t;
  if (args.num_chunks == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(args.num_chunks));
  const int num_tasks = static_cast<int>(args.num_tasks);
  const auto* grads = static_cast<const scalar_t*>(args.task_grads);
  metabalance_norms_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
      grads, args.chunks, args.numel, num_tasks, static_cast<const acc_t*>(args.norm_ema),
      static_cast<acc_t*>(args.ema_old), static_cast<double*>(args.partials));
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const Hyper<acc_t> hyper = Hyper<acc_t>::make(args.relax_factor, args.beta, args.strategy);
  const size_t smem = static_cast<size_t>(args.num_tasks) * (sizeof(double) + sizeof(acc_t));
  metabalance_combine_kernel<scalar_t><<<grid, kThreads, smem, stream>>>(
      grads, args.chunks, args.numel, num_tasks, static_cast<const acc_t*>(args.ema_old),
      static_cast<const double*>(args.partials), static_cast<acc_t*>(args.norm_ema), static_cast<scalar_t*>(args.out),
      hyper);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_metabalance(const BalanceArgs& args, cudaStream_t stream) {
  switch (args.dtype) {
    case GradDtype::kFloat16:
      return launch_typed<__half>(args, stream);
    case GradDtype::kBFloat16:
      return launch_typed<__nv_bfloat16>(args, stream);
    case GradDtype::kFloat32:
      return launch_typed<float>(args, stream);
    case GradDtype::kFloat64:
      return launch_typed<double>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace mb_kernels
