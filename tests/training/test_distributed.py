"""Data-parallel training: 2 gloo processes on the CPU against one process, a killed process, resume, bad input."""

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import imgcls
from imgcls.checkpoint import read_checkpoint
from imgcls.training import distributed
from imgcls.training.distributed import Dist

# The digits with a small CNN; 1,437 training images: 23 steps of 64 an epoch in one process and in two
# (the last batch, 29 images, gives each process at least 2).
# fp32 on every CPU: with bf16 autocast (a CPU with AVX512-BF16 or AMX) one and two processes part by more than
# the tolerances below (the sync-bn run's train loss by 1%), which measure DDP, not bf16's rounding.
COMMON = ["--epochs", "8", "--batch-size", "64", "--model-option", "widths=[16,32,32]", "--no-report",
          "--augment", "hflip,translate:1", "--lr", "0.003", "--precision", "fp32"]
# Under DDP every process takes one thread, as torchrun sets it; the one-process run takes the same.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def _cli(*args):
    return [sys.executable, "-m", "imgcls", *args]


def _torchrun(*args):
    """torchrun with 2 processes on this machine; ``args`` name what they run (``-m imgcls ...`` or a script)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _files(run):
    return sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file() and p.name != ".lock")


@pytest.mark.parametrize("n", [0, 1, 2, 5, 17, 256])
def test_slices_cover_every_row_once(n):
    for world in (1, 2, 3, 4):
        rows = [i for rank in range(world) for i in range(*distributed.chunk(n, Dist(rank, world)))]
        assert rows == list(range(n))
        sizes = [len(range(*distributed.chunk(n, Dist(rank, world)))) for rank in range(world)]
        assert max(sizes) - min(sizes) <= 1


@pytest.mark.slow
def test_two_processes_match_one_process_with_synced_batchnorm(tmp_path):
    """torchrun with 2 gloo processes and --sync-bn takes the steps one process takes, to float rounding."""
    subprocess.run(_cli("train", "--name", "one", "--out", str(tmp_path), *COMMON), check=True,
                   capture_output=True, timeout=600, env=ONE_THREAD)
    track = ["--track", "tensorboard"] if importlib.util.find_spec("tensorboard") else []
    two = subprocess.run(_torchrun("-m", "imgcls", "train", "--name", "two", "--out", str(tmp_path), "--sync-bn",
                                   *track, *COMMON), capture_output=True, text=True, timeout=600, check=False)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 processes, each 32-32 images of every batch of 64, BatchNorm synchronised" in two.stdout
    one_run, two_run = tmp_path / "one", tmp_path / "two"
    # Rank 0 alone wrote: one run folder, with the files a one-process run has.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]
    assert [f for f in _files(two_run) if not f.startswith("tensorboard/")] == _files(one_run)
    if track:  # the tracker too is rank 0's alone: one event file
        assert len(list((two_run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert json.loads((two_run / "environment.json").read_text())["processes"] == 2
    assert two.stdout.count("run folder:") == 1 and "[rank1]" not in two.stdout
    # The same number of optimiser steps and epochs.
    steps = [read_checkpoint(r / "checkpoints" / "last.safetensors")[1]["train_state"]["step"] for r in (one_run, two_run)]
    assert steps == [8 * 23, 8 * 23]
    a, b = _records(one_run), _records(two_run)
    assert [r["epoch"] for r in b] == list(range(1, 9))
    # Rank 1 draws its own augmentations, so the runs part ways; by the end they are as good as each other
    # (measured: train loss 0.305 and 0.301, val accuracy 0.911 and 0.933, test 0.899 and 0.888).
    assert b[-1]["train_loss"] == pytest.approx(a[-1]["train_loss"], rel=0.15)
    assert abs(b[-1]["val_accuracy"] - a[-1]["val_accuracy"]) <= 0.05
    # The test split scored once per image: the confusion matrix counts each test image once, and equals a
    # one-process evaluation of the checkpoint.
    saved = json.loads((two_run / "eval_test.json").read_text())
    again = imgcls.load(two_run).evaluate()
    assert saved["confusion_matrix"] == again["confusion_matrix"]
    assert sum(map(sum, saved["confusion_matrix"])) == 179
    assert abs(saved["accuracy"] - json.loads((one_run / "eval_test.json").read_text())["accuracy"]) <= 0.05


def _one_and_two_synced(tmp_path, options: list[str]) -> None:
    """Train runs ``one`` (one process, one thread) and ``two`` (2 processes, --sync-bn) with ``options``."""
    subprocess.run(_cli("train", "--name", "one", "--out", str(tmp_path), *options), check=True,
                   capture_output=True, timeout=600, env=ONE_THREAD)
    two = subprocess.run(_cli("train", "--nproc", "2", "--name", "two", "--out", str(tmp_path), "--sync-bn",
                              *options), capture_output=True, text=True, timeout=600, check=False)
    assert two.returncode == 0, two.stderr[-3000:]


@pytest.mark.slow
def test_synced_batchnorm_equals_one_process_without_augmentation(tmp_path):
    """With no random draws but the shuffle, 2 processes with --sync-bn are one process, to float rounding."""
    plain = ["--epochs", "3", "--batch-size", "256", "--model-option", "widths=[8,16,16]", "--no-report",
             "--precision", "fp32"]
    _one_and_two_synced(tmp_path, plain)
    for ra, rb in zip(_records(tmp_path / "one"), _records(tmp_path / "two"), strict=True):
        for key in ("train_loss", "val_loss"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-5), (ra["epoch"], key)
        assert rb["train_accuracy"] == pytest.approx(ra["train_accuracy"], abs=2 / 1437)
    wa, _ = read_checkpoint(tmp_path / "one" / "checkpoints" / "last.safetensors")
    wb, _ = read_checkpoint(tmp_path / "two" / "checkpoints" / "last.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), rtol=1e-3, atol=1e-4), k


@pytest.mark.slow
def test_several_labels_per_image_train_alike_in_two_processes(tmp_path, multilabel_squares):
    """The multi-label loss (a sigmoid and binary cross-entropy per label) under DDP: two processes with --sync-bn
    and no augmentation take one process's steps, to float rounding, and the test split is scored once."""
    multilabel_squares.write_folder(tmp_path / "squares", 200)
    plain = ["--data", str(tmp_path / "squares"), "--model", "fastnet_small", "--epochs", "2", "--batch-size", "32",
             "--model-option", "widths=[8,16,16]", "--no-report", "--precision", "fp32"]
    _one_and_two_synced(tmp_path, plain)
    for ra, rb in zip(_records(tmp_path / "one"), _records(tmp_path / "two"), strict=True):
        for key in ("train_loss", "val_loss", "val_map"):  # 20 val images: rounding moves val_loss by 2e-4
            assert rb[key] == pytest.approx(ra[key], rel=1e-3, abs=1e-5), (ra["epoch"], key)
    saved = [json.loads((tmp_path / run / "eval_test.json").read_text()) for run in ("one", "two")]
    assert saved[1]["n"] == saved[0]["n"] == 20 and saved[1]["map"] == pytest.approx(saved[0]["map"], abs=1e-4)
    assert saved[1]["thresholds"] == pytest.approx(saved[0]["thresholds"], abs=2e-3)  # val probabilities, as rounded


