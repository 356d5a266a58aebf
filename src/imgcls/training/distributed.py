"""Data-parallel training on torch.distributed: one process per CPU socket share or GPU, started by torchrun.

    torchrun --nproc-per-node N -m imgcls train ...     (or: imgcls train --nproc N ...)
      -> init_distributed()       reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK; gloo on CPU, NCCL on CUDA
      -> every rank decodes (or maps) the same uint8 dataset; rank 0 first, so the cache is built once;
         the node's processes then map one copy of each split's images (``share_splits``)
      -> every step: all ranks draw the same shuffled global batch, each trains on its own slice
         (``shard``), DistributedDataParallel averages the gradients
      -> validation and test: each rank scores a contiguous slice of the split (``gather_rows``),
         so every image is scored exactly once, with no padding
      -> rank 0 alone writes the run folder, logs, checkpoints (from the unwrapped model) and the report

The trainer sees all of this through :class:`DataParallel`, its strategy for such a job
(:mod:`imgcls.training.strategy`; :func:`strategy` picks it); the run driver (:mod:`imgcls.driver`) joins the
group.  Without torchrun's environment every function here is the single-process case: rank 0 of 1, no process
group, nothing gathered.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from imgcls.errors import ConfigError, PeerLost
from imgcls.io import write_npy
from imgcls.training.losses import classification_loss, loss_denominator
from imgcls.training.strategy import OneProcess

# How long a collective waits for a rank that stopped answering before the job fails (seconds).
TIMEOUT_S = 600
# IMGCLS_SHARE_SPLITS=0 leaves each process its own copy of the split images (benchmarks/ddp_memory.py compares).
SHARE_ENV = "IMGCLS_SHARE_SPLITS"
# A shared split file older than this was left by a job that died before unlinking it (seconds).
_STALE_SHARED_S = 3600


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world() -> Dist:
    """The job described by torchrun's environment variables (rank 0 of 1 without them)."""
    try:
        return Dist(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                    int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError as e:
        raise ConfigError(f"torchrun's RANK, WORLD_SIZE and LOCAL_RANK must be integers ({e})") from None


def init_distributed() -> Dist:
    """Join the process group torchrun set up (once per process).

    The group runs gloo for CPU tensors and, where CUDA is available, NCCL for
    GPU tensors (each process on GPU ``LOCAL_RANK``), so it can be joined before
    the run's config (and so its device) is known: a resumed run's config is
    read by rank 0 and sent to the others.
    """
    d = env_world()
    if not d.enabled or dist.is_initialized():
        return d
    backend = "gloo"
    if torch.cuda.is_available() and d.local_rank < torch.cuda.device_count():
        torch.cuda.set_device(d.local_rank)
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, timeout=_dt.timedelta(seconds=TIMEOUT_S))
    global _joined
    _joined = True
    return d


_joined = False  # whether this process joined a process group (see exit_now)


def exit_now(code: int) -> None:
    """End a process that joined a process group with ``code``, skipping the interpreter's teardown.

    After :func:`finish` such a process has nothing left to do, yet its exit
    could still die by SIGABRT ("terminate called without an active
    exception": gloo's worker threads can still hold work with tensors while
    the interpreter is torn down, pytorch/pytorch#179291), seen about once
    in 30 runs; torchrun then counts the job as failed, and a
    surviving node's agent waits out its exit barrier.  Its files are closed
    by then; stdout and stderr are flushed here.  A process that joined no
    group returns.
    """
    if not _joined:
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def check_device(device: torch.device, d: Dist) -> None:
    """Refuse a CUDA run with more processes on this node than it has GPUs."""
    if d.enabled and device.type == "cuda" and d.local_rank >= torch.cuda.device_count():
        raise ConfigError(f"process {d.local_rank} of this node has no GPU: the node has {torch.cuda.device_count()}; "
                          f"start at most that many processes per node (--nproc), or train on --device cpu")


def current() -> Dist:
    """This process's rank and world once the group is up (rank 0 of 1 otherwise)."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), env_world().local_rank)
    return Dist()


def barrier() -> None:
    if current().enabled:
        dist.barrier()


def broadcast(obj, src: int = 0):
    """``obj`` as rank ``src`` has it, on every rank (any picklable object)."""
    if not current().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``values`` over all ranks (a new float64 tensor on the same device)."""
    out = values.detach().to(torch.float64).clone()
    if current().enabled:
        dist.all_reduce(out)
    return out


