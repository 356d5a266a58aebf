"""How many processes train, as the trainer sees it: the one seam for data parallelism.

The trainer (:mod:`imgcls.training.trainer`) reads as the one-process loop it
is; everything that differs when several processes train one model together
goes through a strategy object it is handed:

    check_batch / check_device   what the job can do at all
    node_first, share_images     the data: decoded once per node, its split images mapped once per node
    sync_batchnorm, wrap         the model as every step trains it
    shard                        this process's slice of a global batch of indices
    model_seed, augment_draws    the random draws of this process in an epoch
    batch_loss                   this process's share of the global batch's loss
    all_sum, broadcast           figures summed over, and decisions sent to, every process
    gather_rows                  a split scored in slices, joined in order
    is_main                      whether this process writes the run folder and speaks

:class:`OneProcess` here is the plain run, where each of these is the identity;
:class:`imgcls.training.distributed.DataParallel` is DDP over gloo or NCCL.
This module imports no ``torch.distributed``.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from imgcls.errors import ConfigError
from imgcls.training.losses import classification_loss


def check_batch(batch_size: int, world: int) -> None:
    """Refuse a global batch that leaves a process fewer than 2 images (BatchNorm needs two)."""
    if batch_size < 2 * world:
        raise ConfigError(f"batch_size {batch_size} is too small for {world} processes: --batch-size is the global "
                          f"batch, split between them, and each needs at least 2 images; give --batch-size "
                          f"{2 * world} or more, or fewer processes")


class OneProcess:
    """One process trains on every batch whole: nothing is sharded, summed over processes or sent."""

    world = 1  # processes in the job
    parallel = False
    is_main = True  # this process writes the run folder, speaks and calls the callbacks
    check_every = 1  # steps between checks of the time budget's deadline (each check is a collective under DDP)

    def check_batch(self, batch_size: int) -> None:
        check_batch(batch_size, self.world)

    def check_device(self, device: torch.device) -> None:
        """Refuse a device this process cannot train on (every device will do for one process)."""

    def node_first(self):
        """A context whose block the first process of each node runs before the others (the data: decoded and
        cached once, then mapped)."""
        return contextlib.nullcontext()

    def share_images(self, ds, folder) -> str | None:
        """Let the node's processes map one copy of each split's images; None, or a note saying why not."""
        return None

    def describe(self, batch_size: int, sync_bn: bool) -> str:
        """What the training line adds about the processes ('' for one)."""
        return ""

    def sync_batchnorm(self, model: nn.Module) -> nn.Module:
        """``model`` with BatchNorm statistics over the global batch (its own batch: the model itself)."""
        return model

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module each step calls (rebuilt every epoch: a model may change which parameters train)."""
        return model

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This process's part of a global batch of indices: the whole batch."""
        return batch

    def model_seed(self, epoch_seed: int) -> int:
        """The seed of dropout and other in-model randomness in the epoch whose draws come from ``epoch_seed``."""
        return epoch_seed + 1

    def augment_draws(self, order_draws: torch.Generator, epoch_seed: int) -> torch.Generator:
        """The generator of this process's augmentation draws: the one process goes on with the order's."""
        return order_draws

    def batch_loss(self, logits: torch.Tensor, y: torch.Tensor, y_global: torch.Tensor,
                   weight: torch.Tensor | None, label_smoothing: float) -> torch.Tensor:
        """The batch's mean loss (``y`` is the whole of ``y_global``; see :mod:`imgcls.training.losses`)."""
        return classification_loss(logits, y, weight, label_smoothing)

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``values`` over all processes (a new float64 tensor on the same device)."""
        return values.detach().to(torch.float64).clone()

    def broadcast(self, obj):
        """``obj`` as the main process has it, on every process (any picklable object)."""
        return obj

    def gather_rows(self, score, n: int) -> np.ndarray:
        """``score(lo, hi)`` (rows of an (N, ...) array) over all ``n`` rows, scored in slices, joined in order."""
        return score(0, n)

    def failures(self):
        """A context in which another process's failure becomes one line (none can fail here)."""
        return contextlib.nullcontext()

    def finish(self) -> None:
        """Leave the job once the last collective is done (nothing to leave here)."""