def _rank_pids(launcher_pid: int, rank: int) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        ppid = int(status.split("PPid:")[1].split()[0])
        if ppid == launcher_pid and f"RANK={rank}".encode() in env:
            found.append(int(pid))
    return found


@pytest.mark.slow
def test_killed_process_ends_the_job_and_resume_matches_an_uninterrupted_run(tmp_path):
    common = ["--nproc", "2", "--epochs", "6", "--batch-size", "64", "--model-option", "widths=[32,32,32]",
              "--no-report", "--out", str(tmp_path), "--augment", "hflip"]
    whole = subprocess.run(_cli("train", "--name", "whole", *common), capture_output=True, text=True, timeout=600,
                           check=False)
    assert whole.returncode == 0, whole.stderr[-3000:]
    proc = subprocess.Popen(_cli("train", "--name", "killed", *common), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (
            metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    victims = _rank_pids(proc.pid, 1)
    assert victims, "no process of rank 1 found"
    os.kill(victims[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    last = tmp_path / "killed" / "checkpoints" / "last.safetensors"
    epoch = read_checkpoint(last)[1]["epoch"]
    assert 2 <= epoch < 6, "the run finished before it could be killed"
    line = err.strip().splitlines()[-1]
    assert line == (f"error: process 1 of 2 was killed by SIGKILL; the others were stopped. The last good checkpoint "
                    f"is {last} (epoch {epoch}); go on with: imgcls train --resume {tmp_path / 'killed'} --nproc 2")
    assert "Traceback" not in err
    resumed = subprocess.run(_cli("train", "--resume", str(tmp_path / "killed"), "--nproc", "2"),
                             capture_output=True, text=True, timeout=600, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _records(tmp_path / "whole"), _records(tmp_path / "killed")
    assert [r["epoch"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"):
            assert ra[key] == rb[key], (ra["epoch"], key)
    ea = json.loads((tmp_path / "whole" / "eval_test.json").read_text())
    eb = json.loads((tmp_path / "killed" / "eval_test.json").read_text())
    assert ea["confusion_matrix"] == eb["confusion_matrix"]


def _start_and_wait_for_epoch(tmp_path, name: str, own_group: bool = False) -> tuple[subprocess.Popen, list[int]]:
    """``imgcls train --nproc 2`` of many epochs, once its first epoch is written; (launcher, its 2 processes).

    ``own_group``: the launcher leads a process group of its own, as a terminal's foreground job does.
    """
    args = ["--nproc", "2", "--epochs", "200", "--batch-size", "64", "--model-option", "widths=[8,8,8]",
            "--no-report", "--out", str(tmp_path), "--name", name]
    proc = subprocess.Popen(_cli("train", *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=own_group)
    # The first epoch's checkpoint (written atomically after its line in metrics.jsonl: a stop between the two
    # finds no checkpoint to resume from).
    last = tmp_path / name / "checkpoints" / "last.safetensors"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not last.is_file():
        time.sleep(0.05)
    workers = _rank_pids(proc.pid, 0) + _rank_pids(proc.pid, 1)
    assert proc.poll() is None and len(workers) == 2, "the job did not start its two processes"
    return proc, workers


def _gone(pids: list[int], seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        alive = []
        for pid in pids:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z":  # a zombie has ended; its parent (the dead launcher) would have reaped it
                alive.append(pid)
        if not alive:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
def test_processes_end_when_the_launcher_is_killed(tmp_path):
    proc, workers = _start_and_wait_for_epoch(tmp_path, "orphans")
    os.kill(proc.pid, signal.SIGKILL)  # no handler runs: only the kernel can tell the processes
    proc.wait(timeout=60)  # not communicate(): the processes hold its pipes open as long as they live
    try:
        # Without PR_SET_PDEATHSIG they went on for about 35 s here before failing on their own.
        assert _gone(workers, 5), "the processes went on training after their launcher was killed"
    finally:
        for pid in workers:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM to the launcher", "Ctrl-C"])
def test_a_stopped_job_is_one_line_with_the_resume_command(tmp_path, how):
    ctrl_c = how == "Ctrl-C"
    proc, workers = _start_and_wait_for_epoch(tmp_path, "stopped", own_group=ctrl_c)
    if ctrl_c:  # a terminal sends SIGINT to its whole foreground group: the launcher and both processes
        os.killpg(proc.pid, signal.SIGINT)
    else:
        os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
    lines = err.strip().splitlines()
    signal_name = "SIGINT" if ctrl_c else "SIGTERM"
    assert lines[-1].startswith(f"error: stopped by {signal_name}: the 2 processes were stopped. The last good "
                                f"checkpoint is "), lines
    assert lines[-1].endswith(f"go on with: imgcls train --resume {tmp_path / 'stopped'} --nproc 2"), lines
    assert _gone(workers, 30)


@pytest.mark.parametrize("args, message", [
    (["--nproc", "0"], "error: --nproc must be at least 1 (processes on this node), got 0"),
    (["--nproc", "64"], "error: --nproc 64 is more processes than the"),
    (["--rdzv-timeout", "nan"], "error: --rdzv-timeout must be a positive number of seconds, got nan"),
    (["--rdzv-endpoint", "127.0.0.1:29400"], "error: --rdzv-endpoint 127.0.0.1:29400 is where several processes"),
    (["--nproc", "2", "--nnodes", "2"], "error: --nnodes 2 needs --rdzv-endpoint HOST:PORT"),
    (["--nproc", "2", "--nnodes", "2", "--rdzv-endpoint", "nowhere"], "error: --rdzv-endpoint must be HOST:PORT"),
    (["--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:29400"], "error: --nnodes 2 needs --nproc"),
    (["--nproc", "2", "--rdzv-timeout", "0"], "error: --rdzv-timeout must be a positive number of seconds"),
])
def test_bad_launch_flags_are_refused_before_any_process_starts(args, message, tmp_path):
    out = subprocess.run(_cli("train", "--out", str(tmp_path), *args), capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2
    assert out.stderr.startswith(message), out.stderr
    assert not any(tmp_path.iterdir())


def test_the_failure_message_names_the_cause_not_the_processes_stopped_by_it(tmp_path):
    """A killed process is the cause; a peer that then lost it (exit code 3) and those the agent stopped
    (SIGTERM) are consequences.  Consequences alone are still named."""
    from types import SimpleNamespace

    from imgcls.training.launch import _failure

    def failed(**codes):
        return SimpleNamespace(failures={int(r[1:]): SimpleNamespace(exitcode=c, local_rank=int(r[1:]))
                                         for r, c in codes.items()})

    note = tmp_path / "no-run-yet"
    message = _failure(failed(r0=3, r1=-signal.SIGKILL, r2=-signal.SIGTERM), 3, note, [], tmp_path)
    assert message == "process 1 of 3 was killed by SIGKILL; the others were stopped"
    assert _failure(failed(r0=3), 2, note, [], tmp_path) == "process 0 of 2 exited with code 3; the others were stopped"
    # A setting every process refuses ends them all alike: named once, and no one was stopped.
    assert _failure(failed(r0=2, r1=2, r2=2), 3, note, [], tmp_path) == "processes 0, 1 and 2 of 3 exited with code 2"
    assert _failure(failed(r1=-signal.SIGKILL, r2=-signal.SIGKILL), 3, note, [], tmp_path) == \
        "processes 1 and 2 of 3 were killed by SIGKILL; the others were stopped"


@pytest.mark.slow
def test_a_global_batch_too_small_for_the_processes_is_one_error(tmp_path):
    out = subprocess.run(_cli("train", "--nproc", "2", "--batch-size", "3", "--out", str(tmp_path)),
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors[0] == ("error: batch_size 3 is too small for 2 processes: --batch-size is the global batch, split "
                         "between them, and each needs at least 2 images; give --batch-size 4 or more, or fewer "
                         "processes")
    # Both processes refuse the batch; which of them the launcher sees fail first is a race.
    assert errors[-1] in ("error: process 0 of 2 exited with code 2; the others were stopped",
                          "error: processes 0 and 1 of 2 exited with code 2",
                          (f"error: process 1 of 2 exited with code 2 ({errors[0].removeprefix('error: ')}); "
                           f"the others were stopped")), errors
    assert "Traceback" not in out.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_nodes_that_never_meet_end_with_a_bounded_wait(tmp_path):
    """A second node that never comes: the rendezvous gives up after --rdzv-timeout with one clear line."""
    started = time.monotonic()
    out = subprocess.run(_cli("train", "--nproc", "1", "--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:29431",
                              "--rdzv-timeout", "3", "--out", str(tmp_path)),
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2
    assert time.monotonic() - started < 60
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the 2 nodes did not meet at 127.0.0.1:29431 within 3s"), out.stderr
    assert "raise --rdzv-timeout" in last and "Traceback" not in out.stderr


@pytest.mark.slow
def test_a_store_that_cannot_be_reached_is_one_line_without_cpp_logs(tmp_path):
    """192.0.2.1 (TEST-NET-1) is no one's address: torch's C++ log printed 40 lines before the error."""
    out = subprocess.run(_cli("train", "--nproc", "1", "--nnodes", "2", "--rdzv-endpoint", "192.0.2.1:29400",
                              "--rdzv-timeout", "3", "--out", str(tmp_path)),
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the 2 nodes did not meet at 192.0.2.1:29400"), out.stderr
    assert not any(tmp_path.iterdir())


SYNC_BN_CHECK = """
import json, sys
import torch
import torch.distributed as dist
from imgcls.training import distributed

distributed.init_distributed()
rank = dist.get_rank()
torch.manual_seed(0)
x = torch.randn(10, 4, 5, 5) * 3 + 1  # the global batch: 5 images a process
w = torch.randn(10, 4, 5, 5)  # weights of the loss, so that every output's gradient differs
plain = torch.nn.BatchNorm2d(4)
with torch.no_grad():
    plain.weight.uniform_(0.5, 1.5)
    plain.bias.uniform_(-1, 1)
synced = distributed.sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(4)))[0]
synced.load_state_dict(plain.state_dict())
xa = x.clone().requires_grad_()
(plain(xa) * w).sum().backward()
running_var = plain.running_var.clone()
part = x[rank * 5:(rank + 1) * 5].clone().requires_grad_()
y = synced(part)
(y * w[rank * 5:(rank + 1) * 5]).sum().backward()
grads = [None, None]
dist.all_gather_object(grads, (y.detach(), part.grad, synced.weight.grad, synced.bias.grad))
if rank == 0:
    out = torch.cat([g[0] for g in grads]); gin = torch.cat([g[1] for g in grads])
    ref = plain(x)  # a second training pass: only the output is compared, not the running statistics
    result = {
        "type": type(synced).__name__,
        "forward": float((out - ref.detach()).abs().max()),
        "input_grad": float((gin - xa.grad).abs().max()),
        # DDP averages parameter gradients over processes: their mean times 2 is the whole batch's.
        "weight_grad": float((grads[0][2] + grads[1][2] - plain.weight.grad).abs().max()),
        "bias_grad": float((grads[0][3] + grads[1][3] - plain.bias.grad).abs().max()),
        "running_var": float((synced.running_var - running_var).abs().max()),
    }
    open(sys.argv[1], "w").write(json.dumps(result))
distributed.finish()  # leave the group together, then skip the interpreter's teardown, which can die in gloo's
distributed.exit_now(0)
"""


def test_cpu_synced_batchnorm_is_batchnorm_over_the_global_batch(tmp_path):
    """In 2 gloo processes each holding half the batch: the outputs and every gradient equal one BatchNorm2d's
    over the whole batch."""
    script, result = tmp_path / "check.py", tmp_path / "result.json"
    script.write_text(SYNC_BN_CHECK)
    out = subprocess.run(_torchrun(str(script), str(result)), capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Warning" not in out.stderr, out.stderr[-3000:]  # torch.distributed.nn's all_reduce warns it is deprecated
    r = json.loads(result.read_text())
    assert r["type"] == "CPUSyncBatchNorm"
    for key in ("forward", "input_grad", "weight_grad", "bias_grad", "running_var"):
        assert r[key] < 1e-4, (key, r)


SHARE_CHECK = """
import json, os, sys
from pathlib import Path
import numpy as np
import torch.distributed as dist
from imgcls.data.base import ImageDataset, Split
from imgcls.training import distributed

distributed.init_distributed()
folder = Path(sys.argv[2])
rng = np.random.default_rng(0)
images = {k: rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8) for k, n in (("train", 300), ("test", 50))}
def dataset():
    return ImageDataset(name="made", classes=["a", "b"],
                        splits={k: Split(v.copy(), np.zeros(len(v), np.int64), None) for k, v in images.items()})
ds = dataset()
note = distributed.share_splits(ds, folder)
mine = {"note": note, "equal": all(np.array_equal(ds.splits[k].images, v) for k, v in images.items()),
        "mapped": all(isinstance(s.images, np.memmap) for s in ds.splits.values()),
        "inodes": sorted(line.split()[4] for line in open("/proc/self/maps") if "split-" in line)}
# A folder that cannot be written: every process keeps its own copy, and says why.
(folder.parent / "blocker").write_text("a file where the folder would be")
ds2 = dataset()
mine["note2"] = distributed.share_splits(ds2, folder.parent / "blocker" / "shared")
mine["kept"] = all(type(s.images) is np.ndarray for s in ds2.splits.values())
everyone = [None, None]
dist.all_gather_object(everyone, mine)
if dist.get_rank() == 0:
    Path(sys.argv[1]).write_text(json.dumps(everyone))
distributed.finish()
distributed.exit_now(0)
"""


def test_the_processes_of_a_node_map_one_copy_of_the_split_images(tmp_path):
    """share_splits: both processes see the split images unchanged, through mappings of the same file inodes,
    and no file is left once both have mapped them; an unwritable folder leaves each its own copy, with a note."""
    script, result, folder = tmp_path / "check.py", tmp_path / "result.json", tmp_path / "shared"
    script.write_text(SHARE_CHECK)
    out = subprocess.run(_torchrun(str(script), str(result), str(folder)), capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = json.loads(result.read_text())
    for r in ranks:
        assert r["note"] is None and r["equal"] and r["mapped"]
        assert len(r["inodes"]) == 2
        assert r["note2"].startswith("each process holds its own copy of the images: ") and "blocker" in r["note2"]
        assert r["kept"]
    assert ranks[0]["inodes"] == ranks[1]["inodes"]  # one copy: the same two files (train, test) in both
    assert list(folder.iterdir()) == []


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_meet_through_the_c10d_rendezvous(tmp_path):
    """Two launchers on this machine stand in for two nodes: one process each, one job of 2, one run folder."""
    endpoint = f"127.0.0.1:{_free_port()}"
    args = ["train", "--nproc", "1", "--nnodes", "2", "--rdzv-endpoint", endpoint, "--rdzv-timeout", "60",
            "--epochs", "2", "--batch-size", "128", "--model-option", "widths=[8,8,8]", "--no-report"]
    nodes = [subprocess.Popen(_cli(*args, "--out", str(tmp_path / f"node{i}"), "--name", "job"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    outs = [p.communicate(timeout=300) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], [err[-2000:] for _, err in outs]
    # Rank 0's node writes the run folder (under the --out that rank 0 was given, sent to the other node).
    written = [d for d in tmp_path.iterdir() if (d / "job" / "run.json").is_file()]
    assert len(written) == 1 and not any((d / "job").exists() for d in tmp_path.iterdir() if d not in written)
    assert json.loads((written[0] / "job" / "environment.json").read_text())["processes"] == 2
    assert sum("run folder:" in out for out, _ in outs) == 1


def test_commands_other_than_train_refuse_to_run_under_torchrun(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    out = subprocess.run(_cli("cv", "--folds", "2", "--out", str(tmp_path)), capture_output=True, text=True,
                         timeout=120, env=env, check=False)
    assert out.returncode == 2
    assert out.stderr.startswith("error: imgcls cv runs in one process; torchrun starts only `imgcls train`")
    assert not any(tmp_path.iterdir())
