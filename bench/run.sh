#!/usr/bin/env bash
# The project's benchmark: shadowproxy against nginx's and Envoy's mirrors, in one run, through
# a side-by-side harness of those mirrors, with recording to a real PostgreSQL pinned beside
# the upstreams. Prints the harness's table, then ours with ratios and the record check.
#
#   bash bench/run.sh                 # full: 4 scenarios x 3 reps x 10 s (about 15 minutes)
#   bash bench/run.sh --quick         # 1 rep x 5 s, for a first look
#   BENCH_SCENARIOS=fast bash bench/run.sh --quick
#   BENCH_BUILD=pure bash bench/run.sh --quick   # the pure-Python build instead of mypyc's
#   BENCH_PURE_TOO=1 bash bench/run.sh            # the pure build as a second target beside
#                                                 # the compiled one, in the same run
#
# The harness is not part of this repository. It is a folder holding run_bench.sh, which runs
# wrk against each target (direct, nginx's mirror, Envoy's mirror, and every
# --proxy NAME='COMMAND') with the upstreams of each scenario, pinned to CPUs, and writes
# results.json; and setup.sh, which installs nginx with its echo module, wrk and Envoy (once,
# as root). This script looks for it at $SHADOWPROXY_HARNESS, by default the folder
# shared/bench beside the repository.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
harness="${SHADOWPROXY_HARNESS:-$root/../shared/bench}"
python="${SHADOWPROXY_PYTHON:-$root/.venv/bin/python}"
reps=3 duration=10 warmup=2
if [[ ${1:-} == --quick ]]; then reps=1 duration=5 warmup=1; shift; fi
scenarios="${BENCH_SCENARIOS:-fast,echo5ms,echoslowshadow,blackhole}"
targets="${BENCH_TARGETS:-direct,nginx-mirror,envoy-mirror}"
out="${BENCH_OUT:-$root/bench/results/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$out"
# Absolute: the compiled build's proxies run in the harness's scratch folders, and a
# relative data folder there would be another folder for each of them.
out="$(cd "$out" && pwd)"

source "$here/build.sh"
source "$here/pg.sh"
# The hypervisor's steal time and each core's speed, sampled once a second, for each run's
# steal share (steal.py) and the speed of the proxy's core in its minutes (speed.py).
"$python" "$here/steal.py" record "$out/steal.tsv" &
steal_pid=$!
"$python" "$here/speed.py" record "$out/speed.tsv" &
speed_pid=$!
trap 'kill "$steal_pid" "$speed_pid" 2>/dev/null || true; bench_pg_stop; bench_build_cleanup' EXIT
bench_build_select

# PostgreSQL for the records: embedded, in a scratch folder, on CPU 1 beside the upstreams.
bench_pg_start "${BENCH_PG_CPUS:-1}"
url="$BENCH_PG_URL"
export SHADOWPROXY_BENCH_DATABASE_URL="$url"
# Each proxy start gets a data folder of its own under this one (start_for_harness.sh), so
# that no run replays another's spool; store_spool.py below stores what every stop left and
# measures the CPU that takes, which summarize.py charges to the run that left it.
export SHADOWPROXY_BENCH_DATA_DIR="$out/data"

start="bash $here/start_for_harness.sh {port} {primary_url} {shadow_url} {workdir}"
proxies=(--proxy shadowproxy="$start")
if [[ -n ${BENCH_PURE_TOO:-} && $bench_build == compiled ]]; then
  proxies+=(--proxy shadowproxy-pure="env -u SHADOWPROXY_BENCH_TREE $start")
fi
"$harness/run_bench.sh" --scenarios "$scenarios" --targets "$targets" \
    "${proxies[@]}" --conns "${BENCH_CONNS:-16}" --reps "$reps" --duration "$duration" \
    --warmup "$warmup" --out "$out" "$@" 2>&1 | tee "$out/harness.log"
"$python" "$here/store_spool.py" "$out/data" "$url" --json "$out/store_spool.json" \
  | tee "$out/store_spool.txt"
# What could not be stored stays on disk for a look (and a later store_spool.py).
grep -q -e 'spool empty' -e 'no spool' "$out/store_spool.txt" && rm -rf "$out/data"
{ echo "shadowproxy build: $bench_build"; "$python" "$here/summarize.py" "$out" "$url"; } \
  | tee "$out/summary.md"
