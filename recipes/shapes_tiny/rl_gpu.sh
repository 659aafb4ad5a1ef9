#!/usr/bin/env bash
# The RL study on one CUDA GPU: every arm x seed in sequence (`python -m recipes.shapes_tiny.rl_runs`: train, resumable,
# then bench 3- and 6-turn held-out sessions), then the page (`python -m recipes.shapes_tiny.rl_page`). Rerunning the
# script continues: finished runs are not trained again and benched sessions are read back.
#
#   bash recipes/shapes_tiny/rl_gpu.sh
#   SEEDS="0" ARMS="sft rl" SESSIONS=20 EXTRA="--max-steps 5" bash recipes/shapes_tiny/rl_gpu.sh   # a short check
#   DRY_RUN=1 bash recipes/shapes_tiny/rl_gpu.sh                                                  # print the commands
#
# Environment: PY (python, default .venv/bin/python), SEEDS ("0 1 2"), ARMS ("sft rl rl_nofilter"), SESSIONS (held-out
# sessions per family, 200), TURNS ("3,6"), DEVICE (cuda), RESULTS (docs/rl_runs), RUN_DIR (runs/rl), EXTRA (more
# rl_runs flags, e.g. "--max-steps 50").
set -euo pipefail
cd "$(dirname "$0")/../.."

PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-"0 1 2"}
ARMS=${ARMS:-"sft rl rl_nofilter"}
SESSIONS=${SESSIONS:-200}
TURNS=${TURNS:-3,6}
DEVICE=${DEVICE:-cuda}
RESULTS=${RESULTS:-docs/rl_runs}
RUN_DIR=${RUN_DIR:-runs/rl}
EXTRA=${EXTRA:-}
export HF_HUB_OFFLINE=1

run() {
    echo "+ $*"
    if [ "${DRY_RUN:-0}" != 1 ]; then "$@"; fi
}

if [ "${DRY_RUN:-0}" != 1 ] && [ "$DEVICE" = cuda ]; then
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: set DEVICE=cpu')"
fi
for seed in $SEEDS; do
    for arm in $ARMS; do
        # shellcheck disable=SC2086  # EXTRA holds several flags
        run "$PY" -m recipes.shapes_tiny.rl_runs --arm "$arm" --seed "$seed" --device "$DEVICE" \
            --sessions "$SESSIONS" --turns "$TURNS" --results "$RESULTS" --run-dir "$RUN_DIR" --no-progress $EXTRA
    done
done
run "$PY" -m recipes.shapes_tiny.rl_page --results "$RESULTS" --out docs/results_rl.md
