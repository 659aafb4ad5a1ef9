#!/usr/bin/env bash
# The RL study: every (arm, seed) of `python -m recipes.shapes_tiny.rl_runs` (train, resumable, then bench 3- and
# 6-turn held-out sessions), JOBS runs at a time, then the page (`python -m recipes.shapes_tiny.rl_page`). The RL arms
# run seed by seed (the two arms of a seed side by side), the SFT benches last. Stop it anywhere (kill the script's
# process group, or let the machine stop); rerunning the same command continues: runs whose committed results are
# complete are left out (on a fresh clone too: `rl_runs --check`), finished runs are not trained again, a run resumes
# from its newest checkpoint (every 5 steps) and benched sessions are read back.
#
#   nohup bash recipes/shapes_tiny/rl_study.sh > runs/rl_study.log 2>&1 &    # CPU: two runs, one per core
#   DEVICE=cuda bash recipes/shapes_tiny/rl_study.sh                         # one CUDA GPU: three runs share it
#   JOBS=1 SEEDS="0" ARMS="rl" bash recipes/shapes_tiny/rl_study.sh          # one run
#   SEEDS="0" ARMS="sft rl" SESSIONS=20 EXTRA="--max-steps 5" bash recipes/shapes_tiny/rl_study.sh   # a short check
#   DRY_RUN=1 bash recipes/shapes_tiny/rl_study.sh                           # print the commands
#
# Environment: PY (python, default .venv/bin/python), DEVICE (cpu or cuda, default cpu), JOBS (runs at a time: 2 on a
# CPU, 3 on a GPU), THREADS (torch CPU threads per run: 1 on a CPU, 4 on a GPU), SEEDS ("0 1 2"), ARMS ("rl
# rl_nofilter sft"), SESSIONS (held-out sessions per family, 200), TURNS ("3,6"), RESULTS (docs/rl_runs), RUN_DIR
# (runs/rl), NICE (10), EXTRA (more rl_runs flags, e.g. "--max-steps 50").
set -euo pipefail
cd "$(dirname "$0")/../.."

PY=${PY:-.venv/bin/python}
DEVICE=${DEVICE:-cpu}
case "$DEVICE" in
    cpu) JOBS=${JOBS:-2}; THREADS=${THREADS:-1} ;;
    cuda) JOBS=${JOBS:-3}; THREADS=${THREADS:-4} ;;
    *) echo "DEVICE=$DEVICE: use cpu or cuda" >&2; exit 2 ;;
esac
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

if [ "${DRY_RUN:-0}" != 1 ] && [ "$DEVICE" = cuda ]; then
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: set DEVICE=cpu')"
fi

# the (arm, seed) list: the training arms seed by seed, then the SFT benches
runs=()
for seed in $SEEDS; do
    for arm in $ARMS; do [ "$arm" = sft ] || runs+=("$arm $seed"); done
done
for seed in $SEEDS; do
    for arm in $ARMS; do [ "$arm" != sft ] || runs+=("$arm $seed"); done
done

# leave out the runs whose committed results are complete (`rl_runs --check`; a dry run lists them all)
todo=()
for entry in "${runs[@]}"; do
    read -r arm seed <<< "$entry"
    # shellcheck disable=SC2086  # EXTRA holds several flags
    if [ "${DRY_RUN:-0}" != 1 ] && "$PY" -m recipes.shapes_tiny.rl_runs --arm "$arm" --seed "$seed" \
            --sessions "$SESSIONS" --turns "$TURNS" --results "$RESULTS" --run-dir "$RUN_DIR" --check $EXTRA; then
        continue
    fi
    todo+=("$entry")
done
runs=("${todo[@]}")

lane() {  # every JOBS-th run, starting at $1
    local i
    for ((i = $1; i < ${#runs[@]}; i += JOBS)); do
        read -r arm seed <<< "${runs[$i]}"
        # shellcheck disable=SC2086  # EXTRA holds several flags
        run "$PY" -m recipes.shapes_tiny.rl_runs --arm "$arm" --seed "$seed" --device "$DEVICE" --threads "$THREADS" \
            --sessions "$SESSIONS" --turns "$TURNS" --results "$RESULTS" --run-dir "$RUN_DIR" --no-progress $EXTRA
    done
}

pids=()
for ((k = 0; k < JOBS; k++)); do lane "$k" & pids+=($!); done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
if [ "$failed" != 0 ]; then echo "a run failed (its error is above); rerun the same command to continue" >&2; exit 1; fi
run "$PY" -m recipes.shapes_tiny.rl_page --results "$RESULTS" --out docs/results_rl.md --notes docs/results_rl_notes.md
