#!/usr/bin/env bash
# The RL study on a CPU: every (arm, seed) of `python -m recipes.shapes_tiny.rl_runs` (train, resumable, then bench
# 3- and 6-turn held-out sessions), JOBS runs at a time (one per core, one torch thread each), then the page
# (`python -m recipes.shapes_tiny.rl_page`). The two RL arms of a seed run side by side, the SFT benches last. Stop it
# anywhere (kill the script's process group, or let the machine stop); rerunning the same command continues: finished
# runs are not trained again, a run resumes from its newest checkpoint (every 5 steps) and benched sessions are read
# back.
#
#   nohup bash recipes/shapes_tiny/rl_cpu.sh > runs/rl_cpu.log 2>&1 &
#   JOBS=1 SEEDS="0" ARMS="rl" bash recipes/shapes_tiny/rl_cpu.sh      # one run on one core
#   DRY_RUN=1 bash recipes/shapes_tiny/rl_cpu.sh                       # print the commands
#
# Environment: PY (python, default .venv/bin/python), JOBS (2), SEEDS ("0 1 2"), ARMS ("rl rl_nofilter sft"), SESSIONS
# (held-out sessions per family, 200), TURNS ("3,6"), RESULTS (docs/rl_runs), RUN_DIR (runs/rl), NICE (10), EXTRA (more
# rl_runs flags, e.g. "--max-steps 50").
set -euo pipefail
cd "$(dirname "$0")/../.."

PY=${PY:-.venv/bin/python}
JOBS=${JOBS:-2}
SEEDS=${SEEDS:-"0 1 2"}
ARMS=${ARMS:-"rl rl_nofilter sft"}
SESSIONS=${SESSIONS:-200}
TURNS=${TURNS:-3,6}
RESULTS=${RESULTS:-docs/rl_runs}
RUN_DIR=${RUN_DIR:-runs/rl}
NICE=${NICE:-10}
EXTRA=${EXTRA:-}
export HF_HUB_OFFLINE=1

run() {
    echo "+ $*"
    if [ "${DRY_RUN:-0}" != 1 ]; then nice -n "$NICE" "$@"; fi
}

# the (arm, seed) list: the training arms seed by seed, then the SFT benches
runs=()
for seed in $SEEDS; do
    for arm in $ARMS; do [ "$arm" = sft ] || runs+=("$arm $seed"); done
done
for seed in $SEEDS; do
    for arm in $ARMS; do [ "$arm" != sft ] || runs+=("$arm $seed"); done
done

lane() {  # every JOBS-th run, starting at $1
    local i
    for ((i = $1; i < ${#runs[@]}; i += JOBS)); do
        read -r arm seed <<< "${runs[$i]}"
        # shellcheck disable=SC2086  # EXTRA holds several flags
        run "$PY" -m recipes.shapes_tiny.rl_runs --arm "$arm" --seed "$seed" --device cpu --threads 1 \
            --sessions "$SESSIONS" --turns "$TURNS" --results "$RESULTS" --run-dir "$RUN_DIR" --no-progress $EXTRA
    done
}

for ((k = 0; k < JOBS; k++)); do lane "$k" & done
wait
run "$PY" -m recipes.shapes_tiny.rl_page --results "$RESULTS" --out docs/results_rl.md
