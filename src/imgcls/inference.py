"""From uint8 images to model inputs and class probabilities.

Shared by training (validation), evaluation, prediction and serving, so that
every path normalises images and batches them the same way.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from imgcls.config import TTA_MODES
from imgcls.errors import ConfigError

# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) that still allow native bf16 dot products.
_BF16_ISAS = ("ALL", "DEFAULT", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
              "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2")


def cpu_has_fast_bf16() -> bool:
    """True where the CPU has native bf16 matrix instructions (AMX or AVX512-BF16), and the user allows them.

    ``ATEN_CPU_CAPABILITY`` (PyTorch's kernels) and ``ONEDNN_MAX_CPU_ISA``
    (oneDNN's) can cap a CPU below its flags; a cap under AVX-512 with bf16
    means bf16 would fall to slow reference kernels, so it counts as no bf16.
    """
    capability = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    if capability in ("default", "avx2", "zvector", "vsx"):
        return False
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if isa and isa not in _BF16_ISAS:
        return False
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


@contextmanager
def ieee_fp32():
    """CUDA convolutions and matrix products in IEEE fp32 (no TF32) inside the context; restored after."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    conv = getattr(cudnn, "conv", None)
    if hasattr(conv, "fp32_precision"):  # torch 2.9 and later; the allow_tf32 flags are deprecated there
        flags, off = [(conv, "fp32_precision"), (matmul, "fp32_precision")], "ieee"
    else:
        flags, off = [(cudnn, "allow_tf32"), (matmul, "allow_tf32")], False
    saved = [getattr(obj, name) for obj, name in flags]
    for obj, name in flags:
        setattr(obj, name, off)
    try:
        yield
    finally:
        for (obj, name), value in zip(flags, saved):
            setattr(obj, name, value)


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors are computed."""

    device: torch.device
    bf16: bool
    channels_last: bool

    def autocast(self):
        """The precision context for forward passes: bf16 autocast, or full fp32.

        fp32 on a CUDA GPU turns TF32 off for convolutions and matrix products
        inside the context (cuDNN's default is TF32, with a 10-bit mantissa),
        so that fp32 scores match the CPU's and ONNX Runtime's to 1e-4.
        """
        if not self.bf16:
            return ieee_fp32() if self.device.type == "cuda" else nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    @property
    def precision(self) -> str:
        """The precision class training runs in: "bf16" (autocast) or "fp32"."""
        return "bf16" if self.bf16 else "fp32"

    def describe(self) -> str:
        slow = self.bf16 and self.device.type == "cpu" and not cpu_has_fast_bf16()
        return (f"device {self.device}, {'bf16 autocast' if self.bf16 else 'fp32'}"
                f"{' (asked for; this CPU has no native bf16, so it runs in slow reference kernels)' if slow else ''}"
                f"{', channels_last' if self.channels_last else ''}, {torch.get_num_threads()} threads")


def resolve_runtime(device: str = "auto", precision: str = "auto", channels_last: str = "auto") -> Runtime:
    """Turn the ``auto|...`` settings into a concrete :class:`Runtime`.

    bf16 autocast is on by default on CUDA GPUs that support it and on CPUs with
    native bf16 instructions, where it makes convolutions several times faster.
    channels_last is on by default on every CPU and with bf16 on CUDA.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not accepted; choose one of: auto, cpu, cuda")
    dev = torch.device(device)
    if precision == "auto":
        fast = torch.cuda.is_bf16_supported() if dev.type == "cuda" else cpu_has_fast_bf16()
        bf16 = bool(fast) and os.environ.get("IMGCLS_NO_BF16") is None
    else:
        bf16 = precision == "bf16"
    if channels_last == "auto":
        # On CPU channels_last is faster in fp32 too: a training step of the
        # seed CNN at batch 32 runs 1.42x faster, fastnet 1.45x, resnet20 1.26x
        # on an AVX2-only Zen 3 (benchmarks/README.md); on CUDA it pays with bf16.
        cl = bf16 or dev.type == "cpu"
    else:
        cl = channels_last == "on"
    return Runtime(dev, bf16, cl)


def scoring_runtime(device: str | torch.device = "auto") -> Runtime:
    """The runtime every prediction and test score is computed in, after training as in ``imgcls.load``.

    fp32, so that scores do not depend on whether the machine has fast bf16 and
    the figures training reports are the ones ``imgcls evaluate`` gives; the
    channels_last layout, where the CPU's pooling and convolution kernels are
    fastest (the standard layout's max-pool is about 10x slower on CPU).
    """
    return resolve_runtime(str(device), "fp32", "on")


def to_input(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 (N, H, W, C) -> normalised float (N, C, H, W): ``(images / 255 - mean) / std``.

    Computed as one fused ``images * scale + shift`` over the NHWC pixels
    (half the time of dividing and subtracting in turn: 0.5 against 0.8-1.4
    ms for 384 CIFAR-10 images; the same values to 3e-7).  Permuting NHWC
    gives channels_last strides for free; ``contiguous`` is called only when
    the standard layout is wanted.
    """
    scale, shift = 1.0 / (255.0 * std), -mean / std
    x = torch.addcmul(shift, images.float(), scale).permute(0, 3, 1, 2)
    return x if channels_last else x.contiguous()


def normalization_tensors(norm: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(norm["mean"], dtype=torch.float32, device=device),
            torch.tensor(norm["std"], dtype=torch.float32, device=device))


def channel_stats(images: np.ndarray) -> dict:
    """Per-channel mean and std (in 0..1 units) of uint8 (N, H, W, C) images.

    The pixels are summed as rows of 256 pixels, a few thousand rows at a
    time: down the columns of a (rows, 256 * C) block the sums vectorise
    (about 1.5x faster on CIFAR-10 than summing an (N * H * W, C) view), in
    float32 within a block and float64 across blocks, with no float copy of
    the whole dataset.
    """
    c = images.shape[-1]
    flat = torch.from_numpy(np.ascontiguousarray(images)).reshape(-1)
    width = 256 * c  # one column per (pixel of the row, channel)
    rows = flat.numel() // width
    total = torch.zeros(width, dtype=torch.float64)
    squares = torch.zeros(width, dtype=torch.float64)
    block = flat[: rows * width].view(rows, width)
    for start in range(0, rows, 4096):
        chunk = block[start:start + 4096].float()
        total += chunk.sum(0)
        squares += chunk.square_().sum(0)
    rest = flat[rows * width:].view(-1, c).double()  # the pixels that do not fill a row
    total = total.view(-1, c).sum(0) + rest.sum(0)
    squares = squares.view(-1, c).sum(0) + rest.square().sum(0)
    n = max(flat.numel() // c, 1)
    mean = total / (255.0 * n)
    var = squares / (255.0**2 * n) - mean.square()
    std = (var.clamp_min(0) * n / max(n - 1, 1)).sqrt().clamp_min(1e-3)  # constant channel: no /0
    return {"mean": [round(float(m), 6) for m in mean], "std": [round(float(v), 6) for v in std]}


def tta_views(tta: str) -> int:
    """How many views of each image ``tta`` sends through the model (see :func:`tta_logits`)."""
    return (3 if "translate" in tta else 1) * (2 if "flip" in tta else 1)


def tta_logits(model: torch.nn.Module, x: torch.Tensor, tta: str = "none", features: bool = False):
    """The model's logits for ``x``, averaged over test-time augmented copies.

    ``tta`` is one of ``none``, ``flip`` (the image and its mirror, equal
    weights), ``translate`` (the image with weight 1/2, and copies shifted one
    pixel up-left and down-right, reflecting at the border, 1/4 each) or
    ``flip-translate`` (both: six views).  The views go through the model as
    one batch.  Pure tensor code, so it exports to ONNX inside the graph.

    ``features``: also return the images' own pooled features, (N, F) float32 (the feature map of the plain
    view averaged over its positions, from the same pass), as out-of-distribution scores compare them.
    """
    if tta == "none":
        return _forward(model, x, features)
    if tta not in TTA_MODES:
        raise ConfigError(f"tta {tta!r} is not accepted; choose one of: {', '.join(TTA_MODES)}")
    views, weights = [x], [1.0]
    if "translate" in tta:
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        h, w = x.shape[-2:]
        views += [padded[..., :h, :w], padded[..., 2:, 2:]]
        weights = [0.5, 0.25, 0.25]
    if "flip" in tta:
        views += [v.flip(-1) for v in views]
        weights = [0.5 * w for w in weights] * 2
    n = x.shape[0]
    logits = _forward(model, torch.cat(views), features, n)
    logits, pooled = logits if features else (logits, None)
    logits = logits.float()
    out = logits[:n] * weights[0]
    for i, weight in enumerate(weights[1:], start=1):
        out = out + logits[i * n:(i + 1) * n] * weight
    return (out, pooled) if features else out


def _forward(model: torch.nn.Module, x: torch.Tensor, features: bool, n: int | None = None):
    """``model(x)``; with ``features`` (logits, the first ``n`` rows' pooled features, all without ``n``) from
    one pass.  (No ``len(x)`` where no features are asked for: the ONNX export would fix the batch size.)"""
    if not features:
        return model(x)
    fmap = model.forward_features(x)
    return model.forward_head(fmap), (fmap if n is None else fmap[:n]).float().mean((2, 3))


BATCH_PIXELS = 64 * 128 * 128
"""Most input pixels in one prediction batch (views included).

What a forward pass holds at once grows with the pixels: at batch 512 and
128x128, EfficientNet-Lite0's widest activation (96 channels at half the
side) took 0.8 GB.  The cap leaves every batch of images of 45x45 or less as
asked (CIFAR-10's 1,024 among them).
"""


def memory_safe_batch(batch_size: int, image_hw) -> int:
    """``batch_size``, lowered so that a batch holds at most :data:`BATCH_PIXELS` input pixels (at least 1 image)."""
    h, w = (int(v) for v in image_hw)
    return max(1, min(int(batch_size), BATCH_PIXELS // max(1, h * w)))


@torch.no_grad()
def predict_logits(model: torch.nn.Module, images, norm: dict, runtime: Runtime, batch_size: int = 512,
                   tta: str = "none", features: bool = False):
    """Logits (N, num_classes) float32 on CPU for uint8 images (N, H, W, C) (array or tensor).

    ``tta``: test-time augmentation (see :func:`tta_logits`); a trained model
    keeps its own in ``meta["tta"]``.  ``batch_size`` counts what the model
    sees at once, views included: with 6-view TTA, 1024 means 170 images (at
    6 x 1024 the fp32 test pass of fastnet on the 2-core CPU took 60 s instead of 34 s).
    ``features``: (logits, pooled features (N, F) float32 numpy) from the same passes (see :func:`tta_logits`).
    """
    model.eval()
    mean, std = normalization_tensors(norm, runtime.device)
    images = torch.as_tensor(images)
    out, pooled = [], []
    step = memory_safe_batch(max(1, batch_size // tta_views(tta)), images.shape[1:3])
    for start in range(0, len(images), step):
        x = to_input(images[start:start + step].to(runtime.device), mean, std, runtime.channels_last)
        with runtime.autocast():
            result = tta_logits(model, x, tta, features)
        logits, feats = result if features else (result, None)
        out.append(logits.float().cpu())
        if features:
            pooled.append(feats.float().cpu().numpy())
    logits = torch.cat(out) if out else torch.zeros(0, getattr(model, "num_classes", 0))
    if features:
        return logits, np.concatenate(pooled) if pooled else np.zeros((0, 0), np.float32)
    return logits


def predict_proba(model, images, norm: dict, runtime: Runtime, batch_size: int = 512,
                  temperature: float = 1.0, tta: str = "none", multilabel: bool = False) -> np.ndarray:
    """Class probabilities (N, num_classes) as float64 numpy (see :func:`proba_from_logits`)."""
    return proba_from_logits(predict_logits(model, images, norm, runtime, batch_size, tta), temperature, multilabel)


def proba_from_logits(logits: torch.Tensor, temperature: float = 1.0, multilabel: bool = False) -> np.ndarray:
    """Softmax of ``logits / temperature`` as float64 numpy; with ``multilabel`` an independent sigmoid per
    label (each row's probabilities need not sum to 1)."""
    if multilabel:
        return torch.sigmoid(logits.double() / temperature).numpy()
    return F.softmax(logits.double() / temperature, dim=1).numpy()
