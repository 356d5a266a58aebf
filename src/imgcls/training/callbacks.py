"""Hooks into the training loop, for trackers, pruners and tests.

A callback is any object with some of these methods; the trainer calls those it
has, in the order the callbacks were given, and only on the process that writes
the run folder (rank 0 under DDP):

    on_train_start(state, run)     after the model is built (and restored, when resuming), before epoch 1
    on_step(state, values)         every 20 optimiser steps and at an epoch's last step: ``values`` holds
                                   step (global, counted from 1), epoch (1-based), train_loss and
                                   train_accuracy (the epoch's running means), lr, images_per_sec
    on_epoch_end(state, record)    after an epoch's checkpoints are written, with its metrics.jsonl record
                                   (stage 1 of a head-first run too, as epoch 0)
    on_train_end(state, result)    after the test split is scored and run.json written

``state`` is the trainer's :class:`~imgcls.training.trainer.TrainState`; a
callback may read the model but not change it.  An exception raised by a hook
ends the run (a pruner's TrialPruned relies on that).
"""

from __future__ import annotations

HOOKS = ("on_train_start", "on_step", "on_epoch_end", "on_train_end")


class Callbacks:
    """Calls one hook on every callback that has it."""

    def __init__(self, callbacks=()):
        self.callbacks = [c for c in callbacks if c is not None]

    def __bool__(self) -> bool:
        return bool(self.callbacks)

    def call(self, hook: str, *args) -> None:
        for c in self.callbacks:
            method = getattr(c, hook, None)
            if method is not None:
                method(*args)


class EpochEnd:
    """A plain ``on_epoch_end(state, record)`` function as a callback."""

    def __init__(self, fn):
        self.on_epoch_end = fn
