#!/usr/bin/env bash
# Compile check of the CUDA kernels (csrc/cuda/*.cu) with `nvcc -c` for sm_80 and sm_90, warnings as errors.
# The kernels include CUDA headers only, so this runs on machines whose torch has no CUDA. Torch's half/bfloat16
# restrictions (-D__CUDA_NO_HALF_OPERATORS__ ...) are applied, as a torch CUDAExtension build would.
# Without nvcc it prints a SKIP line and exits 0. NVCC=/path/to/nvcc overrides the lookup.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

nvcc="${NVCC:-}"
if [ -z "$nvcc" ]; then
  for candidate in "$(command -v nvcc || true)" "${CUDA_HOME:-/nonexistent}/bin/nvcc" /usr/local/cuda/bin/nvcc; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then nvcc="$candidate"; break; fi
  done
fi
if [ -z "$nvcc" ]; then
  echo "[check_cuda] SKIP: nvcc not found (set NVCC or CUDA_HOME to check the CUDA kernels)"
  exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
sources=(csrc/cuda/*.cu)
echo "[check_cuda] $("$nvcc" --version | tail -1)"
for arch in 80 90; do
  for src in "${sources[@]}"; do
    "$nvcc" -c -std=c++17 -O3 -arch="sm_$arch" -Werror all-warnings -Xcompiler -Wall,-Wextra \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
      -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -Icsrc -o "$tmp/$(basename "$src").sm_$arch.o" "$src"
    echo "[check_cuda] ok: $src for sm_$arch"
  done
done
