"""Static post-training int8 quantization of an exported imgcls graph, with ONNX Runtime.

The fp32 graph of :mod:`imgcls.export` (uint8 pixels in; normalisation, test-time augmentation,
temperature and softmax or sigmoid inside) is quantized as it is, in the QDQ format: QuantizeLinear /
DequantizeLinear pairs around the layers that are quantized, which ONNX Runtime's CPU provider fuses
into int8 kernels (QLinearConv, QGemm).  What is quantized:

- convolutions (depthwise ones included) and hidden fully connected layers: weights int8, symmetric, one
  scale per output channel; their inputs and outputs uint8, one scale per tensor, from ranges calibrated
  on real images; a ReLU or ReLU6 right after one folds into its output's range;
- kept in fp32: the stem (the first tenth of the convolutions, at least the first one), the classifier
  (the last fully connected layer before the logits), the out-of-distribution score where the graph has
  one (kNN's MatMul against its bank of training features, whose threshold was fitted in fp32), and every
  other operation: normalisation, TTA views, residual additions, pooling, temperature, softmax or sigmoid.

Why so, measured on a flowers run of EfficientNet-Lite2 at 128 px (benchmarks/README.md, "int8 ONNX
export"), top-1 agreement with fp32 on its 860 val and test images:

- per-channel weights: with one scale per tensor, test accuracy fell 5-7 points;
- depthwise convolutions in int8: "keeping them in fp32" did worse (agreement 91-93% against 95-98%),
  because ONNX Runtime's session optimiser (WeightBiasQuantization) quantizes, per tensor, the weights of
  an fp32 convolution that sits between int8 layers; so only a first run of layers can stay fp32;
- the stem in fp32: agreement 97.3% -> 98.5% and test accuracy drop 1.1 -> 0.3 points, averaged over 9
  calibrations (3 methods x 3 samples of train images); 4 of the 9 lost 1.4 points without it, none over
  0.7 with it; it costs some speed (1.85x -> 1.70x fp32's images/s at batch 64);
- residual additions in fp32: int8 ones (QLinearAdd) were slower than the fp32 additions that ONNX Runtime
  fuses into the convolution before them, and no more accurate;
- calibration: Percentile, Entropy and MinMax came out level on flowers once the additions stayed fp32
  (within 0.25 points and 0.4% agreement); on a CIFAR-10 fastnet Percentile disagreed with fp32 on half
  as many test images as the other two (35 against 72 of 10,000), so it is the default.

    int8_bytes, info = quantize_graph(fp32_bytes, calibration_images, "percentile")
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from imgcls.errors import ConfigError, ImgclsError, unknown_name

if TYPE_CHECKING:
    import numpy as np

CALIBRATIONS = ("percentile", "entropy", "minmax")
"""How activation ranges are calibrated; ONNX Runtime's CalibrationMethod Percentile, Entropy, MinMax."""
DEFAULT_CALIBRATION = "percentile"  # the closest to fp32 on the measured runs (benchmarks/README.md)
PERCENTILE = 99.999  # percent of an activation's calibration values inside its int8 range (ONNX Runtime's default)
CALIBRATION_BATCH = 16  # images per forward pass while calibrating
CALIBRATION_CHUNK = 4  # forward passes whose activations are held in memory before they are merged
WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
ACTIVATIONS = ("Clip", "Relu")  # fold into the int8 range of the layer before them
INSTALL = "pip install onnxruntime"
OTHERS_WHY = ("normalisation, TTA views, residual additions, pooling, temperature, softmax or sigmoid, and the "
              "out-of-distribution score where there is one stay fp32")
FP32_STEM = 0.1  # the first tenth of the convolutions (at least one) stay fp32: 6 of EfficientNet-Lite2's 64
FIRST_CONV_WHY = "the first convolution: it reads the normalised pixels, and its few input channels gain little from int8"
SCORE_WHY = ("the out-of-distribution score: its comparison of the pooled features with the bank of training "
             "features, whose threshold was fitted in fp32")
STEM_WHY = ("the stem, the first tenth of the convolutions: their quantization noise reaches every later layer (and "
            "ONNX Runtime would quantize an fp32 layer between int8 ones itself: only a first run of layers stays fp32)")


def require_quantization():
    """``onnxruntime.quantization``; ImgclsError naming the package to install when it cannot be imported."""
    try:
        return importlib.import_module("onnxruntime.quantization")  # onnxruntime: on use
    except ImportError as exc:
        raise ImgclsError(f"an int8 export needs ONNX Runtime's quantization tools (onnxruntime.quantization), "
                          f"which cannot be imported here ({exc}): {INSTALL}") from None


def check_calibration(method: str) -> str:
    """``method`` itself when it is one of :data:`CALIBRATIONS`; a ConfigError naming them otherwise."""
    if method not in CALIBRATIONS:
        raise unknown_name("calibration method", method, CALIBRATIONS)
    return method


