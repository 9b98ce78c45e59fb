# Sourced by the interleaved comparisons (side_by_side_rounds.sh, scaling_rounds.sh): servers stay
# loaded side by side and all but the one being measured are frozen with SIGSTOP, so that the
# host's drift over a run moves every system alike. Register each server's pid in PIDS; every one
# is thawed and stopped when the script exits.
ready() { for t in $(seq 1 900); do curl -s -o /dev/null -w '%{http_code}' "$1/health" | grep -q 200 && return 0; sleep 1; done; return 1; }
tree() { echo "$1"; for c in $(pgrep -P "$1"); do tree "$c"; done; }
freeze() { kill -STOP $(tree "$1") 2>/dev/null; }
thaw() { kill -CONT $(tree "$1") 2>/dev/null; sleep 2; }
stop_all() { for p in "${PIDS[@]}"; do thaw "$p"; kill $(tree "$p") 2>/dev/null; done; }
PIDS=()
trap stop_all EXIT
