"""The trainer's hooks: called in order, with the figures metrics.jsonl holds."""

import json

import pytest

import imgcls


class Recorder:
    def __init__(self):
        self.calls = []

    def on_train_start(self, state, run):
        self.calls.append(("start", state.epoch, run.path))

    def on_step(self, state, values):
        self.calls.append(("step", values))

    def on_epoch_end(self, state, record):
        self.calls.append(("epoch", record))

    def on_train_end(self, state, result):
        self.calls.append(("end", result.test_metrics["accuracy"]))


def test_hooks_run_in_order_with_the_run_folder_figures(tmp_path):
    rec = Recorder()
    only_epochs = []
    run = imgcls.train(out=str(tmp_path), name="hooks", quiet=True, report=False, epochs=2, batch_size=256,
                       model_option={"widths": [8, 8, 8]}, callbacks=[rec],
                       on_epoch_end=lambda s, r: only_epochs.append(r["epoch"]))
    kinds = [c[0] for c in rec.calls]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert rec.calls[0][1:] == (0, run.path)
    records = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert [c[1] for c in rec.calls if c[0] == "epoch"] == records
    assert only_epochs == [1, 2]
    steps = [c[1] for c in rec.calls if c[0] == "step"]
    # 1,437 training digits in batches of 256: 6 steps an epoch, reported at steps 1 and 6 of each.
    assert [(v["epoch"], v["step"]) for v in steps] == [(1, 1), (1, 6), (2, 7), (2, 12)]
    for epoch, record in ((1, records[0]), (2, records[1])):
        last = [v for v in steps if v["epoch"] == epoch][-1]
        assert last["train_loss"] == pytest.approx(record["train_loss"])
        assert last["train_accuracy"] == pytest.approx(record["train_accuracy"])
        assert last["lr"] == pytest.approx(record["lr"])
    assert rec.calls[-1][1] == run.test_metrics["accuracy"]
    # Epoch ends come after that epoch's steps and before the next epoch's.
    assert kinds.index("epoch") > kinds.index("step") and kinds[1:].count("start") == 0
