"""A throwaway PostgreSQL server on 127.0.0.1 for tests: Debian's `postgresql` package, run from a temporary folder.

``initdb`` and ``pg_ctl`` refuse to run as root, so as root the server runs as the package's ``postgres`` user.
Tests that need it skip when the package (or the Python driver) is absent; ``.ci/run`` installs both.
"""

from __future__ import annotations

import getpass
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

DATABASE = "imgcls_test"


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """``with PostgresServer(tmp_path) as url:`` a SQLAlchemy URL of an empty database, removed afterwards."""

    def __init__(self, root: Path | None = None):
        self.bin = _bin_dir()
        if self.bin is None:
            pytest.skip("PostgreSQL is not installed (apt-get install postgresql); .ci/run installs it")
        pytest.importorskip("psycopg", reason="the PostgreSQL driver (psycopg, in the tune extra) is absent")
        # As root the server's user must reach its folder: pytest's tmp_path (under a 0700 folder of root's) is
        # out of its reach, so a folder of its own under the system's temporary folder is made.
        self.own_root = root is None or os.geteuid() == 0
        self.root = Path(tempfile.mkdtemp(prefix="imgcls-pg-")) if self.own_root else Path(root) / "pg"
        self.port = _free_port()
        self.data = self.root / "data"
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.user = "postgres" if os.geteuid() == 0 else getpass.getuser()

    def _run(self, *argv: str) -> None:
        done = subprocess.run([*self.as_user, *argv], capture_output=True, text=True, timeout=120, check=False)
        if done.returncode:
            raise RuntimeError(f"{' '.join(argv[:2])} failed ({done.returncode}): {done.stderr.strip()[-500:]}")

    def __enter__(self) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        if self.as_user:
            shutil.chown(self.root, "postgres")
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", self.user, "--no-sync")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.root / "log"),
                  "-w", "start")
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, DATABASE)
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{DATABASE}"

    def __exit__(self, *exc) -> None:
        subprocess.run([*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w",
                        "stop"], capture_output=True, timeout=60, check=False)
        self.stopped = not (self.data / "postmaster.pid").exists()
        if self.own_root:
            shutil.rmtree(self.root, ignore_errors=True)
