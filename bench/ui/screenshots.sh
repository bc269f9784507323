#!/usr/bin/env bash
# Screenshots of the Prefect UI during and after a real `loram run`, in a headless Chromium:
#   bench/ui/screenshots.sh            (needs `apt-get install -y chromium`; ~15 min on 2 busy cores)
#   CACHE=DIR bench/ui/screenshots.sh  (a base.cache_dir holding this tiny demo base already: no pretraining)
# A Prefect server of its own (own PREFECT_HOME, a non-default port) runs a small demo twice: a full
# run (shot while alignment runs, then when done) and a prune-only run, so the runs list shows names
# that tell runs apart. The PNGs land in bench/ui/.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=bench/ui
PORT=${PORT:-4299}
WORK=$(mktemp -d)
CACHE=${CACHE:-$WORK/cache}
export PREFECT_HOME="$WORK/prefect"
export PREFECT_SERVER_API_PORT=$PORT
export PREFECT_API_URL="http://127.0.0.1:$PORT/api"
export PREFECT_UI_API_URL="$PREFECT_API_URL"   # without it the UI asks port 4200 and stays blank
UI="http://127.0.0.1:$PORT"

.venv/bin/prefect server start --host 127.0.0.1 --port "$PORT" > "$WORK/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 240); do curl -sf "$PREFECT_API_URL/health" > /dev/null && break; sleep 1; done

TINY=(base.demo.vocab_size=512 base.demo.hidden_size=64 base.demo.intermediate_size=128
      base.demo.num_hidden_layers=3 base.demo.num_attention_heads=4 base.demo.num_key_value_heads=2
      base.demo.seq_len=64 base.demo.pretrain_steps=150 base.demo.lr=0.01 corpus.seq_len=64
      corpus.max_tokens=60000 corpus.eval_blocks=8 calibration.samples=8 align.steps=150 align.log_every=5
      align.eval_every=25 align.lr=0.003 verify.steps=10 verify.train_examples=64 verify.heldout_examples=16
      "workdir=$WORK/work" "base.cache_dir=$CACHE" "publish.uri=file://$WORK/bucket")

shoot() {  # shoot NAME URL [MS]: a 1400x1000 PNG once the single-page app has rendered (MS of virtual time)
  chromium --headless --no-sandbox --disable-gpu --disable-background-networking --hide-scrollbars \
    --window-size=1400,1000 --virtual-time-budget="${3:-20000}" --screenshot="$OUT/$1.png" "$2" 2> /dev/null
  echo "shot $OUT/$1.png"
}
api() { curl -sf -X POST -H 'Content-Type: application/json' -d "$2" "$PREFECT_API_URL/$1"; }
latest() {  # latest KEY: the newest artifact of the key, as JSON
  api artifacts/filter "{\"artifacts\": {\"key\": {\"any_\": [\"$1\"]}}, \"sort\": \"CREATED_DESC\", \"limit\": 1}" \
    | .venv/bin/python -c 'import json,sys; rows=json.load(sys.stdin); print(json.dumps(rows[0]) if rows else "")'
}
field() { .venv/bin/python -c "import json,sys; print(json.loads(sys.stdin.read() or '{}').get('$1', ''))"; }

.venv/bin/loram run configs/demo.yaml "${TINY[@]}" > "$WORK/run1.out" 2>&1 &
RUN=$!
# While alignment runs, past its third held-out point: its step card and its loss curve.
for _ in $(seq 600); do
  points=$(latest alignment-loss | .venv/bin/python -c '
import json, re, sys
text = sys.stdin.read()
print(len(re.findall(r"\| \d+ \| [\d.]+ \| [\d.]+ \|", json.loads(text)["data"])) if text.strip() else 0)')
  if [[ $points -ge 3 && $(latest step-align) == *"| state | running |"* ]]; then break; fi
  sleep 3
done
shoot align-card-during "$UI/artifacts/artifact/$(latest step-align | field id)"
shoot loss-curve-during "$UI/artifacts/artifact/$(latest alignment-loss | field id)"
wait $RUN
FLOW=$(latest provider-summary | field flow_run_id)
shoot flow-run-artifacts "$UI/runs/flow-run/$FLOW?tab=Artifacts"
shoot summary "$UI/artifacts/artifact/$(latest provider-summary | field id)"
shoot pruning-plan "$UI/artifacts/artifact/$(latest pruning-plan | field id)"
shoot verification-table "$UI/artifacts/artifact/$(latest lora-verification | field id)"
shoot align-card-done "$UI/artifacts/artifact/$(latest step-align | field id)"

.venv/bin/loram run configs/demo.yaml "${TINY[@]}" prune.strategy=structured --until prune > "$WORK/run2.out" 2>&1
shoot summary-prune-only "$UI/artifacts/artifact/$(latest provider-summary | field id)"
shoot runs-list "$UI/runs" 60000  # the list loads after the chart: more time
cp "$WORK/run1.out" "$OUT/run-full.txt"
cp "$WORK/run2.out" "$OUT/run-prune-only.txt"
echo "terminal output of both runs: $OUT/run-full.txt, $OUT/run-prune-only.txt"
