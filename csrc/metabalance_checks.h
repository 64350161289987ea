// Input checks shared by the CPU kernel (metabalance.cpp) and the CUDA glue (cuda/binding.cpp).
//
// Every check runs before the op writes anything, so a rejected call leaves norm_ema and out untouched.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

#include "metabalance_math.h"

namespace mb_kernels {

// Error messages format numbers, shapes and devices into strings first (std::to_string, libc10's Device::str) and
// never stream a number into the message: on the H100 machine (extension built with a newer g++ than the process's
// libstdc++), streaming an integer while raising crashed the process with a segfault instead of an error.
inline std::string num(int64_t value) {
  return std::to_string(value);
}

inline std::string dims(c10::IntArrayRef sizes) {
  std::string text = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i > 0) text += ", ";
    text += std::to_string(sizes[i]);
  }
  return text + "]";
}

// Checks the op's arguments (shapes, dtypes, devices, contiguity, strategy). Does not read tensor values, so
// it costs no device synchronisation; the CPU kernel validates the offsets' values separately.
inline void check_metabalance_args(
    const at::Tensor& task_grads,
    const at::Tensor& offsets,
    const at::Tensor& norm_ema,
    const at::Tensor& out,
    int64_t strategy) {
  const auto dtype = task_grads.scalar_type();
  TORCH_CHECK(
      dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
      "mb_kernels::metabalance_: task_grads must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK(
      task_grads.dim() == 2,
      "mb_kernels::metabalance_: task_grads must be 2-D [num_tasks, numel], got shape ", dims(task_grads.sizes()));
  TORCH_CHECK(task_grads.size(0) >= 1, "mb_kernels::metabalance_: task_grads needs at least one task (the target)");
  TORCH_CHECK(task_grads.is_contiguous(), "mb_kernels::metabalance_: task_grads must be contiguous");
  const int64_t num_tasks = task_grads.size(0);
  const int64_t numel = task_grads.size(1);

  TORCH_CHECK(
      offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.size(0) >= 1,
      "mb_kernels::metabalance_: offsets must be a 1-D int64 tensor of num_tensors + 1 boundaries, got ",
      offsets.scalar_type(), " of shape ", dims(offsets.sizes()));
  TORCH_CHECK(offsets.is_contiguous(), "mb_kernels::metabalance_: offsets must be contiguous");
  const int64_t num_tensors = offsets.size(0) - 1;

  const auto want_state = dtype == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(
      norm_ema.scalar_type() == want_state,
      "mb_kernels::metabalance_: norm_ema must be ", want_state, " for ", dtype, " gradients, got ",
      norm_ema.scalar_type());
  TORCH_CHECK(
      norm_ema.dim() == 2 && norm_ema.size(0) == num_tensors && norm_ema.size(1) == num_tasks,
      "mb_kernels::metabalance_: norm_ema must have shape [num_tensors, num_tasks] = [", num(num_tensors), ", ",
      num(num_tasks), "], got ", dims(norm_ema.sizes()));
  TORCH_CHECK(norm_ema.is_contiguous(), "mb_kernels::metabalance_: norm_ema must be contiguous");

  TORCH_CHECK(
      out.scalar_type() == dtype,
      "mb_kernels::metabalance_: out must have the gradients' dtype ", dtype, ", got ", out.scalar_type());
  TORCH_CHECK(
      out.dim() == 1 && out.size(0) == numel,
      "mb_kernels::metabalance_: out must have shape [numel] = [", num(numel), "], got ", dims(out.sizes()));
  TORCH_CHECK(out.is_contiguous(), "mb_kernels::metabalance_: out must be contiguous");

  const auto device = task_grads.device();
  TORCH_CHECK(
      offsets.device() == device && norm_ema.device() == device && out.device() == device,
      "mb_kernels::metabalance_: all tensors must be on task_grads' device ", device.str(), "; got offsets on ",
      offsets.device().str(), ", norm_ema on ", norm_ema.device().str(), ", out on ", out.device().str());
  TORCH_CHECK(
      strategy >= 0 && strategy < kNumStrategies,
      "mb_kernels::metabalance_: strategy must be 0 (A), 1 (B) or 2 (C), got ", num(strategy));
}

}  // namespace mb_kernels
