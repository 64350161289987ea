#!/usr/bin/env bash
# The single script to run on a GPU machine (H100/H200; torch + CUDA + triton in the system python3, no
# network). Stages, each under its own timeout inside an overall budget (default 470 s, under 8 minutes):
#   1. build the extension in place (CUDA op for this GPU's architecture)      -> build.log
#   2. the GPU test tier (python3 -m pytest -m gpu tests -q [-n 12])           -> tests.log
#   3. launches per balancing call, per fused backend (torch.profiler)        -> launches.json
#  3b. one whole training step (shared_output, dense tables) captured in a CUDA graph and replayed against eager
#      steps (bench/cuda_graph_step.py; one JSON line)                          -> bench.log
#   4. host enqueue vs device time per balancing call (bench/host_overhead.py) -> host_overhead.json
#   5. kernel-level benchmarks on CUDA, then end-to-end training steps (paper network; 1M-row tables, dense and
#      sparse, plain and shared_output; the bottom batched vs per task)       -> kernels.json, e2e.json
#      Stage limits add up to more than the budget: the last stages get what is left.
#   6. the summary table (bench/summarize.py), printed last                   -> summary.txt
# Logs of stages 3-5 go to bench.log. Eight files in all (the device tool brings back at most eight).
#
#   bash bench/gpu_check.sh [RESULTS_DIR]     RESULTS_DIR defaults to $OUT, else bench/results/gpu-<time>
#   bash bench/gpu_check.sh --dry-run DIR     print the stages and their limits, run nothing
#   bash bench/gpu_check.sh --cpu DIR         exercise the script without a GPU: quick mode on CPU,
#                                             no build, a small slice of the tests (GPU_CHECK_TEST_ARGS)
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S (470), GPU_CHECK_TEST_ARGS (pytest arguments of
# stage 2), BENCH_BUDGET_S (seconds of timed calls per benchmark, default 0.3 on CUDA), BENCH_DTYPES,
# RECHUB_WHEEL (a torch-rechub wheel to install with --no-deps --no-index, since the machine has no network).
set -uo pipefail # not -e: a failing stage is recorded and the next one still runs
cd "$(dirname "${BASH_SOURCE[0]}")/.."

dry_run=0
cpu_mode=0
results=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    --cpu) cpu_mode=1 ;;
    -h | --help)
      sed -n '2,21p' "$0"
      exit 0
      ;;
    *) results=$arg ;;
  esac
done
results=${results:-${OUT:-bench/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)}}
mkdir -p "$results"
results=$(cd "$results" && pwd)
py=${PYTHON:-python3}
budget=${GPU_CHECK_BUDGET_S:-470}
reserve=15 # seconds kept for the summary
start=$(date +%s)
status="$results/summary.txt"
: >"$status"

note() { echo "$*" | tee -a "$status"; }

# stage NAME CAP_SECONDS LOGFILE COMMAND...: runs COMMAND under min(CAP, what the budget has left).
stage() {
  local name=$1 cap=$2 log=$3
  shift 3
  local left=$((budget - ($(date +%s) - start) - reserve))
  local limit=$((cap < left ? cap : left))
  if ((dry_run)); then
    note "[dry-run] $name (limit ${cap}s) -> $log: $*"
    return 0
  fi
  if ((limit < 10)); then
    note "SKIPPED $name: the ${budget}s budget is spent"
    return 0
  fi
  echo "== $name (limit ${limit}s) -> $log"
  echo "== $name: $*" >>"$log"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  local verdict="ok"
  ((rc != 0)) && verdict="FAILED"
  ((rc == 124 || rc == 137)) && verdict="TIMED OUT"
  note "$(printf 'stage %-8s %-9s rc=%-3s %4ss  (%s)' "$name" "$verdict" "$rc" "$(($(date +%s) - t0))" "$(basename "$log")")"
  tail -n 4 "$log" | sed 's/^/    /'
  return 0
}

# ---- the machine ------------------------------------------------------------------------------------
if ((!cpu_mode && !dry_run)); then
  if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    note "no CUDA device visible to $py: run with --cpu to exercise the script without a GPU"
    exit 1
  fi
fi
note "gpu_check $(date -u +%FT%TZ); results in $results; budget ${budget}s"
if ((!dry_run)); then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader \
    2>/dev/null | sed 's/^/gpu: /' | tee -a "$status"
  "$py" -c "import torch, platform; print('python', platform.python_version(), '| torch', torch.__version__, '| cuda', torch.version.cuda)" 2>&1 | tee -a "$status"
  "$py" -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -n 1 | tee -a "$status"
  (nvcc --version 2>/dev/null | tail -n 1 || echo "nvcc: not found") | tee -a "$status"
  echo "git $(git rev-parse --short HEAD 2>/dev/null) $(git status --short 2>/dev/null | wc -l) changed files" | tee -a "$status"
fi

