"""``imgcls train --nproc N``: start N training processes on this node through torch.distributed's launcher.

It is what ``torchrun --nproc-per-node N -m imgcls train ...`` does (the same
elastic agent and c10d rendezvous, ``torch.distributed.launcher``), with
imgcls's defaults and errors:

- one node: a private rendezvous on localhost (torchrun's ``--standalone``);
  several: c10d at ``--rdzv-endpoint``, waiting at most ``--rdzv-timeout`` seconds
  for the other nodes;
- each process gets ``OMP_NUM_THREADS`` = this machine's cores / N, unless set;
- no restarts: a process that dies ends the job, and the message names it,
  the run folder's last good checkpoint, and the command that resumes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile
import uuid
from pathlib import Path

from imgcls.errors import ConfigError, PeerLost, TrainingError
from imgcls.startup import usable_cores

# The file, named by the launcher, where rank 0 writes its run folder's path (for the message after a failure).
RUN_NOTE_ENV = "IMGCLS_RUN_NOTE"


def check_launch(nproc: int | None, nnodes: int, endpoint: str | None, timeout: float, force: bool = False) -> None:
    """Refuse launcher flags that cannot work, before any process starts."""
    if nproc is not None and nproc < 1:
        raise ConfigError(f"--nproc must be at least 1 (processes on this node), got {nproc}")
    cores = usable_cores()
    if nproc is not None and nproc > cores and not force:
        raise ConfigError(f"--nproc {nproc} is more processes than the {cores} CPU cores this node gives imgcls: "
                          f"each holds a copy of the model and its activations, and together they would only "
                          f"slow each other; give --nproc {cores} or fewer (--force starts them anyway)")
    if nnodes < 1:
        raise ConfigError(f"--nnodes must be at least 1, got {nnodes}")
    if nnodes > 1 and not endpoint:
        raise ConfigError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT, the address every node can reach "
                          f"(the first node's, e.g. 10.0.0.1:29400)")
    if endpoint is not None:
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"--rdzv-endpoint must be HOST:PORT (e.g. 10.0.0.1:29400), got {endpoint!r}")
    if not math.isfinite(timeout) or timeout <= 0:
        raise ConfigError(f"--rdzv-timeout must be a positive number of seconds, got {timeout:g}")


def launch(argv: list[str], nproc: int, nnodes: int = 1, endpoint: str | None = None, timeout: float = 300.0,
           force: bool = False) -> int:
    """Run ``imgcls <argv>`` in ``nproc`` processes on this node (of ``nnodes``); 0 when all of them succeed.

    Raises:
        TrainingError: a process failed, or the nodes did not meet within ``timeout`` seconds.
    """
    check_launch(nproc, nnodes, endpoint, timeout, force)
    with _quiet_cpp_log():  # the launcher's own: a store it cannot reach printed 40 lines of C++ before our one
        import torch  # noqa: F401 - start-up time: torch; its C++ log level is read when it loads
    from torch.distributed.elastic.multiprocessing import (  # start-up time: torch
        DefaultLogsSpecs,
        SignalException,
        Std,
    )
    from torch.distributed.elastic.multiprocessing.errors import (
        ChildFailedError,  # start-up time: torch
    )
    from torch.distributed.elastic.rendezvous.api import (
        RendezvousError,  # start-up time: torch
    )
    from torch.distributed.launcher.api import (  # start-up time: torch
        LaunchConfig,
        elastic_launch,
    )

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # The agent's own log lines (worker groups, restarts, failures) repeat what the processes and _failure say.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    standalone = nnodes == 1 and endpoint is None
    tmp = tempfile.TemporaryDirectory(prefix="imgcls-launch-")
    # The node's first process speaks for it; the others' output goes to files, and a failed one's error is shown.
    logs = DefaultLogsSpecs(log_dir=tmp.name, redirects={r: Std.ALL for r in range(1, nproc)})
    config = LaunchConfig(
        logs_specs=logs,
        min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=nproc, max_restarts=0,
        run_id="imgcls-" + uuid.uuid4().hex[:12] if standalone else "imgcls",
        rdzv_backend="c10d", rdzv_endpoint="localhost:0" if standalone else endpoint,
        rdzv_configs={"join_timeout": timeout, "read_timeout": timeout, **({"is_host": True} if standalone else {})},
        monitor_interval=0.5,
    )
    with tmp:
        note = Path(tmp.name) / "run"
        os.environ[RUN_NOTE_ENV] = str(note)
        try:
            elastic_launch(config, sys.executable)("-m", "imgcls", *argv)
        except ChildFailedError as exc:
            raise TrainingError(_failure(exc, nproc, note, argv, Path(tmp.name))) from None
        except SignalException as exc:  # Ctrl-C or SIGTERM to this launcher: the agent stopped the processes
            raise TrainingError(f"stopped by {exc.sigval.name}: the {nproc} processes were stopped"
                                + _resume_hint(note, argv)) from None
        except RendezvousError as exc:
            raise TrainingError(f"the {nnodes} nodes did not meet at {endpoint} within {timeout:g}s "
                                f"({type(exc).__name__}{': ' + str(exc) if str(exc) else ''}); start the same command "
                                f"on every node, check that {endpoint} is the first node's address and reachable "
                                f"from the others, or raise --rdzv-timeout") from None
        finally:
            os.environ.pop(RUN_NOTE_ENV, None)
    return 0


@contextlib.contextmanager
def _quiet_cpp_log():
    """torch's C++ log at FATAL only while torch loads in this process (unless the user set
    TORCH_CPP_LOG_LEVEL); the variable is gone after, so the training processes log as they would."""
    if "TORCH_CPP_LOG_LEVEL" in os.environ or "torch" in sys.modules:
        yield
        return
    os.environ["TORCH_CPP_LOG_LEVEL"] = "FATAL"
    try:
        yield
    finally:
        os.environ.pop("TORCH_CPP_LOG_LEVEL", None)


_PR_SET_PDEATHSIG = 1  # prctl(2)


def die_with_launcher() -> bool:
    """In a process started by ``imgcls train --nproc``: ask Linux for SIGTERM when the launcher dies, even by
    SIGKILL, so that no process goes on training alone.  Returns whether that is in force (Linux glibc only)."""
    import signal

    if RUN_NOTE_ENV not in os.environ:  # torchrun's own processes: torchrun's business
        return False
    launcher = os.getppid()
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != launcher:  # it died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def note_run(path: Path) -> None:
    """Rank 0's run folder, for the launcher's message if the job fails (nothing outside a launch)."""
    target = os.environ.get(RUN_NOTE_ENV)
    if target:
        Path(target).write_text(str(path))


def _failure(exc, nproc: int, note: Path, argv: list[str], logs: Path) -> str:
    """One message for a failed job: which process, how, and where training can go on from."""
    import signal

    parts = []
    # Name the first failures, not their consequences: the agent stops the rest with SIGTERM once one fails,
    # and a process whose peer died exits with PeerLost's code.
    first = {r: f for r, f in exc.failures.items()
             if f.exitcode not in (-signal.SIGTERM, PeerLost.exit_code)} or exc.failures
    ended: dict[str, list] = {}  # how -> (rank, failure) of those that ended so (a bad setting stops all alike)
    for rank, f in sorted(first.items()):
        if f.exitcode < 0:
            try:
                how = f"killed by {signal.Signals(-f.exitcode).name}"
            except ValueError:
                how = f"killed by signal {-f.exitcode}"
        else:
            how = f"exited with code {f.exitcode}"
        ended.setdefault(how, []).append((rank, f))
    for how, failures in ended.items():
        ranks = [str(rank) for rank, _ in failures]
        who = f"process {ranks[0]}" if len(ranks) == 1 else f"processes {', '.join(ranks[:-1])} and {ranks[-1]}"
        verb = ("was " if len(ranks) == 1 else "were ") if how.startswith("killed") else ""
        # What a process said (its last error line): rank 0's is on the terminal already; the others' in their logs.
        said = "" if how.startswith("killed") or any(f.local_rank == 0 for _, f in failures) else \
            _last_error(logs, failures[0][1].local_rank)
        parts.append(f"{who} of {nproc} {verb}{how}" + (f" ({said})" if said else ""))
    stopped = "; the others were stopped" if len(first) < nproc else ""
    return "; ".join(parts) + stopped + _resume_hint(note, argv)


def _resume_hint(note: Path, argv: list[str]) -> str:
    """Where the stopped job can go on from: its last checkpoint and the command ("" before rank 0 made a run)."""
    from imgcls import rundir  # start-up time
    from imgcls.checkpoint import read_checkpoint  # start-up time

    run = Path(note.read_text()) if note.is_file() else None
    last = rundir.RunFolder(run).checkpoint("last") if run is not None else None
    if last is not None and last.is_file():
        epoch = read_checkpoint(last)[1].get("epoch")
        return (f". The last good checkpoint is {last} (epoch {epoch}); go on with: imgcls train --resume {run}"
                + _launch_flags(argv))
    if run is not None:
        return f". {run} has no checkpoint yet: start again"
    return ""


def _last_error(logs: Path, local_rank: int) -> str:
    """The last line a redirected process wrote to stderr (its ``error: ...``), or ""."""
    for path in logs.glob(f"**/attempt_*/{local_rank}/stderr.log"):
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
        if lines:
            return lines[-1].removeprefix("error: ")
    return ""


def _launch_flags(argv: list[str]) -> str:
    """The launcher flags of ``argv`` (the resumed run keeps the rest of its settings)."""
    keep, out = ("--nproc", "--nnodes", "--rdzv-endpoint", "--rdzv-timeout", "--force"), []
    for i, a in enumerate(argv):
        name = a.split("=", 1)[0]
        if name in keep:
            out.append(a if "=" in a or name == "--force" else f"{a} {argv[i + 1]}")
    return "".join(" " + a for a in out)
