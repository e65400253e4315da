#!/usr/bin/env bash
# The whole pipeline on a cohort built from a real individual's anatomy (Colin27), via the CLI:
#
#   synth --anatomy colin27 -> train-classifier -> fit -> explain (held-out) -> benchmark
#
#   bash benchmarks/colin27_pipeline.sh                      # the demo's sizes, from the repo root
#   ANATOMY=mni152 OUT=runs/mni152-pipeline bash benchmarks/colin27_pipeline.sh   # the baseline
#   N=8 SHAPE="16 16 16" EPOCHS=1 STEPS=5 METHODS=gradient OUT=/tmp/cw-tiny \
#       bash benchmarks/colin27_pipeline.sh                  # a smoke run, < 1 minute
#
# Sizes default to `counterwarp demo`'s (workflows/demo.py, "full"): 200 subjects at 32^3,
# 30 classifier epochs, 600 simulator steps; on 2 CPU cores expect roughly the demo's 10
# minutes plus the benchmark's saliency baselines. Settings (environment):
#   ANATOMY=colin27  N=200  SHAPE="32 32 32"  DIM=3  EFFECT=1.0  SEED=0  EPOCHS=30  STEPS=600
#   METHODS=all  (benchmark saliency baselines)  DEVICE=  (benchmark/fit torch device; default:
#   cuda if available)  OUT=runs/colin27-pipeline  COUNTERWARP=.venv/bin/counterwarp
#
# Colin27 is ch2bet.nii.gz of Debian's mricron-data (`apt-get install mricron-data`), read from
# $COUNTERWARP_MRICRON_DIR or /usr/share/mricron/templates. Files, under $OUT:
#   cohort/ (synth), run/ (classifier + simulator), explain/ (maps of the held-out subjects),
#   benchmark/results.md|json|csv (simulator vs saliency against the truth), timings.txt.
# Rerunning into the same $OUT replaces what the previous run wrote there (counterwarp refuses
# files it did not write). The script stops at the first step that fails, with its status.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CW="${COUNTERWARP:-$ROOT/.venv/bin/counterwarp}"
ANATOMY="${ANATOMY:-colin27}"
N="${N:-200}"
read -r -a SHAPE_ARGS <<< "${SHAPE:-32 32 32}"
DIM="${DIM:-3}"
EFFECT="${EFFECT:-1.0}"
SEED="${SEED:-0}"
EPOCHS="${EPOCHS:-30}"
STEPS="${STEPS:-600}"
METHODS="${METHODS:-all}"
OUT="${OUT:-$ROOT/runs/$ANATOMY-pipeline}"
DEVICE_ARGS=()
if [[ -n "${DEVICE:-}" ]]; then DEVICE_ARGS=(--device "$DEVICE"); fi
export PYTHONUNBUFFERED=1

ANATOMY_ARGS=(--anatomy "$ANATOMY")

mkdir -p "$OUT"
COHORT="$OUT/cohort"; RUN="$OUT/run"; EXPLAINED="$OUT/explain"; BENCH="$OUT/benchmark"
TIMINGS="$OUT/timings.txt"
: > "$TIMINGS"

step() {  # step NAME COMMAND...: run it, log its wall time to timings.txt
    local name="$1"; shift
    echo "[colin27-pipeline] $name ..."
    local started=$SECONDS
    "$@"
    echo "$name $((SECONDS - started)) s" | tee -a "$TIMINGS"
}

step synth "$CW" synth --out "$COHORT" "${ANATOMY_ARGS[@]}" --n "$N" --dim "$DIM" \
    --shape "${SHAPE_ARGS[@]}" --effect "$EFFECT" --seed "$SEED"
step train-classifier "$CW" train-classifier --manifest "$COHORT/manifest.csv" --out "$RUN" \
    --epochs "$EPOCHS" --seed "$SEED" --overwrite
step fit "$CW" fit --manifest "$COHORT/manifest.csv" --run "$RUN" --steps "$STEPS" \
    --seed "$SEED" "${DEVICE_ARGS[@]}"
step explain "$CW" explain --run "$RUN" --manifest "$COHORT/manifest.csv" --split test \
    --out "$EXPLAINED"
step benchmark "$CW" benchmark --data "$COHORT" --run "$RUN" --out "$BENCH" \
    --methods "$METHODS" --seed "$SEED" "${DEVICE_ARGS[@]}"

echo "[colin27-pipeline] anatomy $ANATOMY: $(grep -o '"anatomy": *"[a-z0-9]*"' \
    "$COHORT/cohort.json" || echo 'not recorded')"
echo "[colin27-pipeline] timings ($TIMINGS):"; cat "$TIMINGS"
echo "[colin27-pipeline] results: $BENCH/results.md"
cat "$BENCH/results.md"