def chunk(n: int, d: Dist) -> tuple[int, int]:
    """Rank ``d.rank``'s contiguous slice [lo, hi) of ``n`` rows: sizes differ by at most one, none repeated."""
    base, extra = divmod(n, d.world)
    lo = d.rank * base + min(d.rank, extra)
    return lo, lo + base + (1 if d.rank < extra else 0)


def shard(batch: torch.Tensor, d: Dist) -> torch.Tensor:
    """This rank's part of a global batch of indices (contiguous, sizes differ by at most one)."""
    lo, hi = chunk(len(batch), d)
    return batch[lo:hi]


def gather_rows(score, n: int) -> np.ndarray:
    """``score(lo, hi)`` (rows of an (N, ...) array) on each rank's slice, joined in order on every rank."""
    d = current()
    lo, hi = chunk(n, d)
    part = score(lo, hi)
    if not d.enabled:
        return part
    parts = [None] * d.world
    dist.all_gather_object(parts, np.asarray(part))
    return np.concatenate(parts)


def share_splits(ds, folder: Path) -> str | None:
    """Under DDP, let each node's processes map one copy of every split's images instead of holding one each.

    Cutting train/val/test out of a dataset copies their images into each
    process (N x the dataset's bytes on a node of N).  Here the node's first
    process writes each split to ``folder`` once; every process maps the file
    copy-on-write, so all read the same pages of the page cache, and the first
    process unlinks the files once all have mapped them (a mapping outlives its
    file's name: nothing is left on disk, even if the job dies later).  A
    collective, so every rank must call it.

    Returns:
        None when the images are shared (or there is nothing to share: one
        process on this node), else a note saying why each process keeps
        its own copy (``folder`` could not be written: no space, no permission).
    """
    d = current()
    if not d.enabled or int(os.environ.get("LOCAL_WORLD_SIZE", "1")) <= 1 or os.environ.get(SHARE_ENV) == "0":
        return None
    job = broadcast(uuid.uuid4().hex[:12])  # one name for the job's files; the node's number keeps nodes apart
    stem = f"split-{job}-{os.environ.get('GROUP_RANK', '0')}"
    paths = {name: folder / f"{stem}-{name}.npy" for name in ds.splits}
    reason = ""
    if d.local_rank == 0:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            _remove_stale_shared(folder)
            for name, split in ds.splits.items():  # whole or not at all; gone when the job ends, so not fsynced
                write_npy(paths[name], split.images, fsync=False)
        except OSError as exc:
            reason = f"{folder} could not be written ({exc})"
            _unlink(paths.values())
    reasons = [""] * d.world  # collective, so also the barrier before anyone maps
    dist.all_gather_object(reasons, reason)
    failed = [r for r in reasons if r]
    if not failed:
        for name, split in ds.splits.items():
            split.images = np.load(paths[name], mmap_mode="c", allow_pickle=False)
    barrier()  # every process has mapped every file
    if d.local_rank == 0:  # also when another node failed: this node's files, written for nothing, go too
        _unlink(paths.values())
    return f"each process holds its own copy of the images: {failed[0]}" if failed else None


def _unlink(paths) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def _remove_stale_shared(folder: Path) -> None:
    """Remove the split files of jobs that died between writing and unlinking them."""
    now = time.time()
    for path in folder.glob("*split-*.npy*"):
        with contextlib.suppress(OSError):
            if now - path.stat().st_mtime > _STALE_SHARED_S:
                path.unlink()


def wrap(model: nn.Module, d: Dist) -> nn.Module:
    """``model`` in DistributedDataParallel (the model itself when there is one process).

    Built again each epoch by the trainer: a model may change which parameters
    train from one epoch to the next (fastnet's whitening bias), and DDP fixes
    that set when it is built.
    """
    if not d.enabled:
        return model
    cuda = next(model.parameters()).is_cuda
    return nn.parallel.DistributedDataParallel(model, device_ids=[d.local_rank] if cuda else None)


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """Make every BatchNorm compute its training statistics over the global batch.

    torch's SyncBatchNorm serves CUDA; on the CPU (which it refuses) each
    BatchNorm2d becomes a :class:`CPUSyncBatchNorm`.  State-dict keys stay the
    same, so checkpoints load into the ordinary model.
    """
    if next(model.parameters()).is_cuda:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:
                synced = CPUSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                          child.track_running_stats)
                synced.load_state_dict(child.state_dict())
                for p_new, p_old in zip(synced.parameters(), child.parameters()):
                    p_new.requires_grad_(p_old.requires_grad)
                setattr(parent, name, synced)
    return model


