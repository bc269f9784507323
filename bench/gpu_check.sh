#!/usr/bin/env bash
# The device check as one command: carried wheels, `pytest -m gpu`, then every bench section in turn,
# each under its own time budget, each writing its JSON (and log) to $OUT the moment it ends.
#
#   bench/gpu_check.sh             # on the GPU machine (one H100/H200, the image of KINDS.md), $OUT set
#   bench/gpu_check.sh --dry-run   # here, on the CPU: tiny shape, in a venv holding only what the image has
#   make gpu-check                 # the first form
#
# Needs .whl/ (GPU, CPython 3.12) or .whl-py311/ (dry run) from bench/build_gpu_wheels.sh; the
# device call carries .whl. Budgets (seconds) add up to 470 plus installs: under 8 minutes when no
# section overruns; one that does is killed, recorded (rc 124) and the next one runs.
# $OUT/summary.jsonl has one line per step: name, exit status, seconds, budget.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT=${OUT:-$PWD/bench/gpu-out}
mkdir -p "$OUT"
: > "$OUT/summary.jsonl"

if ((DRY)); then
    VENV=${GPU_IMAGE_VENV:-$PWD/.gpu-image-venv}
    if [[ ! -x $VENV/bin/python ]]; then  # the image's packages (CPU torch here), nothing else
        python3 -m venv "$VENV" || exit 1
        "$VENV/bin/pip" install -q -c constraints.txt torch==2.13.0 transformers accelerate peft safetensors \
            pyyaml numpy huggingface_hub fsspec pytest || exit 1
    fi
    PY=$VENV/bin/python
    WHEELS=.whl-py311
    SITE=/tmp/loram-gpu-check-site-py311
    BENCH=(--shape tiny --device cpu --calib 8 --taylor-calib 4 --seq 64 --batch 4 --steps 4)
    SCALE=4  # the CPU's tiny shape, on shared cores: budgets x4 (the dry run checks that each runs)
else
    PY=python3
    WHEELS=.whl
    SITE=/tmp/site
    BENCH=(--shape tinyllama --device cuda)
    SCALE=1
fi
[[ -d $WHEELS ]] || { echo "no $WHEELS/: run bench/build_gpu_wheels.sh first" >&2; exit 2; }
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl || exit 1
export PYTHONPATH=$SITE:$PWD
WORK=${WORK:-/tmp/loram-gpu-check-work}
mkdir -p "$WORK"

step() {  # step NAME BUDGET_S COMMAND...: run it under its budget, log to $OUT/NAME.log, record it
    local name=$1 budget=$(($2 * SCALE))
    shift 2
    local t0=$SECONDS
    timeout --kill-after=15 "$budget" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    printf '{"step": "%s", "rc": %d, "seconds": %d, "budget_s": %d}\n' "$name" "$rc" $((SECONDS - t0)) "$budget" \
        | tee -a "$OUT/summary.jsonl"
}

"$PY" - <<'PY' > "$OUT/environment.json"
import json, importlib.util, sys, torch
names = ["torch", "transformers", "accelerate", "peft", "pydantic", "bitsandbytes", "llmcompressor", "prefect", "datasets"]
print(json.dumps({"python": sys.version, "cuda": torch.version.cuda, "gpu": torch.cuda.is_available() and torch.cuda.get_device_name(),
                  "importable": {n: importlib.util.find_spec(n) is not None for n in names}}, indent=2))
PY
step pytest-gpu 60 "$PY" -m pytest -m gpu tests/gpu -q -p no:cacheprovider --junitxml="$OUT/pytest-gpu.xml"
for pair in base:30 prune-semi:60 prune-unstructured:60 llmcompressor:20 prune-streamed:50 align-eager:40 \
            align-compiled:65 align-trainer:40 nf4:30 evaluate:15; do
    name=${pair%%:*}
    step "$name" "${pair##*:}" "$PY" bench/bench_gpu.py --section "$name" --work "$WORK" --out-dir "$OUT" "${BENCH[@]}"
done
failed=$(grep -vc '"rc": 0,' "$OUT/summary.jsonl")
echo "gpu_check: $failed step(s) failed; results in $OUT"
exit $((failed > 0))
