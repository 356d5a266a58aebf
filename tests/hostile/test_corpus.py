"""Every case of the hostile-input corpus (corpus.py): the exit code, one error line that names the input, no
traceback, nothing left under a final name or changed in a run folder, and peak memory under its bound.

Most cases run in this process (``imgcls.cli.main``: no 3-s torch import each); the cases whose risk is
memory run in a fresh process, whose peak RSS ``os.wait4`` reports.
"""

from __future__ import annotations

import sys
import traceback
import warnings
from collections import Counter
from pathlib import Path

import pytest
from corpus import (
    KINDS,
    Case,
    CaseUnsupported,
    Outcome,
    base_run_argv,
    build_corpus,
    judge,
    post_checks,
    run_subprocess,
)

from imgcls.cli import main


def _params() -> list:
    cases = build_corpus(Path("/corpus"), Path("/base"))  # ids only: nothing is written
    return [pytest.param(c.id, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else [])
            for c in cases]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, data_dir_env, one_thread) -> dict[str, Case]:
    runs = tmp_path_factory.mktemp("base")
    assert main(base_run_argv(runs)) == 0
    return {c.id: c for c in build_corpus(tmp_path_factory.mktemp("hostile"), runs / "base")}


def fresh_process_warnings() -> None:
    """The warning filters of a fresh ``python`` (pytest's own would hide what a user sees on stderr)."""
    warnings.resetwarnings()
    warnings.simplefilter("default")
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.simplefilter("ignore", category)
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")


def run_in_process(case: Case, capsys, monkeypatch) -> Outcome:
    """``imgcls.cli.main(case.argv)`` here, with stderr captured; an exception out of it is a traceback."""
    import contextlib

    def no_server(*args, **kwargs):
        raise AssertionError("serve got past its checks and would start a server")

    monkeypatch.setattr("uvicorn.run", no_server)
    monkeypatch.setattr("uvicorn.Server.run", no_server)  # what imgcls.serving.app.serve calls
    case.setup()
    before = case.snapshot()
    capsys.readouterr()
    with (case.hold() if case.hold else contextlib.nullcontext()), warnings.catch_warnings(record=True) as seen:
        fresh_process_warnings()
        try:
            code = main(list(case.argv))
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 1
        except Exception:  # noqa: BLE001 - what a user would see as a traceback
            code = None
            print(traceback.format_exc(), file=sys.stderr)
    shown = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line) for w in seen)
    captured = capsys.readouterr()
    outcome = Outcome(code=code, stderr=shown + captured.err, stdout=captured.out)
    outcome.post = post_checks(case, before)
    return outcome


@pytest.mark.slow  # about 390 cases, 40 s: CI runs them with the other long tests
@pytest.mark.parametrize("case_id", _params())
def test_a_hostile_input_is_handled_cleanly(case_id, corpus, capsys, monkeypatch):
    case = corpus[case_id]
    try:
        case.setup()
    except CaseUnsupported as exc:
        pytest.skip(str(exc))
    outcome = run_subprocess(case) if case.max_rss_mb is not None else run_in_process(case, capsys, monkeypatch)
    assert "Traceback" not in outcome.stderr, outcome.stderr[-3000:]
    assert outcome.code == case.code, outcome.stderr[-2000:]
    if case.max_rss_mb is not None:
        assert outcome.peak_rss_mb < case.max_rss_mb, f"peak RSS {outcome.peak_rss_mb:.0f} MB"
    assert not outcome.post, outcome.post
    assert not judge(case, outcome)  # the one-line error that names the input


def test_the_corpus_covers_every_kind_with_several_variants():
    counts = Counter(c.kind for c in build_corpus(Path("/corpus"), Path("/base")))
    assert set(counts) == set(KINDS)
    assert min(counts.values()) >= 10, counts


@pytest.mark.parametrize("outcome, kinds", [
    (Outcome(2, "error: c.yaml: train.epochs must be a whole number\n"), []),
    (Outcome(2, "Traceback (most recent call last):\n  ...\nValueError: x\n"), ["traceback"]),
    (Outcome(0, ""), ["silent wrong"]),
    (Outcome(1, "error: c.yaml: bad\n"), ["unclear"]),
    (Outcome(2, "error: train.epochs must be a whole number\n"), ["unclear"]),  # does not name c.yaml
    (Outcome(2, "error: c.yaml is not valid YAML: while parsing\n  in line 1\n    ^\n"), ["unclear"] * 3),
    (Outcome(2, "usage: imgcls train [-h]\n       [--x X]\nimgcls train: error: c.yaml: bad\n"), []),
    (Outcome(2, "error: c.yaml " + "x" * 1000 + "\n"), ["unclear"]),
    (Outcome(None, "", timed_out=True), ["hang"]),
    (Outcome(2, "error: c.yaml: bad\n", peak_rss_mb=5000.0), ["blow-up"]),
    (Outcome(2, "error: c.yaml: bad\n", post=["left behind: runs/x"]), ["silent wrong"]),
    (Outcome(2, "error: c.yaml: bad pw hunter2\n"), ["leak"]),
    (Outcome(2, "error: c.yaml: bad\n", stdout="storage sqlite://u:hunter2@h/db\n"), ["leak"]),
])
def test_the_judge_names_each_kind_of_failure(outcome, kinds):
    case = Case("config", "x", ("train",), code=2, expect=("c.yaml",), max_rss_mb=900, secrets=("hunter2",))
    assert [kind for kind, _ in judge(case, outcome)] == kinds
