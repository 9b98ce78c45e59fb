#!/usr/bin/env bash
# Cold start: the side-by-side 100-adapter trace (256 requests, Poisson at 32 req/s, zipf over 100
# adapters of ranks 8-64 on all seven targets, 64-token prompts, 64 output tokens) against a server
# that preloaded every adapter into host RAM and against one that preloaded nothing (every adapter
# read from disk and parsed on its first request), alternating so that both see the same machine.
#   python benchmarks/make_adapters.py -n 100 --ranks 8,16,32,64 --out /tmp/ad100   (once)
#   bash benchmarks/cold_start.sh [ROUNDS]
# Writes benchmarks/results/cold-{preloaded,cold}<round>.json and prints each run's output tok/s.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-2}
OUT=benchmarks/results
PORT=8125
TRACE=(--rate 32 --cv 1 --popularity zipf --alpha 1 --input-len 64 --output-len 64 --num-requests 256 --seed 0)

run() {  # run LABEL [server flags]
  local label=$1
  shift
  python -m slserve.cli serve --port "$PORT" --adapter-dir /tmp/ad100 "$@" --log-level warning \
    > "$OUT/cold-server.log" 2>&1 &
  local server=$!
  for _ in $(seq 480); do curl -sf "localhost:$PORT/health" > /dev/null && break; sleep 0.5; done
  python benchmarks/load_test.py --base-url "http://127.0.0.1:$PORT" --adapters lora-/100 "${TRACE[@]}" \
    --no-progress --out "$OUT/cold-$label.json" > /dev/null
  kill "$server"; wait "$server" 2> /dev/null || true
}

for r in $(seq "${FIRST:-1}" "$ROUNDS"); do
  run "preloaded$r" --preload-adapters
  run "cold$r"
done
python - "$OUT" "${FIRST:-1}" "$ROUNDS" <<'PY'
import json, sys
out, first, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
print("| round | preloaded out tok/s | cold out tok/s | cold / preloaded | cold TTFT p99 s |")
print("|---:|---:|---:|---:|---:|")
for r in range(first, rounds + 1):
    p, c = (json.load(open(f"{out}/cold-{k}{r}.json"))["summary"] for k in ("preloaded", "cold"))
    tp, tc = p["output_token_throughput"], c["output_token_throughput"]
    print(f"| {r} | {tp:.1f} | {tc:.1f} | {tc / tp:.1%} | {c['ttft_s']['p99']:.2f} |")
PY
