#!/usr/bin/env bash
# The full Taobao comparison (every method, 5 seeds, all users, batch 256, early stopping with patience 5) on one
# GPU, as parallel processes (one or two methods each: a run is launch-bound, so processes share the GPU well),
# then one merged table with paired tests and the gradient plots.
#
#   experiments/recsys/gpu_comparison.sh DATA_DIR OUT_DIR [SECONDS]
#
# SECONDS (default: no limit) stops the runs after that long; every process has written the runs it finished
# (--out is rewritten after each tested run), so the merged table shows what completed.
# Environment: PYTHON (python3), EPOCHS (15), SEEDS (5), DEVICE (cuda), EXTRA (more arguments for every process,
# e.g. "--max-users 200" for a quick check of the script on a CPU).
set -uo pipefail
data="${1:?data folder}"
out="${2:?output folder}"
limit="${3:-0}"
py="${PYTHON:-python3}"
epochs="${EPOCHS:-15}"
seeds="${SEEDS:-5}"
device="${DEVICE:-cuda}"
mkdir -p "$out/runs" "$out/logs" "$out/traces"
common=(--data "$data" --device "$device" --seeds "$seeds" --epochs "$epochs" --patience 5 --batch-size 256
  --threads 1 --eval-workers 1 --quiet ${EXTRA:-})
groups=(
  "mostpop single vanilla"
  "mb-C" "mb-A" "mb-B"
  "weights uncertainty" "gradnorm dwa"
  "mgda" "pcgrad" "gradsim" "mtadam"
)
pids=()
for g in "${groups[@]}"; do
  name="${g// /_}"
  extra=()
  case "$g" in
    *vanilla*|mb-C) extra=(--trace "$out/traces/$name.json") ;;
  esac
  case "$g" in
    mb-*) extra+=(--relax-grid 0.5 0.9) ;;
    weights*) extra+=(--grid weights=0.1,0.5) ;;
    gradnorm*) extra+=(--grid gradnorm=1.5) ;;
  esac
  if [ "$limit" -gt 0 ]; then
    timeout "$limit" "$py" -m experiments.recsys "${common[@]}" --methods $g "${extra[@]}" --out "$out/runs/$name.json" \
      >"$out/logs/$name.log" 2>&1 &
  else
    "$py" -m experiments.recsys "${common[@]}" --methods $g "${extra[@]}" --out "$out/runs/$name.json" \
      >"$out/logs/$name.log" 2>&1 &
  fi
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || true; done
"$py" -m experiments.recsys.report "$out"/runs/*.json --json "$out/table.json" --scipy-check | tee "$out/table.md"
# One trace file (Vanilla-Multi and MetaBalance-C) for scripts/plot_gradients.py.
"$py" -c "import glob, json, sys; t = {}; [t.update(json.load(open(f))) for f in sorted(glob.glob(sys.argv[1] + '/traces/*.json'))]; json.dump(t, open(sys.argv[1] + '/trace.json', 'w'))" "$out"
