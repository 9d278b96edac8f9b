#!/usr/bin/env bash
# Start shadowproxy as a --proxy NAME='...' target of the side-by-side harness (bench/run.sh).
# Usage: start_for_harness.sh PORT PRIMARY_URL SHADOW_URL WORKDIR [WORKERS]
# The database is SHADOWPROXY_BENCH_DATABASE_URL (bench/run.sh starts one, pinned to CPU 1).
# SHADOWPROXY_BENCH_TREE: a compiled tree to run (bench/build.sh). Recording settings for
# experiments: SHADOWPROXY_BENCH_QUEUE, _FLUSH_MS, _WRITE_AFTER (defaults as in the
# product). The shadow gets timeout_s 1 and max_in_flight 1000 (SHADOWPROXY_BENCH_
# SHADOW_TIMEOUT, _MAX_IN_FLIGHT). limits.shutdown_grace_s is 2 (SHADOWPROXY_BENCH_GRACE_S):
# the harness kills a proxy 8 s after its SIGTERM, and a stop may spend the grace twice
# (calls in flight, then the queue and the spool into the database) and a batch's write.
# The spool may hold 8 GiB (SHADOWPROXY_BENCH_SPOOL_BYTES): under back-to-back overloads
# PostgreSQL on the shared core never catches up, the replay yields to the live writes, and
# the backlog of a full benchmark passes the default 1 GiB; an operator sizes it to the
# backlog their database can fall behind by in the same way.
# Every start gets a data folder of its own, run-<start time in ns>-<pid>, under
# SHADOWPROXY_BENCH_DATA_DIR (bench/run.sh sets one outside the harness's scratch folders):
# a run must not replay the spool an earlier run left and be charged for it in its measured
# window (a 5 ms model's runs after the fast ones stored three records for each they
# answered). bench/run.sh stores what every stop left with bench/store_spool.py, which
# measures what that costs, and bench/summarize.py charges it to the run it belongs to.
set -euo pipefail
port=$1 primary=$2 shadow=$3 workdir=$4 workers=${5:-1}
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${SHADOWPROXY_PYTHON:-$here/../.venv/bin/python}"
: "${SHADOWPROXY_BENCH_DATABASE_URL:?set it to the benchmark PostgreSQL URL}"
mkdir -p "$workdir"
data_dir="${SHADOWPROXY_BENCH_DATA_DIR:-$workdir/data}/run-$(date +%s%N)-$$"
cat > "$workdir/shadowproxy.yaml" <<YAML
listen: "127.0.0.1:$port"
admin_listen: "127.0.0.1:${SHADOWPROXY_BENCH_ADMIN_PORT:-9190}"
workers: $workers
data_dir: "$data_dir"
database: {url: "$SHADOWPROXY_BENCH_DATABASE_URL"}
limits: {shutdown_grace_s: ${SHADOWPROXY_BENCH_GRACE_S:-2}}
recording: {queue_max_records: ${SHADOWPROXY_BENCH_QUEUE:-50000}, flush_interval_ms: ${SHADOWPROXY_BENCH_FLUSH_MS:-200}, write_after_records: ${SHADOWPROXY_BENCH_WRITE_AFTER:-16}, spool_max_bytes: ${SHADOWPROXY_BENCH_SPOOL_BYTES:-8589934592}}
routes:
  - name: bench
    primary: {url: "$primary", timeout_s: 30}
    shadows:
      - {name: shadow, url: "$shadow", timeout_s: ${SHADOWPROXY_BENCH_SHADOW_TIMEOUT:-1}, max_in_flight: ${SHADOWPROXY_BENCH_MAX_IN_FLIGHT:-1000}}
YAML
if [[ -n ${SHADOWPROXY_BENCH_TREE:-} ]]; then
  # The compiled tree (bench/run.sh builds it) comes first on the path; the working
  # directory must not hold another copy of the package.
  export PYTHONPATH="$SHADOWPROXY_BENCH_TREE"
  cd "$workdir"
fi
exec "$python" ${SHADOWPROXY_BENCH_ENTRY:--m shadowproxy} run -c "$workdir/shadowproxy.yaml"
