#!/usr/bin/env bash
# One prepared check of counterwarp on a CUDA machine: the card, the test suite, the
# benchmarks (the paper case beside the product's), one 64^3 fit to quality.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --fetch-wheels  # here, beforehand: wheels the GPU image lacks
#
# Everything goes to $OUT (default benchmarks/results/gpu-check), flat, at most 8 files:
#   gpu.txt         nvidia-smi and what torch sees
#   pytest.txt      `pytest -q tests` with COUNTERWARP_TEST_DEVICE=cuda
#   bench.txt       the benchmark logs (eager with bf16 variants, then torch.compile)
#   <gpu>.json/.md  eager benchmark results (all impls, both sizes, bf16 variants)
#   <gpu>-compile.json/.md  impl auto at 64^3 batch 4 training, eager vs compiled, fp32 and bf16
#   time_to_quality.md  a 64^3 cohort, its classifier, fits of two variants scored over time
#
# Each part runs under `timeout` with its own budget (seconds, override by environment):
#   TEST_BUDGET=200 BENCH_BUDGET=120 COMPILE_BUDGET=90 TTQ_BUDGET=150 -> under 10 minutes.
# A part that fails or runs out of time is reported and the next part still runs; the exit
# status is that of the test suite (0 when it passed).
#
# DEVICE=cpu makes a dry run of the whole script on a machine without a GPU, and BENCH_ARGS
# is appended to both benchmark commands (e.g. BENCH_ARGS="--sizes 16:2 --repeats 1").
#
# Python: $PY if set, else .venv/bin/python when its torch sees CUDA, else python3.
# Packages missing there (the GPU image has torch, numpy, scipy, pandas, matplotlib, tqdm,
# pytest, hypothesis but not monai, nibabel, nilearn, captum) are installed from ./.whl if
# that folder exists (make it with --fetch-wheels; it must travel with the working tree).
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
WHEELS="${WHEELS:-$ROOT/.whl}"
# the packages of pyproject.toml that the GPU image lacks, pinned to what the project tests with
MISSING_PACKAGES="monai==1.6.1 nibabel==5.4.2 nilearn==0.14.1 captum==0.9.0"

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    # Runs HERE (needs PyPI): pure-python wheels for the GPU image's Python 3.12.
    mkdir -p "$WHEELS"
    # shellcheck disable=SC2086
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" $MISSING_PACKAGES || exit 1
    ls -l "$WHEELS"
    grep -qxF "/.whl/" .git/info/exclude 2>/dev/null \
        || echo "hint: echo /.whl/ >> .git/info/exclude  (then name .whl in the run's carry)"
    exit 0
fi

OUT="${OUT:-$ROOT/benchmarks/results/gpu-check}"
mkdir -p "$OUT"
TEST_BUDGET="${TEST_BUDGET:-200}"
BENCH_BUDGET="${BENCH_BUDGET:-120}"
COMPILE_BUDGET="${COMPILE_BUDGET:-90}"
TTQ_BUDGET="${TTQ_BUDGET:-150}"
DEVICE="${DEVICE:-cuda}"
read -r -a EXTRA <<< "${BENCH_ARGS:-}"
export PYTHONUNBUFFERED=1

if [[ -z "${PY:-}" ]]; then
    PY=python3
    if [[ -x .venv/bin/python ]] && .venv/bin/python -c \
        "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        PY=.venv/bin/python
    fi
fi

if ! "$PY" -c "import monai, nibabel, nilearn, captum" 2>/dev/null; then
    if [[ -d "$WHEELS" ]]; then
        echo "== installing $(ls "$WHEELS" | wc -l) carried wheel(s) into /tmp/site"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site "$WHEELS"/*.whl
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "warning: monai/nibabel/nilearn/captum missing and no .whl folder;" \
             "run 'bash benchmarks/gpu_check.sh --fetch-wheels' here first"
    fi
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"

{
    echo "== $(date -u +%FT%TZ) $(hostname)"
    nvidia-smi || echo "nvidia-smi not available"
    "$PY" - <<'PYEOF'
import torch
print("python torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name} {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
PYEOF
} 2>&1 | tee "$OUT/gpu.txt"

if [[ "$DEVICE" == "cpu" ]]; then
    GPU_SLUG="cpu-dry-run"
elif ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device visible to $PY: nothing to check (DEVICE=cpu for a dry run)" \
        | tee -a "$OUT/gpu.txt"
    exit 3
else
    GPU_SLUG="$("$PY" -c "import torch, re; n = torch.cuda.get_device_name(0).lower(); \
print(re.sub(r'[^a-z0-9]+', '-', n).strip('-'))")"
fi

echo "== test suite (budget ${TEST_BUDGET}s)"
COUNTERWARP_TEST_DEVICE="$DEVICE" timeout -k 10 "$TEST_BUDGET" \
    "$PY" -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest.txt"
TEST_STATUS=$?
[[ $TEST_STATUS -eq 124 ]] && echo "test suite: out of time after ${TEST_BUDGET}s" \
    | tee -a "$OUT/pytest.txt"

echo "== benchmarks, eager + bf16 autocast (budget ${BENCH_BUDGET}s)" | tee "$OUT/bench.txt"
timeout -k 10 "$BENCH_BUDGET" "$PY" benchmarks/run.py --device "$DEVICE" --bf16 \
    --variants channels_last,inference_mode --repeats 10 --warmup 2 \
    --machine "$GPU_SLUG" --out "$OUT" "${EXTRA[@]}" 2>&1 | tee -a "$OUT/bench.txt"
echo "eager benchmarks exit status $?" | tee -a "$OUT/bench.txt"

echo "== benchmarks, torch.compile (budget ${COMPILE_BUDGET}s)" | tee -a "$OUT/bench.txt"
timeout -k 10 "$COMPILE_BUDGET" "$PY" benchmarks/run.py --device "$DEVICE" --impls auto \
    --variants compile,bf16 --sizes 64:4 --no-explain --repeats 10 --warmup 2 --case-timeout 120 \
    --machine "$GPU_SLUG-compile" --out "$OUT" "${EXTRA[@]}" 2>&1 | tee -a "$OUT/bench.txt"
echo "compiled benchmarks exit status $?" | tee -a "$OUT/bench.txt"

echo "== 64^3 fit to quality (budget ${TTQ_BUDGET}s)" | tee -a "$OUT/bench.txt"
TTQ_DIR="$(mktemp -d)"
timeout -k 10 "$TTQ_BUDGET" "$PY" benchmarks/time_to_quality.py --out "$TTQ_DIR" \
    --n 80 --shape 64 64 64 --epochs 5 --device "$DEVICE" --variants full,half+bf16 --seeds 0 \
    --batch-size 8 --budget-s 40 --eval-every 10 2>&1 | tail -n 20 | tee -a "$OUT/bench.txt"
TTQ_STATUS=$?
cp "$TTQ_DIR/time_to_quality.md" "$OUT/" 2>/dev/null || echo "no time_to_quality.md"
echo "time to quality exit status $TTQ_STATUS" | tee -a "$OUT/bench.txt"

echo "== done: test suite exit status $TEST_STATUS; files in $OUT:"
ls -l "$OUT"
exit "$TEST_STATUS"
