"""A throwaway PostgreSQL server for the tests: ``initdb`` into a temporary folder, ``postgres`` on a free loopback
port (trust authentication, fsync off: the data lives only as long as the test session), stopped and deleted
by ``stop()``. Uses the Debian package's binaries (``apt-get install postgresql``; ``.ci/run`` installs it).

PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` OS user (``runuser``); the tests
still connect as the database user ``postgres`` over TCP, as replicas on other machines would.

    python tests/pg_server.py          # start one by hand; prints its URL, Ctrl-C stops it
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class PgServer:
    url: str              # postgresql://postgres@127.0.0.1:PORT/postgres
    folder: Path
    start_s: float        # seconds from initdb to a server that accepts connections

    def stop(self) -> None:
        _run_as_postgres([_bin("pg_ctl"), "-D", str(self.folder / "data"), "-m", "immediate", "-w", "stop"],
                         check=False)
        shutil.rmtree(self.folder, ignore_errors=True)


def _bin(name: str) -> str:
    """The newest installed PostgreSQL's ``name`` (Debian keeps them in /usr/lib/postgresql/<major>/bin)."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    if found:
        return found[-1]
    on_path = shutil.which(name)
    if on_path:
        return on_path
    raise RuntimeError(f"PostgreSQL's {name} is not installed (apt-get install postgresql)")


def _run_as_postgres(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    # from / : the postgres user may not be allowed into the caller's folder
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=120, cwd="/")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server() -> PgServer:
    """Start a fresh cluster; raises RuntimeError saying why when it cannot."""
    t0 = time.monotonic()
    folder = Path(tempfile.mkdtemp(prefix="distill-pg-"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    data, port = folder / "data", _free_port()
    try:
        _run_as_postgres([_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                          "--no-sync", "--no-instructions"])
        # the socket goes into our folder (the packaged default, /var/run/postgresql, may not exist or be ours)
        opts = (f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
                "-c full_page_writes=off -c max_connections=200")
        _run_as_postgres([_bin("pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), "-o", opts,
                          "-w", "-t", "60", "start"])
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError, RuntimeError) as e:
        log = (folder / "server.log").read_text()[-2000:] if (folder / "server.log").exists() else ""
        out = getattr(e, "stderr", "") or ""
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(f"could not start a PostgreSQL server: {e}\n{out}\n{log}".strip()) from None
    return PgServer(url=f"postgresql://postgres@127.0.0.1:{port}/postgres", folder=folder,
                    start_s=time.monotonic() - t0)


if __name__ == "__main__":
    srv = start_server()
    print(f"{srv.url}  (started in {srv.start_s:.1f} s; Ctrl-C stops it)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        srv.stop()
