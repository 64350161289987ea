// TORCH_LIBRARY_IMPL(mb_kernels, CUDA): checks the op's arguments, allocates the two scratch buffers and calls the
// launcher in metabalance.cu (the schema is declared once, in ../metabalance.cpp).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <limits>
#include <optional>

#include "metabalance.h"
#include "metabalance_checks.h"

namespace mb_kernels {
namespace {

cuda::GradDtype to_grad_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf:
      return cuda::GradDtype::kFloat16;
    case at::kBFloat16:
      return cuda::GradDtype::kBFloat16;
    case at::kFloat:
      return cuda::GradDtype::kFloat32;
    case at::kDouble:
      return cuda::GradDtype::kFloat64;
    default:
      TORCH_CHECK(false, "mb_kernels::metabalance_: unsupported gradient dtype ", dtype);
  }
}

void metabalance_cuda(
    const at::Tensor& task_grads, const at::Tensor& offsets, const std::optional<at::Tensor>& chunks,
    at::Tensor norm_ema, at::Tensor out, double relax_factor, double beta, int64_t strategy) {
  check_metabalance_args(task_grads, offsets, norm_ema, out, strategy);
  TORCH_CHECK(
      chunks.has_value(),
      "mb_kernels::metabalance_: CUDA tensors need the chunk table (mb_kernels.layout.FlatLayout.chunk_table)");
  const at::Tensor& table = *chunks;
  TORCH_CHECK(
      table.scalar_type() == at::kLong && table.dim() == 2 && table.size(1) == cuda::kChunkColumns &&
          table.is_contiguous(),
      "mb_kernels::metabalance_: chunks must be a contiguous int64 [num_chunks, ", num(cuda::kChunkColumns),
      "] table, got ", table.scalar_type(), " of shape ", dims(table.sizes()));
  TORCH_CHECK(
      table.device() == task_grads.device(), "mb_kernels::metabalance_: chunks must be on ",
      task_grads.device().str(), ", got ", table.device().str());
  const int64_t num_tensors = offsets.size(0) - 1;
  const int64_t num_tasks = task_grads.size(0);
  const int64_t num_chunks = table.size(0);
  TORCH_CHECK(
      num_chunks >= num_tensors,
      "mb_kernels::metabalance_: the chunk table has ", num(num_chunks), " rows for ", num(num_tensors),
      " tensors (every tensor needs at least one); rebuild it for this layout");
  TORCH_CHECK(
      num_chunks <= std::numeric_limits<int32_t>::max(), "mb_kernels::metabalance_: too many chunks: ",
      num(num_chunks));
  TORCH_CHECK(
      num_tasks <= cuda::kMaxTasks, "mb_kernels::metabalance_: at most ", num(cuda::kMaxTasks),
      " tasks on CUDA, got ", num(num_tasks));
  if (num_tensors == 0) return;

  const c10::cuda::CUDAGuard guard(task_grads.device());
  const at::Tensor ema_old = at::empty_like(norm_ema);
  // Squared sums are double for every gradient dtype (metabalance.cu: thread_sum_squares).
  const at::Tensor partials = at::empty({num_chunks, num_tasks}, norm_ema.options().dtype(at::kDouble));
  cuda::BalanceArgs args{};
  args.task_grads = task_grads.const_data_ptr();
  args.out = out.mutable_data_ptr();
  args.chunks = table.const_data_ptr<int64_t>();
  args.norm_ema = norm_ema.mutable_data_ptr();
  args.ema_old = ema_old.mutable_data_ptr();
  args.partials = partials.mutable_data_ptr();
  args.num_tasks = num_tasks;
  args.numel = task_grads.size(1);
  args.num_chunks = num_chunks;
  args.relax_factor = relax_factor;
  args.beta = beta;
  args.strategy = strategy;
  args.dtype = to_grad_dtype(task_grads.scalar_type());
  const cudaError_t err = cuda::launch_metabalance(args, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "mb_kernels::metabalance_: CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(mb_kernels, CUDA, m) {
  m.impl("metabalance_", &metabalance_cuda);
}

}  // namespace mb_kernels
