// Launcher of the MetaBalance CUDA kernels (metabalance.cu). Plain CUDA types only, so that the kernels compile with
// `nvcc -c` on a machine whose torch has no CUDA headers; binding.cpp is the torch glue.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace mb_kernels {
namespace cuda {

enum class GradDtype : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

// Columns of one row of the chunk table (int64 [num_chunks, kChunkColumns], built by mb_kernels.layout; the Triton
// kernels read the same format).
enum ChunkColumn : int { kChunkTensor = 0, kChunkBegin, kChunkEnd, kChunkFirst, kChunkCount, kChunkColumns };

// Most tasks per call: the squared norms and the weights live in dynamic shared memory (16 bytes per task).
constexpr int64_t kMaxTasks = 1024;

struct BalanceArgs {
  const void* task_grads;  // [num_tasks, numel] per-task gradients, contiguous, `dtype` (read)
  void* out;               // [numel] combined gradient, `dtype` (written)
  const int64_t* chunks;   // [num_chunks, kChunkColumns] work table: one thread block per row, in both launches
  void* norm_ema;          // [num_tensors, num_tasks] moving averages, float (double for kFloat64) (updated)
  void* ema_old;           // [num_tensors, num_tasks] scratch like norm_ema: the averages before this step
  void* partials;          // [num_chunks, num_tasks] scratch, double (every dtype): per-chunk squared sums
  int64_t num_tasks;
  int64_t numel;
  int64_t num_chunks;
  double relax_factor;
  double beta;
  int64_t strategy;  // metabalance_math.h Strategy
  GradDtype dtype;
};

// Enqueues both launches on `stream`; returns the launch status (asynchronous errors surface later, as usual).
cudaError_t launch_metabalance(const BalanceArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace mb_kernels
