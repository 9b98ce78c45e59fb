#!/usr/bin/env bash
# A/B of the single-process server at another revision against the working tree, on the saturating
# 100-adapter trace of run_results.sh (96 requests at 16 req/s, power-law popularity, preloaded
# adapters), alternating A, B, A, B... so that both see the same machine.
#   python benchmarks/make_adapters.py -n 100 --ranks 8,16,32,64 --out /tmp/ad100   (once)
#   bash benchmarks/ab_server.sh REV [ROUNDS]      e.g. bash benchmarks/ab_server.sh 4b6dee9 2
#   FIRST=3 bash benchmarks/ab_server.sh REV 4     adds rounds 3 and 4 to an earlier run
#   B_FLAGS="--affinity-bound 0" bash benchmarks/ab_server.sh REV 4   extra server flags for B
# Writes benchmarks/results/ab-<rev><TAG>-{a,b}<round>.json (TAG: optional, e.g. TAG=-s2) and prints
# the output tok/s of each run.
set -euo pipefail
cd "$(dirname "$0")/.."
REV=$1
ROUNDS=${2:-2}
OUT=benchmarks/results
PORT=8124
TREE=$(mktemp -d)/before
git worktree add -q --detach "$TREE" "$REV"
trap 'git worktree remove --force "$TREE"' EXIT
SATURATING=(--rate 16 --cv 1 --popularity power --alpha 1 --input-len 64 --output-len 64 --num-requests 96 --seed 0)

run() {  # run LABEL SOURCE_DIR [server flags]
  local label=$1 src=$2
  shift 2
  (cd "$src" && exec python -m slserve.cli serve --port "$PORT" --adapter-dir /tmp/ad100 --preload-adapters \
    --log-level warning "$@") > "$OUT/ab-server.log" 2>&1 &
  local server=$!
  for _ in $(seq 480); do curl -sf "localhost:$PORT/health" > /dev/null && break; sleep 0.5; done
  python benchmarks/load_test.py --base-url "http://127.0.0.1:$PORT" --adapters lora-/100 "${SATURATING[@]}" \
    --no-progress --out "$OUT/ab-$REV${TAG:-}-$label.json" > /dev/null
  kill "$server"; wait "$server" 2> /dev/null || true
  python - "$OUT/ab-$REV${TAG:-}-$label.json" "$label" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
s = d["summary"]
print(f"{sys.argv[2]:>4}  output tok/s {s['output_token_throughput']:.1f}  done {s['completed']}/{s['num_requests']}")
PY
}

for r in $(seq "${FIRST:-1}" "$ROUNDS"); do
  run "a$r" "$TREE"      # A: $REV
  # shellcheck disable=SC2086  # B_FLAGS is a list of flags
  run "b$r" "$PWD" ${B_FLAGS:-}  # B: the working tree
done
