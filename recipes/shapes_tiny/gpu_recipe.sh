#!/usr/bin/env bash
# The default-model recipe on one CUDA GPU, in one command (<= 9 minutes on an H100): VAE, reasoner and editor with
# configs/gpu/*.yaml, each under a wall-clock cap (max_minutes: it checkpoints, stops and exports when reached), then
# export (fp16 folder) and its MICE-Shapes bench. See docs/training.md, "On a GPU machine".
#
#   bash recipes/shapes_tiny/gpu_recipe.sh             # from the repository root, on the GPU machine
#   bash recipes/shapes_tiny/gpu_recipe.sh --prepare   # where PyPI is reachable: the wheels the GPU machine lacks -> .whl/
#
# Python: $PYTHON if set; else .venv/bin/python if its torch sees CUDA; else python3. Wheels in .whl/ (diffusers,
# transformers, accelerate and trl at the versions of requirements-ci.txt, from --prepare) are installed into a
# scratch folder first, and the repository goes on PYTHONPATH, so a machine with CUDA torch but without this
# project's packages runs it.
#
# Results go to $OUT (default runs/gpu/out), kept to a few files: recipe.log (everything printed), runs.tar.gz (every
# stage's config, log.jsonl, loss.png, metrics; rewritten after each stage), loss_editor.png, export_report.json (the
# bench) and the exported model as editr2-shapes-tiny.tar.part-* (`cat editr2-shapes-tiny.tar.part-* | tar x`).
#
# Carried stages: VAE_RUN / REASONER_RUN name finished stage folders (e.g. runs/vae_decoder and runs/reasoner_short,
# copied to the GPU machine); those stages are then not trained, and the editor gets their time (EDITOR_MINUTES).
#
# Editor steps fitted to its time (FIT_EDITOR=1, the default): a short calibration run (CALIBRATION_STEPS, 120) in
# $RUN_ROOT/editor_calibration measures this machine's steps per second with the stage's own config and flags, and
# the editor then gets max_steps = that rate x 80% of EDITOR_MINUTES (evaluations at 1/4, 2/4, 3/4 and the end), so
# its learning-rate schedule and curricula run to completion inside the cap instead of being cut by it.
# The editor's run folder (fp32 transformer, config, log, loss curve, metrics; no optimizer) comes back as
# editor_run.tar.part-* as soon as the stage ends; EXPORT=0 stops there (export and bench it where you are).
#
# Environment: VAE_MINUTES (1), REASONER_MINUTES (1.75), EDITOR_MINUTES (3.5), BENCH_SESSIONS (10, per family; 0: none),
# REASONER_FINAL_SESSIONS (4, per family), RUN_ROOT (runs/gpu), EDITOR_CONFIG (configs/gpu/editor.yaml; e.g.
# configs/gpu/editor_polish.yaml to continue a finished run), VAE_ARGS / REASONER_ARGS / EDITOR_ARGS (more flags
# for a stage, e.g. EDITOR_ARGS="--max_steps 2400"), PREFLIGHT (1: first run the CUDA tests of
# tests/test_train_default_device.py, ~30 s, and stop on a failure), DEVICE (cuda; "cpu" only to smoke-test this
# script at micro size). Run again to resume every stage from its checkpoints.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
D=recipes/shapes_tiny
C=$D/configs/gpu

if [ "${1:-}" = "--prepare" ]; then  # on a machine with PyPI: fetch the pure-Python wheels the GPU image lacks
    mkdir -p .whl
    for package in diffusers transformers accelerate trl; do  # the stages use accelerate and TrlParser
        version="$(grep -i "^$package==" requirements-ci.txt | cut -d= -f3)"
        "${PYTHON:-python3}" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux2014_x86_64 -d .whl "$package==$version"
    done
    echo "wheels in .whl/ (git-ignored); copy .whl/ with the repository to the GPU machine, then run: bash $D/gpu_recipe.sh"
    exit 0