def plan(model, score_outputs=()) -> dict:
    """Which nodes of an ONNX ``model`` (after :func:`_pre_process`) are quantized, and which stay fp32 and why.

    ``score_outputs``: graph outputs that are scores beside the classifier's (the out-of-distribution score):
    the layers that feed only them stay fp32 (:data:`SCORE_WHY`), and the classifier is the last fully
    connected layer that feeds the other outputs (a kNN MatMul against its bank comes after it in node order).

    Returns:
        {"quantize": names of the layers and folded activations to quantize, "keep": [{"node", "op", "why"}]
        for every layer kept in fp32, "exclude": every node of a quantizable type that stays fp32,
        "counts": {op type: layers quantized}}.
    """
    nodes = list(model.graph.node)  # ONNX keeps nodes in topological order
    constants = {t.name for t in model.graph.initializer}
    layers = [n for n in nodes if n.op_type in WEIGHT_OPS]
    keep = {}
    outputs = [o.name for o in model.graph.output]
    score_only = _feeding_only(nodes, [o for o in outputs if o in score_outputs], [o for o in outputs
                                                                                   if o not in score_outputs])
    for n in layers:
        if n.name in score_only:
            keep[n.name] = (n, SCORE_WHY)
        elif len(n.input) < 2 or n.input[1] not in constants:
            keep[n.name] = (n, "its weights are computed in the graph, not constant")
    weighted = [n for n in layers if n.name not in keep]
    convs = [n for n in weighted if n.op_type == "Conv"]
    for i, n in enumerate(convs[:max(1, round(FP32_STEM * len(convs)))] if convs else []):
        keep[n.name] = (n, FIRST_CONV_WHY if i == 0 else STEM_WHY)
    dense = [n for n in weighted if n.op_type in ("Gemm", "MatMul")]
    if dense:
        keep[dense[-1].name] = (dense[-1], "the classifier: its outputs are the logits")
    quantized = [n for n in weighted if n.name not in keep]
    consumers: dict[str, list] = {}
    for n in nodes:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    folded = []
    for n in quantized:
        after = consumers.get(n.output[0], [])
        if len(after) == 1 and after[0].op_type in ACTIVATIONS:
            folded.append(after[0].name)
    chosen = {n.name for n in quantized} | set(folded)
    counts: dict[str, int] = {}
    for n in quantized:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return {"quantize": sorted(chosen),
            "keep": [{"node": name, "op": n.op_type, "why": why} for name, (n, why) in keep.items()],
            "exclude": sorted(n.name for n in nodes if n.op_type in WEIGHT_OPS + ACTIVATIONS and n.name not in chosen),
            "counts": counts}


def _feeding_only(nodes: list, outputs: list[str], others: list[str]) -> set[str]:
    """Names of the ``nodes`` that feed the graph outputs ``outputs`` and none of the ``others``."""
    if not outputs:
        return set()
    return upstream_nodes(nodes, outputs) - upstream_nodes(nodes, others)


def upstream_nodes(nodes: list, names: list[str]) -> set[str]:
    """Names of the ``nodes`` (an ONNX graph's) that the tensors ``names`` are computed from, directly or not."""
    producer = {name: n for n in nodes for name in n.output}
    seen, stack = set(), list(names)
    while stack:
        n = producer.get(stack.pop())
        if n is not None and n.name not in seen:
            seen.add(n.name)
            stack.extend(n.input)
    return seen


class CalibrationBatches:
    """Calibration images as ONNX Runtime's CalibrationDataReader hands them: ``{input: uint8 (B, H, W, C)}``
    per :meth:`get_next`, None at the end; ``set_range`` limits it to a run of batches (chunked calibration)."""

    def __init__(self, images: np.ndarray, input_name: str, batch: int = CALIBRATION_BATCH):
        import numpy as np  # start-up time: `imgcls --help` lists CALIBRATIONS without numpy

        self.batches = [np.ascontiguousarray(images[s:s + batch]) for s in range(0, len(images), batch)]
        self.input_name = input_name
        self.set_range(0, len(self.batches))

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item

    def set_range(self, start_index: int, end_index: int) -> None:
        self.next, self.end = start_index, min(end_index, len(self.batches))

    def get_next(self) -> dict | None:
        if self.next >= self.end:
            return None
        self.next += 1
        return {self.input_name: self.batches[self.next - 1]}


