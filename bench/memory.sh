#!/usr/bin/env bash
# Peak memory of shadowproxy under full load for 60 s while the shadow never answers
# (blackhole), and while the database is down the whole time (every record to the spool).
# RSS of the proxy's processes is sampled every second; the first and last 10 s are compared
# to show whether it stays flat.
#
#   bash bench/memory.sh [SECONDS]          # BENCH_BUILD=pure: the pure-Python build
#
# It runs through the side-by-side harness that bench/run.sh uses ($SHADOWPROXY_HARNESS; see
# the comment there).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
harness="${SHADOWPROXY_HARNESS:-$root/../shared/bench}"
python="${SHADOWPROXY_PYTHON:-$root/.venv/bin/python}"
seconds="${1:-60}"
out="${BENCH_OUT:-$root/bench/results/memory-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$out"

sample() {  # sample RSS (kB, summed over the proxy's processes) once a second into $1
  : > "$1"
  while true; do
    pids=$(pgrep -f "shadowproxy run -c" || true)
    if [[ -n $pids ]]; then
      kb=0
      for p in $pids; do
        v=$(awk '/^VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
        kb=$((kb + ${v:-0}))
      done
      echo "$(date +%s) $kb" >> "$1"
    fi
    sleep 1
  done
}

report() {  # report NAME FILE
  "$python" - "$1" "$2" <<'PY'
import sys
name, path = sys.argv[1], sys.argv[2]
rows = [tuple(map(int, l.split())) for l in open(path) if l.strip()]
kb = [k for _, k in rows if k > 0]
if len(kb) < 20:
    print(f"{name}: too few samples ({len(kb)})"); sys.exit()
first, last = kb[2:12], kb[-11:-1]
print(f"{name}: {len(kb)} s sampled; peak RSS {max(kb)/1024:.0f} MiB; "
      f"mean of s 3-12 {sum(first)/len(first)/1024:.0f} MiB, "
      f"of the last 10 s {sum(last)/len(last)/1024:.0f} MiB")
PY
}

run() {  # run NAME DATABASE_URL
  local name=$1
  sample "$out/$name.rss" &
  local sampler=$!
  SHADOWPROXY_BENCH_DATABASE_URL="$2" "$harness/run_bench.sh" --scenarios blackhole \
      --targets "" --proxy shadowproxy="bash $here/start_for_harness.sh {port} {primary_url} {shadow_url} {workdir}" \
      --conns 64 --reps 1 --duration "$seconds" --warmup 2 --out "$out/$name" >/dev/null
  kill "$sampler" 2>/dev/null || true
  wait "$sampler" 2>/dev/null || true
  grep -E '^\| blackhole' "$out/$name/table.md" || true
  report "$name" "$out/$name.rss"
}

source "$here/build.sh"
source "$here/pg.sh"
trap 'bench_pg_stop; bench_build_cleanup' EXIT
bench_build_select
echo "shadowproxy build: $bench_build"
# A real PostgreSQL for the first run (embedded, scratch folder, CPU 1).
bench_pg_start 1
url="$BENCH_PG_URL"

echo "shadow never answers, database up, ${seconds}s at 64 connections:"
run blackhole "$url"
echo "shadow never answers, database down the whole time (spooling), ${seconds}s:"
run blackhole-db-down "postgresql://nobody@127.0.0.1:9/none?connect_timeout=1"
