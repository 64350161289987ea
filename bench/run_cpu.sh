#!/usr/bin/env bash
# Runs the CPU benchmark suite (kernel level + end to end), saves pytest-benchmark JSON and the machine
# description under bench/results/, and prints the summary table of ratios (bench/summarize.py).
#
#   bash bench/run_cpu.sh            full run (a few minutes on 2 cores)
#   bash bench/run_cpu.sh --quick    CI smoke: every benchmark once on tiny shapes (also: BENCH_QUICK=1)
#   bash bench/run_cpu.sh --threads 1  torch intra-op threads (also: BENCH_THREADS); use fewer threads than
#                                    idle cores on a shared machine, or every parallel op waits on a busy core
#   bash bench/run_cpu.sh -k e2e     extra arguments go to pytest
#
# Do not run it under `nice`, and note the machine's load (printed in the summary): timings taken while
# other processes compile are noisy; compare the ratios of one run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

quick=${BENCH_QUICK:-0}
args=()
while (($#)); do
  case "$1" in
    --quick) quick=1 ;;
    --threads)
      export BENCH_THREADS=$2
      shift
      ;;
    --threads=*) export BENCH_THREADS=${1#--threads=} ;;
    *) args+=("$1") ;;
  esac
  shift
done

py=${PYTHON:-}
if [[ -z "$py" ]]; then
  if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=python3; fi
fi

mode=full
[[ "$quick" != 0 ]] && mode=quick
stamp=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p bench/results
json=bench/results/cpu-$mode-$stamp.json
machine=bench/results/cpu-$mode-$stamp-machine.json

"$py" - "$machine" <<'EOF'
import datetime, json, os, platform, subprocess, sys
import torch
def run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError) as err:
        return f"unavailable: {err}"
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = None
info = {
    "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "uptime": run(["uptime"]),
    "lscpu": run(["lscpu"]),
    "cpu_count": os.cpu_count(),
    "torch_threads": int(os.environ.get("BENCH_THREADS") or torch.get_num_threads()),
    "python": platform.python_version(),
    "torch": torch.__version__,
    "triton": triton_version,
    "git": run(["git", "rev-parse", "--short", "HEAD"]),
    "git_status": run(["git", "status", "--short"]),
}
with open(sys.argv[1], "w") as f:
    json.dump(info, f, indent=1)
EOF

echo "machine: $machine ($(uptime))"
busy=$(awk '{ print ($1 >= 0.5 ? 1 : 0) }' /proc/loadavg)
if [[ "$busy" == 1 && -z "${BENCH_THREADS:-}" ]]; then
  echo "note: load average $(cut -d' ' -f1 /proc/loadavg) on $(nproc) cores: timings will be noisy; consider --threads 1"
fi
rc=0
BENCH_QUICK=$quick BENCH_DEVICES=cpu "$py" -m pytest bench -q -p no:cacheprovider \
  --benchmark-json="$json" --benchmark-columns=median,iqr,rounds --benchmark-sort=name \
  ${args[@]+"${args[@]}"} || rc=$?
echo
if [[ -f "$json" ]]; then
  echo "results: $json"
  "$py" bench/summarize.py "$json"
else
  echo "no benchmark JSON was written (pytest exit code $rc)"
fi
exit "$rc"
