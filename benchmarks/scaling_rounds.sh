#!/usr/bin/env bash
# The scaling curve (benchmarks/scaling.py), interleaved: vLLM-CPU's base model and slserve
# (bfloat16, and --quantization w8a8) stay loaded side by side, each frozen (SIGSTOP) while another
# one runs, and every concurrency point is measured on every system before the next point, so
# that the host's drift over the run moves all curves alike (as side_by_side_rounds.sh does for
# the saturating trace).
#
#     PEER=/work/peer bash benchmarks/scaling_rounds.sh [POINTS...]     # ~15 minutes
#
# Points: concurrent streams, default 1 8 32 64 128 256; 64-token prompts, 64 output tokens, one
# request per stream (at least 8) per point, each point with its own prompts. slserve: 100
# adapters of ranks 8-64 on all seven targets (make_adapters.py into /tmp/ad100, made if absent),
# zipf popularity, preloaded; the base-model curves on the same servers.
# Needs: ../shared/peers/setup.sh done for $PEER, slserve installed with the bench extra,
# nothing else running. Results: benchmarks/results/scaling-bf16-*.json and scaling-bf16.png.
set -u
: "${PEER:?set PEER}"
export PEER
cd "$(dirname "$0")/.."
POINTS=("$@"); [ ${#POINTS[@]} -gt 0 ] || POINTS=(1 8 32 64 128 256)
peers=$(cd ../shared/peers && pwd)
OUT=benchmarks/results
ADAPTERS=/tmp/ad100
[ -d "$ADAPTERS" ] || python benchmarks/make_adapters.py -n 100 --ranks 8,16,32,64 --out "$ADAPTERS" || exit 1
. benchmarks/frozen_servers.sh
curve() {  # url, file, label, workload flags...: one point per call, merged into the file
  local url=$1 file=$2 label=$3; shift 3
  python benchmarks/scaling.py --base-url "$url" --points "$POINT" --per-stream 1 --min-requests 8 \
      --input-len 64 --output-len 64 --label "$label" --out "$OUT/scaling-bf16-$file.json" --append "$@" \
      | grep -v '^wrote'
}
warm() { python benchmarks/scaling.py --base-url "$1" --points 8 --per-stream 1 --seed 1000 "${@:2}" > /dev/null; }

"$peers/serve_vllm.sh" base || exit 1
vllm=$(cat "$PEER/server.pid"); PIDS+=("$vllm")
warm http://127.0.0.1:8011 --adapters none
freeze "$vllm"
start_slserve() {  # port, log name, extra args; sets STARTED to the server's pid, frozen once warm
  local port=$1 log=$2; shift 2
  slserve serve --port "$port" --adapter-dir "$ADAPTERS" --preload-adapters --log-level warning "$@" \
      > "$PEER/$log" 2>&1 &
  STARTED=$!; PIDS+=("$STARTED")
  ready "http://127.0.0.1:$port" || exit 1
  warm "http://127.0.0.1:$port" --adapters none
  warm "http://127.0.0.1:$port" --adapters lora-/100 --popularity zipf
  freeze "$STARTED"
}
start_slserve 8000 scaling_slserve.log; bf16=$STARTED
start_slserve 8001 scaling_slserve_w8a8.log --quantization w8a8; w8a8=$STARTED

rm -f "$OUT"/scaling-bf16-{vllm-base,slserve-base,slserve-lora100,w8a8-base,w8a8-lora100}.json
for POINT in "${POINTS[@]}"; do
  thaw "$vllm"
  curve http://127.0.0.1:8011 vllm-base "vLLM-CPU, base model" --adapters none
  freeze "$vllm"
  for run in "$bf16 8000 slserve bfloat16" "$w8a8 8001 w8a8 w8a8"; do
    set -- $run
    thaw "$1"
    curve "http://127.0.0.1:$2" "$3-base" "slserve $4, base model" --adapters none
    curve "http://127.0.0.1:$2" "$3-lora100" "slserve $4, 100 adapters" --adapters lora-/100 --popularity zipf
    freeze "$1"
  done
done
python benchmarks/scaling.py --plot "$OUT/scaling-bf16.png" \
    "$OUT"/scaling-bf16-{slserve-lora100,slserve-base,w8a8-lora100,w8a8-base,vllm-base}.json
