#!/usr/bin/env bash
# Idempotent set-up shared by run.sh and test.sh: a virtual environment in .venv with pinned CPU torch
# (or the machine's CUDA torch when a GPU is present), triton, the test/bench tools, and mb_kernels
# installed in editable mode with its compiled extension built.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
py="${PYTHON:-python3}"
stamp="$venv/.mb_kernels_stamp"
want="$(cat requirements-dev.txt setup.py pyproject.toml csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h 2>/dev/null | sha1sum | cut -c1-16)"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/python" -c "import mb_kernels" 2>/dev/null; then
  exit 0
fi

echo "[bootstrap] setting up $venv" >&2
if command -v nvidia-smi >/dev/null 2>&1 && "$py" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  # GPU machine: reuse its CUDA torch (and triton) rather than downloading another build.
  [ -d "$venv" ] || "$py" -m venv --system-site-packages "$venv"
else
  [ -d "$venv" ] || "$py" -m venv "$venv"
  # The CPU wheel; a plain 'torch' would pull a multi-GB CUDA build.
  "$venv/bin/pip" install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" >&2 || true
fi
"$venv/bin/pip" install -q -r requirements-dev.txt 2>&1 | grep -v "is ignored" >&2 || true
"$venv/bin/python" -c "import torch, triton" >/dev/null
echo "[bootstrap] building and installing mb_kernels" >&2
"$venv/bin/pip" install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v "is ignored" >&2 || true
"$venv/bin/python" -c "import mb_kernels"
echo "$want" > "$stamp"
