#!/usr/bin/env bash
# ../shared/peers/side_by_side.sh's base comparison with slserve under a --quantization mode, in one
# run: vLLM-CPU base (bfloat16, as side_by_side.sh starts it), then slserve --quantization MODE on
# the base, zipf and uniform traces. Same load generator, adapters and traces as side_by_side.sh.
#
#     PEER=/work/peer bash benchmarks/side_by_side_quant.sh w8a8
#
# Needs: ../shared/peers/setup.sh done for $PEER, slserve installed, nothing else running.
# Results: one JSON line per trace appended to $PEER/side_by_side.jsonl.
set -u
: "${PEER:?set PEER}"
export PEER
MODE=${1:?usage: side_by_side_quant.sh MODE}
peers=$(cd "$(dirname "$0")/../../shared/peers" && pwd)
OUT=$PEER/side_by_side.jsonl
LOAD="$PEER/venv/bin/python $peers/load.py --tokenizer $PEER/smollm2-hf --json_out $OUT"
ready() { for t in $(seq 1 900); do curl -s -o /dev/null -w '%{http_code}' "$1/health" | grep -q 200 && return 0; sleep 1; done; return 1; }

"$peers/serve_vllm.sh" base
$LOAD --url http://127.0.0.1:8011 --n 16 --rate 16 --base base --label "warm" > /dev/null
$LOAD --url http://127.0.0.1:8011 --n 256 --rate 32 --base base --label "vllm base sat ($MODE run)"
kill "$(cat "$PEER/server.pid")"; sleep 5

rm -rf "$PEER/slserve-adapters" && cp -r "$PEER/adapters" "$PEER/slserve-adapters"
slserve serve --port 8000 --adapter-dir "$PEER/slserve-adapters" --preload-adapters --quantization "$MODE" \
    > "$PEER/slserve.log" 2>&1 &
spid=$!
ready http://127.0.0.1:8000
base=$(curl -s http://127.0.0.1:8000/v1/models | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
$LOAD --url http://127.0.0.1:8000 --n 16 --rate 16 --base "$base" --label "warm" > /dev/null
$LOAD --url http://127.0.0.1:8000 --n 256 --rate 32 --base "$base" --label "slserve $MODE base sat"
$LOAD --url http://127.0.0.1:8000 --n 256 --rate 32 --adapters a0-a99 --dist zipf --label "slserve $MODE lora100 zipf sat"
$LOAD --url http://127.0.0.1:8000 --n 256 --rate 32 --adapters a0-a99 --dist uniform \
    --label "slserve $MODE lora100 uniform sat"
kill $spid; sleep 5
