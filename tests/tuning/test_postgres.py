"""Two workers on two processes join one study in a real PostgreSQL server that the test starts on 127.0.0.1.

The server is Debian's ``postgresql`` package (``initdb`` and ``pg_ctl`` in a temporary folder, run as the
``postgres`` user when the test runs as root); the driver is psycopg 3 (the ``test`` extra).  The test skips
when either is missing.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

SRC = Path(__file__).resolve().parents[2] / "src"


def _pg_tool(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return shutil.which(name) or (found[-1] if found else None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A PostgreSQL server of its own, for this module: its SQLAlchemy URL."""
    pytest.importorskip("psycopg")
    initdb, pg_ctl = _pg_tool("initdb"), _pg_tool("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql); .ci/run installs it")
    as_user, owner = [], None
    if os.geteuid() == 0:  # the server refuses to run as root
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run the server as")
        as_user = ["runuser", "-u", "postgres", "--"]
    base = Path(tempfile.mkdtemp(prefix="imgcls-pg-"))  # in /tmp: the postgres user must reach it
    if owner is not None:
        os.chown(base, owner.pw_uid, owner.pw_gid)
    port = _free_port()
    data = base / "data"
    try:
        subprocess.run([*as_user, initdb, "-D", str(data), "--auth=trust", "--username=imgcls", "--no-sync"],
                       check=True, capture_output=True, timeout=120)
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(base / "server.log"), "-w", "-t", "60", "-o",
                        f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                       check=True, capture_output=True, timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"PostgreSQL could not be started here: {exc}")
    try:
        yield f"postgresql+psycopg://imgcls@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], check=False, capture_output=True,
                       timeout=120)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_on_postgresql_finish_exactly_the_trials_with_no_number_twice(postgres_url, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("lr: {low: 0.001, high: 0.03, log: true}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    workers = []
    for i in range(2):  # two machines would each have their own --out; the study is in the database
        args = ["tune", "--epochs", "2", "--model", "fastnet_small", "--model-option", "widths=[8,8,8]",
                "--trials", "5", "--out", str(tmp_path / f"worker{i}"), "--study", "pg", "--sampler", "random",
                "--space", str(space), "--storage", postgres_url, "--quiet"]
        workers.append(subprocess.Popen([sys.executable, "-m", "imgcls.cli", *args], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    errors = [w.communicate(timeout=600)[1] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], errors
    # The database holds exactly the five trials, every number once (and a surplus trial or none, which ran nothing).
    study = optuna.load_study(study_name="pg", storage=postgres_url)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    numbers = sorted(t.number for t in done)
    assert len(numbers) == len(set(numbers)) == 5
    assert all(t.user_attrs.get("surplus") for t in study.trials if t not in done)
    # Each worker's study.json is the whole study as the database held it when that worker ended.
    summaries = [json.loads((tmp_path / f"worker{i}" / "pg" / "study.json").read_text()) for i in range(2)]
    last = max(summaries, key=lambda s: s["finished"])
    assert last["finished"] == 5 and sorted(t["trial"] for t in last["trials"]) == numbers
    # Each trial's run folder is on the worker that ran it.
    folders = sorted(p.name for i in range(2) for p in (tmp_path / f"worker{i}" / "pg").glob("trial-*"))
    assert folders == sorted(f"trial-{n}" for n in numbers)
    assert "pg" in summaries[0]["study"] and "imgcls@127.0.0.1" in last["storage"]
