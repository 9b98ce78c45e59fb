#!/usr/bin/env bash
# ../shared/peers/side_by_side.sh's comparison, interleaved: vLLM-CPU base and slserve (bfloat16,
# and --quantization w8a8) stay loaded side by side, each frozen (SIGSTOP) while another one runs,
# and the traces run in ROUNDS rounds, every system once per round. The host these machines share
# moves a single run's tok/s by 10-20% over minutes, so the ratios here are taken within a round
# and reported per round and as the median over rounds.
#
#     PEER=/work/peer bash benchmarks/side_by_side_rounds.sh [ROUNDS]     # ~5 minutes a round
#
# Round k uses load.py --seed k for every system (fresh prompts each round: no system finds the
# previous round's prompts in its prefix cache). Same load generator, adapters, trace shape and
# servers as side_by_side.sh (256 requests, Poisson 32 req/s, 64-token prompts, 64 output tokens;
# zipf over 100 adapters of ranks 8-64 on all seven targets).
# Needs: ../shared/peers/setup.sh done for $PEER, slserve installed, nothing else running.
# Results: JSON lines in $PEER/side_by_side_rounds.jsonl, a table on stdout.
set -u
: "${PEER:?set PEER}"
export PEER
ROUNDS=${1:-3}
peers=$(cd "$(dirname "$0")/../../shared/peers" && pwd)
OUT=$PEER/side_by_side_rounds.jsonl
LOAD="$PEER/venv/bin/python $peers/load.py --tokenizer $PEER/smollm2-hf --json_out $OUT"
RUN_ID=$(date -u +%Y%m%dT%H%M%S)
. "$(dirname "${BASH_SOURCE[0]}")/frozen_servers.sh"

"$peers/serve_vllm.sh" base || exit 1
vllm=$(cat "$PEER/server.pid"); PIDS+=("$vllm")
$LOAD --url http://127.0.0.1:8011 --n 16 --rate 16 --base base --label "warm" > /dev/null
freeze "$vllm"

rm -rf "$PEER/slserve-adapters" && cp -r "$PEER/adapters" "$PEER/slserve-adapters"
served_base() { curl -s "http://127.0.0.1:$1/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])'; }
start_slserve() {  # port, log name, extra args; sets STARTED to the server's pid, frozen once warm
  local port=$1 log=$2; shift 2
  slserve serve --port "$port" --adapter-dir "$PEER/slserve-adapters" --preload-adapters "$@" \
      > "$PEER/$log" 2>&1 &
  STARTED=$!; PIDS+=("$STARTED")
  ready "http://127.0.0.1:$port" || exit 1
  $LOAD --url "http://127.0.0.1:$port" --n 16 --rate 16 --base "$(served_base "$port")" --label "warm" > /dev/null
  freeze "$STARTED"
}
start_slserve 8000 slserve.log; bf16=$STARTED
start_slserve 8001 slserve_w8a8.log --quantization w8a8; w8a8=$STARTED

for k in $(seq 1 "$ROUNDS"); do
  tag="round $k ($RUN_ID)"
  thaw "$vllm"
  $LOAD --url http://127.0.0.1:8011 --n 256 --rate 32 --seed "$k" --base base --label "vllm base | $tag"
  freeze "$vllm"
  for pair in "$bf16 8000 slserve" "$w8a8 8001 slserve-w8a8"; do
    set -- $pair
    thaw "$1"
    base=$(served_base "$2")
    $LOAD --url "http://127.0.0.1:$2" --n 256 --rate 32 --seed "$k" --base "$base" --label "$3 base | $tag"
    $LOAD --url "http://127.0.0.1:$2" --n 256 --rate 32 --seed "$k" --adapters a0-a99 --dist zipf \
        --label "$3 lora100 zipf | $tag"
    freeze "$1"
  done
done

python3 - "$OUT" "$RUN_ID" <<'EOF'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if sys.argv[2] in line]
runs = {}
for r in rows:
    system, tag = r["label"].split(" | ")
    runs.setdefault(tag.split(" (")[0], {})[system] = r["out_tok_per_s"]
systems = ["slserve base", "slserve lora100 zipf", "slserve-w8a8 base", "slserve-w8a8 lora100 zipf"]
print(f"{'round':<9}{'vllm base':>11}" + "".join(f"{s:>28}" for s in systems))
ratios = {s: [] for s in systems}
for tag, got in runs.items():
    line = f"{tag:<9}{got['vllm base']:>11.1f}"
    for s in systems:
        ratios[s].append(got[s] / got["vllm base"])
        line += f"{got[s]:>20.1f} ({ratios[s][-1]:.2f}x)"
    print(line)
print(f"{'median':<9}{'':>11}" + "".join(f"{statistics.median(ratios[s]):>27.2f}x" for s in systems))
EOF