def quantize_graph(fp32: bytes, images: np.ndarray, method: str = DEFAULT_CALIBRATION,
                   input_name: str = "images", score_outputs=(), reduce_range: bool = False) -> tuple[bytes, dict]:
    """The int8 (QDQ) form of an fp32 ONNX graph, its activations calibrated on ``images``.

    Args:
        fp32: the serialised fp32 graph, as :func:`imgcls.export.export_onnx` builds it.
        images: uint8 (N, H, W, C) calibration images at the model's size.
        method: one of :data:`CALIBRATIONS`.
        input_name: the graph's input.
        score_outputs: the graph's outputs that are scores beside the classifier's, kept fp32 (see :func:`plan`).
        reduce_range: weights in 7 bits (-64 to 64, symmetric) rather than 8: on a CPU without VNNI (AVX2 alone) ONNX
            Runtime multiplies uint8 activations by int8 weights in pairs summed in int16 (VPMADDUBSW), which
            saturates past 32,767 (2 x 255 x 127 reaches 64,770); with 7-bit weights it cannot (2 x 255 x 64).

    Returns:
        (the serialised int8 graph, without imgcls metadata; a JSON-ready description: calibration
        method and images, the layers quantized per op type, those kept in fp32 and why, the formats of
        weights and activations, seconds).

    Raises:
        ImgclsError: onnxruntime.quantization cannot be imported (the package to install is named), or the
            graph has no layer left to quantize once the first convolution and the classifier stay fp32.
    """
    check_calibration(method)
    if not len(images):
        raise ConfigError("no calibration images; an int8 export needs at least one")
    q = require_quantization()
    import onnx  # on use, as the exporter

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="imgcls-int8-") as tmp, _quiet():
        source, optimised, out = (Path(tmp) / name for name in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        source.write_bytes(fp32)
        # Folds the batch-norm scales the exporter leaves as Mul(weight, scale) into constant weights (without
        # it no convolution has a constant weight to quantize) and infers the shapes the quantizer needs.  ONNX's
        # own shape inference is enough for these graphs; the symbolic one (for transformers) fails on some.
        q.quant_pre_process(str(source), str(optimised), skip_symbolic_shape=True)
        model = onnx.load(str(optimised))
        if _name_nodes(model):  # the quantizer picks nodes by name
            onnx.save(model, str(optimised))
        chosen = plan(model, tuple(score_outputs))
        if not chosen["counts"]:
            kept = "; ".join(f"{k['op']} {k['node']}: {k['why']}" for k in chosen["keep"]) or "none"
            raise ImgclsError(f"this model has no layer to quantize: int8 quantizes convolutions and fully connected "
                              f"layers other than the first convolution and the classifier (kept in fp32: {kept}). "
                              f"It would be no smaller nor faster: export it in fp32 (without --int8)")
        reader = CalibrationBatches(images, input_name)
        q.quantize_static(
            str(optimised), str(out), reader, quant_format=q.QuantFormat.QDQ, per_channel=True,
            reduce_range=reduce_range, activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
            op_types_to_quantize=list(WEIGHT_OPS + ACTIVATIONS), nodes_to_exclude=chosen["exclude"],
            calibrate_method=getattr(q.CalibrationMethod, _ORT_METHODS[method]),
            extra_options={"CalibStridedMinMax": _chunk(len(reader)), "CalibPercentile": PERCENTILE},
        )
        data = out.read_bytes()
    info = {
        "format": "QDQ (QuantizeLinear/DequantizeLinear around each int8 layer)",
        "weights": "int8, symmetric, one scale per output channel" + (REDUCED if reduce_range else ""),
        "reduce_range": bool(reduce_range),
        "activations": "uint8, asymmetric, one scale per tensor",
        "calibration": method,
        "calibration_images": len(images),
        "layers_int8": chosen["counts"],
        "kept_fp32": [*chosen["keep"], {"node": "*", "op": "other", "why": OTHERS_WHY}],
        "seconds": round(time.perf_counter() - started, 3),
    }
    if method == "percentile":
        info["percentile"] = PERCENTILE
    return data, info


REDUCED = ", 7-bit range (-64 to 64): no int16 saturation on CPUs without VNNI"
_ORT_METHODS = {"percentile": "Percentile", "entropy": "Entropy", "minmax": "MinMax"}


def _name_nodes(model) -> bool:
    """Give every unnamed node of ``model`` a name of its own; whether any had none."""
    taken = {n.name for n in model.graph.node}
    unnamed = [n for n in model.graph.node if not n.name]
    for i, n in enumerate(unnamed):
        name = f"{n.op_type}_{i}"
        while name in taken:
            name += "_"
        n.name = name
        taken.add(name)
    return bool(unnamed)


def _chunk(batches: int) -> int:
    """Forward passes per calibration chunk: at most CALIBRATION_CHUNK, dividing ``batches`` (ONNX Runtime
    requires it to)."""
    return max(d for d in range(1, min(CALIBRATION_CHUNK, batches) + 1) if batches % d == 0)


@contextlib.contextmanager
def _quiet():
    # The quantizer logs advice through the root logger and the percentile calibrator prints its settings.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)