fi

OUT="${OUT:-runs/gpu/out}"
W="${RUN_ROOT:-runs/gpu}"
mkdir -p "$OUT" "$W"
LOG="$OUT/recipe.log"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ] && .venv/bin/python -c \
        'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
        PYTHON=.venv/bin/python
    else
        PYTHON=python3
    fi
fi
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

for wheel in .whl/*.whl; do  # each carried wheel in its own folder, used only if it imports with what is installed
    [ -f "$wheel" ] || continue
    name="$(basename "$wheel" | cut -d- -f1)"
    site="/tmp/editr2-site/$name"
    if ! "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$wheel" >>"$LOG" 2>&1; then
        log "$(basename "$wheel") does not install here (see above): using the installed $name"
    elif PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -c "import $name" >>"$LOG" 2>&1; then
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
        log "using $(basename "$wheel")"
    else
        log "$(basename "$wheel") does not import here (see above): using the installed $name"
    fi
done
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

pack_runs() {  # the small outputs of every stage so far, in one file
    local files=()
    for stage in vae reasoner editor; do
        for name in config.json log.jsonl loss.png metrics.json eval_samples.json export_report.json; do
            [ -f "$W/$stage/$name" ] && files+=("$stage/$name")
        done
    done
    [ ${#files[@]} -gt 0 ] && tar -czf "$OUT/runs.tar.gz" -C "$W" "${files[@]}"
    [ -f "$W/editor/loss.png" ] && cp "$W/editor/loss.png" "$OUT/loss_editor.png"
    return 0
}

stage() {  # stage NAME COMMAND...: run it, log its output and time, pack the outputs
    local name=$1 start=$SECONDS
    shift
    log "stage $name: $*"
    "$@" 2>&1 | tee -a "$LOG"
    log "stage $name: done in $((SECONDS - start)) s"
    pack_runs
}

log "python: $PYTHON; OUT=$OUT; runs in $W"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG" || true
DEVICE="${DEVICE:-cuda}"
DEVICE="$DEVICE" "$PYTHON" - 2>&1 <<'EOF' | tee -a "$LOG"
import os
import sys

try:
    import diffusers
    import torch
    import transformers

    import diffusers_editr2  # noqa: F401
    import editr2  # noqa: F401
except ImportError as error:
    sys.exit(f"{error} (python {sys.executable}): set PYTHON, or run `bash recipes/shapes_tiny/gpu_recipe.sh "
             f"--prepare` where PyPI is reachable and copy .whl/ here")

print(f"python {sys.version.split()[0]}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
      f"transformers {transformers.__version__}")
if os.environ["DEVICE"].startswith("cuda") and not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device: run this on a GPU machine (or set PYTHON to a CUDA build of torch)")
print(f"device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}")
EOF

if [ "${PREFLIGHT:-1}" = 1 ]; then  # ~30 s: every stage at micro size on this device, before the real run
    stage preflight "$PYTHON" -m pytest -q -x -p no:cacheprovider tests/test_train_default_device.py -k cuda
fi

GPU=(--no_progress --device "$DEVICE" --mixed_precision bf16)
# shellcheck disable=SC2086  # *_ARGS are word-split on purpose
VAE_DIR="${VAE_RUN:-$W/vae}"
if [ -n "${VAE_RUN:-}" ]; then
    log "stage vae: using the carried $VAE_RUN"
else
    stage vae "$PYTHON" -m recipes.shapes_tiny.train_vae --config $C/vae.yaml --run_dir "$W/vae" "${GPU[@]}" \
        --max_minutes "${VAE_MINUTES:-1}" ${VAE_ARGS:-}
fi
# shellcheck disable=SC2086
REASONER_DIR="${REASONER_RUN:-$W/reasoner}"
if [ -n "${REASONER_RUN:-}" ]; then
    log "stage reasoner: using the carried $REASONER_RUN"
else
    stage reasoner "$PYTHON" -m recipes.shapes_tiny.train_reasoner --config $C/reasoner.yaml --run_dir "$W/reasoner" \
        "${GPU[@]}" --max_minutes "${REASONER_MINUTES:-1.75}" --final_sessions "${REASONER_FINAL_SESSIONS:-4}" \
        ${REASONER_ARGS:-}
fi
EDITOR=("$PYTHON" -m recipes.shapes_tiny.train_editor --config "${EDITOR_CONFIG:-$C/editor.yaml}" "${GPU[@]}"
        --vae_path "$VAE_DIR/vae" --reasoner_path "$REASONER_DIR")
# shellcheck disable=SC2206  # EDITOR_ARGS is word-split on purpose
EDITOR+=(${EDITOR_ARGS:-})
FIT=()
if [ "${FIT_EDITOR:-1}" = 1 ] && [ ! -d "$W/editor/checkpoints" ]; then  # a resumed run keeps its schedule
    CAL="$W/editor_calibration"
    rm -rf "$CAL"
    stage calibration "${EDITOR[@]}" --run_dir "$CAL" --max_steps 1000000 --eval_every 1000000 \
        --save_every 1000000 --stop_after "${CALIBRATION_STEPS:-120}"
    read -r -a FIT < <("$PYTHON" - "$CAL/log.jsonl" "${EDITOR_MINUTES:-3.5}" <<'EOF' 2> >(tee -a "$LOG" >&2)
import json
import sys

rows = [json.loads(line) for line in open(sys.argv[1]) if '"train"' in line]
first, last = rows[len(rows) // 3], rows[-1]  # skip the start-up steps (CUDA kernels, data workers)
rate = (last["step"] - first["step"]) / (last["seconds"] - first["seconds"])
steps = max(100, int(rate * 60 * float(sys.argv[2]) * 0.8))
print(f"--max_steps {steps} --eval_every {max(1, steps // 4)} --save_every {max(1, steps // 8)} "
      f"--warmup {min(200, steps // 10)}")
print(f"calibration: {rate:.2f} steps/s -> max_steps={steps}", file=sys.stderr)
EOF
    )
    [ ${#FIT[@]} -gt 0 ] || { log "calibration failed (see above)"; exit 1; }
    log "editor fitted to ${EDITOR_MINUTES:-3.5} minutes: ${FIT[*]}"
fi
stage editor "${EDITOR[@]}" --run_dir "$W/editor" --max_minutes "${EDITOR_MINUTES:-3.5}" "${FIT[@]}"
# the editor's result, before anything else can fail: fp32 transformer and the small files, no optimizer state
(cd "$W/editor" && tar -cf - transformer $(ls config.json log.jsonl loss.png metrics.json 2>/dev/null)) \
    | split -b 15m - "$OUT/editor_run.tar.part-"
[ "${EXPORT:-1}" = 1 ] || { log "done (EXPORT=0): $(ls "$OUT" | tr '\n' ' ')"; exit 0; }

MODEL="$OUT/editr2-shapes-tiny"
EXPORT=("$PYTHON" -m recipes.shapes_tiny.export --vae "$VAE_DIR" --reasoner "$REASONER_DIR" --editor "$W/editor" --out "$MODEL"
        --threads 8 --no-progress)
stage export "${EXPORT[@]}"
tar -cf - -C "$OUT" editr2-shapes-tiny | split -b 15m - "$OUT/editr2-shapes-tiny.tar.part-"  # <= 16 MiB a file
if [ "${BENCH_SESSIONS:-10}" -gt 0 ]; then
    stage bench "${EXPORT[@]}" --bench-sessions "${BENCH_SESSIONS:-10}"
    cp "$W/editor/export_report.json" "$OUT/export_report.json"
fi
rm -rf "$MODEL"  # shipped as the tar parts above (what comes back from $OUT is a few files)
log "done: $(ls "$OUT" | tr '\n' ' ')"
