#!/usr/bin/env bash
# Reproduces the load-test figures of benchmarks/RESULTS.md on one machine, side by side.
#   bash benchmarks/run_results.sh [which...]
#   which: base lora5 lora100 peft5 peft100 scale (the 4 req/s trace)
#          satbase satlora100 satlora100cold satpeft100 (a saturating trace: 96 requests at 16 req/s;
#          cold: no adapter preloaded into host RAM)
# Adapter sets (written once):
#   python benchmarks/make_adapters.py -n 100 --ranks 8,16,32,64 --out /tmp/ad100
#   python benchmarks/make_adapters.py -n 2000 --ranks 8,16 --targets q,k,v,o --out /tmp/ad2000
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results
mkdir -p "$OUT"
PORT=8123
TRACE=(--rate 4 --cv 1 --popularity power --alpha 1 --input-len 64 --output-len 64 --num-requests 48 --seed 0)
SATURATING=(--rate 16 --cv 1 --popularity power --alpha 1 --input-len 64 --output-len 64 --num-requests 96 --seed 0)

# The 100-adapter runs start the server with --preload-adapters: every adapter parsed into host RAM
# before the trace, as S-LoRA keeps all adapters in host memory and as the PEFT baseline loads all
# of them before its clock starts; the device tier still starts empty and fills on demand. The
# scaling runs do not preload: 2000 adapters outgrow the host cache, so the disk tier is exercised.
serve() {  # serve ADAPTER_DIR [flags]: start a server and wait until it is ready
  local dir=$1
  shift
  slserve serve --port "$PORT" --adapter-dir "$dir" "$@" --log-level warning > "$OUT/server.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 480); do curl -sf "localhost:$PORT/health" > /dev/null && return; sleep 0.5; done
  echo "server did not start" >&2; exit 1
}
stop() { kill "$SERVER"; wait "$SERVER" 2> /dev/null || true; }
load() {  # load NAME ADAPTERS [trace args]
  local name=$1 adapters=$2
  shift 2
  local trace=("${@:-${TRACE[@]}}")
  python benchmarks/load_test.py --base-url "http://127.0.0.1:$PORT" --adapters "$adapters" "${trace[@]}" \
    --no-progress --out "$OUT/$name.json" --plot "$OUT/$name.png" | tail -n 20
}

for which in "${@:-base lora5 lora100 peft5 peft100 scale}"; do
  for w in $which; do
    case $w in
      base) serve /tmp/ad100 --preload-adapters; load slserve-base none; stop ;;
      lora5) serve /tmp/ad100 --preload-adapters; load slserve-lora5 lora-/5; stop ;;
      lora100) serve /tmp/ad100 --preload-adapters; load slserve-lora100 lora-/100; stop ;;
      peft5|peft100)
        python benchmarks/peft_baseline.py --adapter-dir /tmp/ad100 --adapters "lora-/${w#peft}" "${TRACE[@]}" \
          --dtype bfloat16 --no-progress --out "$OUT/$w.json" | tail -n 20 ;;
      satbase) serve /tmp/ad100 --preload-adapters; load slserve-sat-base none "${SATURATING[@]}"; stop ;;
      satlora100) serve /tmp/ad100 --preload-adapters; load slserve-sat-lora100 lora-/100 "${SATURATING[@]}"; stop ;;
      satlora100cold) serve /tmp/ad100; load slserve-sat-lora100-cold lora-/100 "${SATURATING[@]}"; stop ;;
      satpeft100)
        python benchmarks/peft_baseline.py --adapter-dir /tmp/ad100 --adapters lora-/100 "${SATURATING[@]}" \
          --dtype bfloat16 --no-progress --out "$OUT/peft-sat100.json" | tail -n 20 ;;
      scale)
        serve /tmp/ad2000
        for n in 5 1000 2000; do load "slserve-scale$n" "lora-/$n"; done
        stop ;;
    esac
  done
done
