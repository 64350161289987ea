#!/usr/bin/env bash
# Runs the main job: the multi-task recommender experiment (embedded synthetic default; --data DIR for real data).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
for arg in "$@"; do
  if [ "$arg" = "-h" ] || [ "$arg" = "--help" ]; then
    # The CLI's help needs no torch: answer it without setting up the environment.
    exec "${PYTHON:-python3}" -m experiments.recsys "$@"
  fi
done
bash scripts/bootstrap.sh
exec .venv/bin/python -m experiments.recsys "$@"
