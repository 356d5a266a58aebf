"""The garbage collector is paused while torch is imported and while a dataset loads, and only then."""

import gc
import subprocess
import sys
from types import SimpleNamespace

import pytest

import imgcls.data.registry as registry
from imgcls.config import DataConfig
from imgcls.startup import collector_paused, import_paused


@pytest.fixture
def collector_on():
    was = gc.isenabled()
    gc.enable()
    yield
    gc.enable() if was else gc.disable()


def test_the_pause_restores_the_collector_even_when_the_block_fails(collector_on):
    with pytest.raises(RuntimeError):
        with collector_paused():
            assert not gc.isenabled()
            raise RuntimeError("boom")
    assert gc.isenabled()
    gc.disable()
    with collector_paused():  # a caller that had it off keeps it off
        pass
    assert not gc.isenabled()


def test_a_module_imported_paused_sees_no_collector(tmp_path, monkeypatch, collector_on):
    (tmp_path / "probe_module.py").write_text("import gc\nCOLLECTOR_ON = gc.isenabled()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_paused("probe_module").COLLECTOR_ON is False
    assert gc.isenabled()


def test_a_dataset_loads_with_the_collector_paused(monkeypatch, collector_on):
    seen = []

    def load_builtin(name, use_cache):
        seen.append(gc.isenabled())
        return original(name, use_cache)

    original = registry._load_builtin
    monkeypatch.setattr(registry, "_load_builtin", load_builtin)
    ds = registry.build_dataset(DataConfig(dataset="digits"))
    assert seen == [False] and gc.isenabled() and len(ds.splits["train"]) > 0


def test_the_package_entry_points_import_the_api_that_way(monkeypatch):
    import imgcls
    import imgcls.startup

    asked = []
    api = SimpleNamespace(train=lambda *a, **k: ("trained", a, k), load=lambda *a, **k: ("loaded", a, k))
    monkeypatch.setattr(imgcls.startup, "import_paused", lambda name: asked.append(name) or api)
    for verb in ("train", "load"):  # the first lookup goes through the API; afterwards, as before this test
        monkeypatch.setitem(imgcls.__dict__, verb, None)
        del imgcls.__dict__[verb]
    assert imgcls.train("c.yaml", epochs=2) == ("trained", ("c.yaml",), {"epochs": 2})
    assert imgcls.load("runs/x") == ("loaded", ("runs/x",), {})
    assert asked == ["imgcls.api", "imgcls.api"]
    assert imgcls.train is api.train  # the API's own function, kept for later lookups
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        imgcls.trian  # noqa: B018


def test_the_package_verbs_show_their_signatures_and_importing_the_package_is_free():
    code = ("import inspect, sys, imgcls; free = 'torch' not in sys.modules; "
            "print(free, list(inspect.signature(imgcls.train).parameters)[:3], imgcls.train.__module__, "
            "imgcls.tune.__doc__.split(chr(10))[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[0] == ("True ['config', 'resume', 'quiet'] imgcls.api Search hyperparameters with Optuna: "
                                   "``trials`` runs of ``config`` (as :func:`train` takes it), each with")


def test_building_a_model_with_options_leaves_torch_dynamo_unimported():
    # create_model counts the parameters of a model with options on the meta device first; a normal_ there would
    # import torch._dynamo, 1.1 s of every command that loads a checkpoint (its arch_kwargs are options).
    code = ("import sys; from imgcls.models import create_model; "
            "create_model('efficientnet_lite0', 3, 5, (64, 64), dropout=0.3); print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_digits_are_scikit_learns_read_without_importing_it():
    # Every photo run measures its out-of-distribution score against the digits: importing scikit-learn for them
    # took 0.9 s.
    code = ("import sys, numpy as np; from imgcls.data.registry import load_digits; d = load_digits(); "
            "free = 'sklearn' not in sys.modules; from sklearn.datasets import load_digits as sk; b = sk(); "
            "s = d.splits['all']; x = np.rint(b.images * 255 / 16).astype(np.uint8)[..., None]; "
            "print(free, s.images.shape, bool((s.images == x).all()), bool((s.labels == b.target).all()), d.classes)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True (1797, 8, 8, 1) True True ['0', '1', '2', '3', '4', '5', '6', '7', '8', '9']"
