"""Nothing computes in bf16 where the CPU has no native bf16, Muon's Newton-Schulz iteration included."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import imgcls
from imgcls import inference


class _DtypeLog(TorchDispatchMode):
    """Every aten op run inside the context, with the dtypes of its tensor arguments and results."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, set]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        dtypes = set()
        for tree in (args, kwargs or {}, out):
            for t in torch.utils._pytree.tree_leaves(tree):
                if isinstance(t, torch.Tensor):
                    dtypes.add(t.dtype)
        self.ops.append((str(func.overloadpacket.__name__), dtypes))
        return out


def _bf16_ops(tmp_path, name, **opts):
    log = _DtypeLog()
    with log:
        imgcls.train(data="digits", out=str(tmp_path), name=name, epochs=1, optimizer="muon", lr=0.05,
                     muon_lr=0.05, batch_size=256, quiet=True, report=False,
                     model_option={"widths": [8, 16, 16]}, **opts)
    ops = {op for op, dtypes in log.ops if torch.bfloat16 in dtypes or torch.float16 in dtypes}
    return ops, {op for op, _ in log.ops}


@pytest.mark.parametrize("env", [{"ATEN_CPU_CAPABILITY": "avx2"}, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, {}])
def test_a_cpu_without_native_bf16_trains_and_scores_in_fp32_only(tmp_path, monkeypatch, env):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if not env:  # the flags themselves say no bf16
        monkeypatch.setattr(inference, "cpu_has_fast_bf16", lambda: False)
    assert not inference.resolve_runtime("cpu").bf16
    low, every = _bf16_ops(tmp_path, "fp32", device="cpu")
    assert {"mm", "convolution"} <= every  # the hook saw the training step's matrix products
    assert low == set(), f"ran in bf16/fp16 on a CPU without native bf16: {sorted(low)}"


def test_a_cpu_with_native_bf16_trains_in_bf16_muon_included(tmp_path, monkeypatch):
    # The control: the same hook does see bf16 where the runtime allows it, in the
    # convolutions (autocast) and in Muon's matrix products.
    for key in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "IMGCLS_NO_BF16"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(inference, "cpu_has_fast_bf16", lambda: True)
    low, _ = _bf16_ops(tmp_path, "bf16", device="cpu")
    assert {"mm", "convolution"} <= low
