#!/usr/bin/env bash
# Runs the main job: the multi-task recommender experiment (embedded synthetic default; --data DIR for real data).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash scripts/bootstrap.sh
exec .venv/bin/python -m experiments.recsys "$@"