class _AllSum(torch.autograd.Function):
    """The sum over all ranks, differentiable: the gradient of a sum is the sum of every rank's gradient.

    torch.distributed.nn.functional.all_reduce does the same but warns, in torch 2.13, that it is deprecated.
    """

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are summed over all ranks (gloo), with gradients through them.

    Per channel: the sums of x and x^2 and the count are all-reduced, mean and
    variance follow; the all-reduce is differentiable (:class:`_AllSum`).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and current().enabled):
            return super().forward(x)
        xf = x.float()
        count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float32)
        stats = _AllSum.apply(torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), count]))
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1).clamp_min(1)), alpha=m)
                self.num_batches_tracked.add_(1)
        shape = (1, c, 1, 1)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


@contextlib.contextmanager
def peer_failures():
    """Turn a collective's failure (another process died or hung) into one PeerLost line (exit code 3)."""
    try:
        yield
    except (dist.DistError, RuntimeError) as exc:
        text = str(exc)
        if not current().enabled or not (isinstance(exc, dist.DistError) or any(
                k in text for k in ("gloo", "NCCL", "Connection", "connection"))):
            raise
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        first = first.split(" This is typically")[0]  # gloo's advice that follows is for its own developers
        raise PeerLost(f"process {current().rank}: another process of the job stopped answering "
                            f"({first[:200]})") from None


def finish() -> None:
    """Leave the process group together once the last collective is done.

    Every process waits for the others, then destroys its group: a process
    that exited while another still held the group's store could die at exit
    (SIGABRT in gloo's teardown), and the job would count as failed.
    """
    if dist.is_available() and dist.is_initialized():
        if current().enabled:
            dist.barrier()
        dist.destroy_process_group()


class DataParallel(OneProcess):
    """The trainer's strategy when torchrun started several processes (see :mod:`imgcls.training.strategy`).

    Every process draws the same order of global batches and trains on its own
    slice of each (``shard``); DistributedDataParallel averages the gradients,
    and ``batch_loss`` scales each process's loss so that the average is the
    gradient of the whole batch's mean.  Decisions (the time budget's clock,
    stage 1's head) are the main process's, broadcast to the others.
    """

    parallel = True
    check_every = 20  # steps between checks of the deadline: each is a broadcast

    def __init__(self, d: Dist):
        self.d = d
        self.world = d.world
        self.is_main = d.is_main

    def check_device(self, device: torch.device) -> None:
        check_device(device, self.d)

    @contextlib.contextmanager
    def node_first(self):
        first = self.d.local_rank == 0
        if not first:
            barrier()  # waits for the node's first process to end its block
        yield
        if first:
            barrier()

    def share_images(self, ds, folder) -> str | None:
        return share_splits(ds, folder)

    def describe(self, batch_size: int, sync_bn: bool) -> str:
        return (f"; {self.world} processes, each {batch_size // self.world}-{-(-batch_size // self.world)} images of "
                f"every batch of {batch_size}" + (", BatchNorm synchronised" if sync_bn else ""))

    def sync_batchnorm(self, model: nn.Module) -> nn.Module:
        return sync_batchnorm(model)

    def wrap(self, model: nn.Module) -> nn.Module:
        return wrap(model, self.d)

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        return shard(batch, self.d)

    def model_seed(self, epoch_seed: int) -> int:
        return epoch_seed + 1 + self.d.rank

    def augment_draws(self, order_draws: torch.Generator, epoch_seed: int) -> torch.Generator:
        """The main process goes on with the order's generator (as one process does); the others draw from
        their own, seeded by (seed, epoch, process)."""
        if self.is_main:
            return order_draws
        return torch.Generator().manual_seed(epoch_seed + 104_729 * self.d.rank)

    def batch_loss(self, logits: torch.Tensor, y: torch.Tensor, y_global: torch.Tensor,
                   weight: torch.Tensor | None, label_smoothing: float) -> torch.Tensor:
        """This process's share of the global batch's mean loss, scaled so that DDP's gradient average
        equals the gradient of the whole batch's mean (slices may differ in size by one)."""
        total = classification_loss(logits, y, weight, label_smoothing, reduction="sum")
        return total * self.world / loss_denominator(y_global, weight)

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        return all_sum(values)

    def broadcast(self, obj):
        return broadcast(obj)

    def gather_rows(self, score, n: int) -> np.ndarray:
        return gather_rows(score, n)

    def failures(self):
        return peer_failures()

    def finish(self) -> None:
        finish()


def strategy() -> OneProcess:
    """The trainer's strategy for this process: :class:`DataParallel` in a process group of several, else
    :class:`imgcls.training.strategy.OneProcess`."""
    d = current()
    return DataParallel(d) if d.enabled else OneProcess()