if [[ -n "${RECHUB_WHEEL:-}" && $dry_run == 0 ]]; then
  "$py" -m pip install --no-deps --no-index "$RECHUB_WHEEL" >>"$results/build.log" 2>&1 &&
    note "installed $RECHUB_WHEEL (torch-rechub, --no-deps)" || note "could not install $RECHUB_WHEEL"
fi

if ((cpu_mode)); then
  export BENCH_QUICK=1 BENCH_DEVICES=cpu
  test_args=${GPU_CHECK_TEST_ARGS:-"tests/test_backends.py tests/test_host_reads.py -q -x -k (float32-T4-C-r0.5-b0.9)or(host)"}
else
  export BENCH_DEVICES=${BENCH_DEVICES:-cuda} BENCH_DTYPES=${BENCH_DTYPES:-float32,bfloat16}
  parallel=""
  # The tier's float64 truths are computed on the CPU: spread them over the cores when pytest-xdist is there.
  "$py" -c "import xdist" 2>/dev/null && parallel="-n 12"
  # The files of the paths never run on CUDA yet first, then the others (pytest keeps the order of the files it is
  # given, and xdist hands tests out in that order), so that they have run if the tier hits its time limit.
  first="tests/test_row_tables.py tests/test_host_reads.py tests/test_shared_output.py tests/test_sparse_tables.py"
  first+=" tests/test_embedding_bags.py tests/test_extreme_norms.py tests/test_hardening.py"
  rest=$(for f in tests/test_*.py; do [[ " $first " == *" $f "* ]] || printf '%s ' "$f"; done)
  test_args=${GPU_CHECK_TEST_ARGS:-"-m gpu $first $rest-q $parallel"}
  # Build only for this GPU (faster than every architecture); MAX_JOBS for ninja's parallel compiles.
  arch=$("$py" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} MAX_JOBS=${MAX_JOBS:-16}
fi

# ---- 1. build ---------------------------------------------------------------------------------------
if ((cpu_mode)); then
  note "stage build    skipped in --cpu mode"
else
  stage build 150 "$results/build.log" "$py" setup.py build_ext --inplace
fi
stage backends 30 "$results/build.log" "$py" -c "
import torch
from mb_kernels.dispatch import BACKENDS, available_backends
for device in ('cpu', 'cuda'):
    print(device, 'backends:', available_backends(device))
for name, backend in BACKENDS.items():
    print(name, ':', backend.unavailable_reason() or 'available')
"
grep -E "^(cpu|cuda) backends:" "$results/build.log" 2>/dev/null | tee -a "$status"

# ---- 2. the GPU test tier ---------------------------------------------------------------------------
# shellcheck disable=SC2086 # test_args is a list of pytest arguments
stage tests 150 "$results/tests.log" "$py" -m pytest $test_args -p no:cacheprovider
grep -E "(passed|failed|error)" "$results/tests.log" 2>/dev/null | tail -n 1 | sed 's/^/tests: /' | tee -a "$status"

# ---- 3. launches per step ----------------------------------------------------------------------------
stage launches 40 "$results/bench.log" "$py" bench/count_launches.py --out "$results/launches.json"

# ---- 3b. a whole training step captured in a CUDA graph (dense tables, shared_output): before the benchmarks,
# which take whatever time is left (the stage limits add up to more than the budget) --------------------------
if ((!cpu_mode)); then
  stage graph 60 "$results/bench.log" "$py" bench/cuda_graph_step.py
fi

# ---- 4. host enqueue vs device time -----------------------------------------------------------------------
stage host 60 "$results/bench.log" "$py" bench/host_overhead.py --out "$results/host_overhead.json"

# ---- 5. benchmarks -----------------------------------------------------------------------------------
timeout_args=()
if "$py" -c "import pytest_timeout" 2>/dev/null; then
  timeout_args=(--timeout=90) # pytest-timeout (auto-loaded): one hanging case fails alone, the JSON is still written
fi
bench_args=(-q -p no:cacheprovider --benchmark-columns=median,iqr,rounds --benchmark-sort=name ${timeout_args[@]+"${timeout_args[@]}"})
stage kernels 150 "$results/bench.log" "$py" -m pytest bench/test_bench_kernels.py "${bench_args[@]}" \
  --benchmark-json="$results/kernels.json"
stage e2e 120 "$results/bench.log" "$py" -m pytest bench/test_bench_e2e.py bench/test_bench_tables.py "${bench_args[@]}" \
  --benchmark-json="$results/e2e.json"

# ---- 6. summary, printed last --------------------------------------------------------------------------
if ((dry_run)); then
  note "[dry-run] summary: $py bench/summarize.py kernels.json e2e.json --launches launches.json"
  exit 0
fi
jsons=()
for f in "$results/kernels.json" "$results/e2e.json"; do [[ -s "$f" ]] && jsons+=("$f"); done
note "total $(($(date +%s) - start))s"
echo
if ((${#jsons[@]})); then
  timeout 60 "$py" bench/summarize.py "${jsons[@]}" --launches "$results/launches.json" >>"$status" 2>&1
else
  note "no benchmark JSON was written: see bench.log"
fi
cat "$status"
