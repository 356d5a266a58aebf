"""Export a trained model to ONNX, and run exported models with ONNX Runtime.

The exported graph is self-contained: its input ``images`` is raw uint8 pixels
(N, H, W, C), as images are decoded; the graph normalises them exactly as
:func:`imgcls.inference.to_input` does, ``x = (pixels / 255 - mean) / std`` per
channel, and returns ``logits`` (N, K) and ``probabilities`` (N, K) =
softmax(logits / temperature), or for a multi-label model an independent
sigmoid(logits / temperature) per label.  A run that stores an out-of-distribution
score (``meta["ood"]``, :mod:`imgcls.ood`) has a third output, ``ood_score`` (N,), computed
in the graph as :func:`imgcls.ood.score_of` computes it (for kNN, from the plain view's
pooled features against the bank of training features, kept float16 in the graph);
an image below the stored threshold is "unknown".  The batch dimension is dynamic.
What a caller needs to prepare images (classes, size, resize mode, normalisation,
temperature, thresholds, the score's threshold) is stored in the model's
``metadata_props``: JSON under ``imgcls_meta`` (the ``ood`` entry without its bank) and a
JSON list under ``class_names``.

Every export is verified before it is written: ONNX Runtime and PyTorch are run
on real images (the run's own test split) at batch size 1 and N, and the file is
written only when their probabilities (and out-of-distribution scores) agree within the tolerance.

``int8=True`` writes the static int8 quantization of that same graph instead
(:mod:`imgcls.quantize`), calibrated on a seeded sample of the run's train
images and checked on its whole test split against the fp32 graph: top-1
agreement and the accuracy of each (mAP and exact-set agreement for a
multi-label model).  It is written only when its accuracy is at most
``max_drop`` below fp32's.  With an out-of-distribution score the check also
reports the share of its images the stored threshold (fitted on fp32 features)
rejects under fp32 and under int8, and the share rejected by one only: reported,
not part of the verdict.

    info = export_onnx("runs/digits")      # runs/digits/export/model.onnx and export.json
    clf = load_onnx("runs/digits")         # same surface as imgcls.load(...) for prediction
    clf.predict(["seven.png"])
    export_onnx("runs/digits", int8=True)  # runs/digits/export/model-int8.onnx and export-int8.json
    load_onnx("runs/digits", int8=True)
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imgcls import rundir
from imgcls.checkpoint import find_checkpoint, is_multilabel
from imgcls.config import read_config_values
from imgcls.errors import (
    AccuracyDropError,
    CheckpointError,
    ConfigError,
    DataError,
    ImgclsError,
)
from imgcls.evaluation.multilabel import mean_average_precision
from imgcls.inference import normalization_tensors, predict_logits, to_input, tta_logits
from imgcls.io import write_atomic, write_json
from imgcls.ood import K, entry_problem, entry_record, score_tensor
from imgcls.predictor import Predictor, TorchPredictor, load
from imgcls.quantize import (
    CALIBRATIONS,
    DEFAULT_CALIBRATION,
    check_calibration,
    quantize_graph,
    require_quantization,
)
from imgcls.startup import usable_cores

FORMATS = ("onnx",)
EXPORTERS = ("auto", "dynamo", "torchscript")
"""``auto`` tries the dynamo exporter and falls back to the TorchScript one if it fails."""
META_KEY = "imgcls_meta"
CLASSES_KEY = "class_names"
META_FORMAT_VERSION = 1
INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "probabilities")
OOD_OUTPUT = "ood_score"  # the third output, when the checkpoint stores an out-of-distribution score
MAX_CHECK_IMAGES = 64
MAX_DROP = 0.01  # the largest accepted fall of test accuracy (mAP: multi-label) from fp32 to int8: 1 point
CALIBRATION_IMAGES = 256  # int8: a seeded sample of the train split (a few hundred: stable ranges, seconds to run)
CALIBRATION_SEED = 0
INT8_BATCH = 64  # images per ONNX Runtime call when the int8 export checks itself
# Checkpoint metadata stored at the top level of imgcls_meta (in its own layout); the rest is kept under "checkpoint".
_MAPPED_KEYS = ("arch", "arch_kwargs", "classes", "input_shape", "normalize", "temperature", "thresholds", "resize",
                "tta", "task", "format_version", "train_state", "ood")


class PixelClassifier(nn.Module):
    """A model with its preprocessing: uint8 (N, H, W, C) -> (logits, probabilities), each (N, K) float32, and
    with ``ood`` (a checkpoint's ``meta["ood"]``) the out-of-distribution score (N,) float32 as a third output,
    as :func:`imgcls.ood.score_of` computes it (kNN's bank is kept as the checkpoint stores it, float16)."""

    def __init__(self, model: nn.Module, normalize: dict, temperature: float = 1.0, tta: str = "none",
                 multilabel: bool = False, ood: dict | None = None):
        super().__init__()
        self.model = model
        self.tta = tta
        self.multilabel = multilabel
        mean, std = normalization_tensors(normalize, torch.device("cpu"))
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.register_buffer("temperature", torch.tensor(float(temperature), dtype=torch.float32))
        self.score = None if ood is None else ood["score"]
        self.k = int(ood.get("k", K)) if ood is not None else K
        bank = _knn_bank(ood)
        self.register_buffer("bank", None if bank is None else bank.detach().cpu().contiguous())

    def forward(self, images: torch.Tensor):
        x = to_input(images, self.mean, self.std, channels_last=False)
        knn = self.score == "knn"
        out = tta_logits(self.model, x, self.tta, features=knn)  # kNN: the plain view's pooled features too
        logits, pooled = out if knn else (out, None)
        scaled = logits / self.temperature
        proba = torch.sigmoid(scaled) if self.multilabel else F.softmax(scaled, dim=1)
        if self.score is None:
            return logits, proba
        return logits, proba, score_tensor(self.score, logits, pooled, self.multilabel, self.bank, self.k)


def _knn_bank(ood: dict | None) -> torch.Tensor | None:
    """The bank of training features (B, F) of a stored kNN score, as the checkpoint keeps it (float16); else None."""
    if ood is None or ood["score"] != "knn":
        return None
    return torch.as_tensor(ood["bank"])


def output_names(meta: dict) -> tuple[str, ...]:
    """The outputs of the graph exported from a checkpoint with metadata ``meta``: :data:`OUTPUT_NAMES`, and
    :data:`OOD_OUTPUT` when it stores an out-of-distribution score."""
    return OUTPUT_NAMES + ((OOD_OUTPUT,) if meta.get("ood") is not None else ())


def export(run_or_checkpoint: str | Path, format: str = "onnx", **options) -> dict:
    """Export a run or checkpoint to ``format`` (only ``onnx`` so far); see :func:`export_onnx`."""
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; choose one of: {', '.join(FORMATS)}")
    return export_onnx(run_or_checkpoint, **options)


def export_onnx(
    run_or_checkpoint: str | Path,
    out: str | Path | None = None,
    which: str | None = None,
    opset: int | None = None,
    check_images: np.ndarray | None = None,
    tolerance: float = 1e-4,
    exporter: str = "auto",
    int8: bool = False,
    max_drop: float = MAX_DROP,
    calibration: str | None = None,
    data: str | Path | None = None,
) -> dict:
    """Export a trained model as a self-contained ONNX file, verified against PyTorch.

    Args:
        run_or_checkpoint: a run folder (its final checkpoint, as :func:`imgcls.load`
            picks it) or a checkpoint file.
        out: the ``.onnx`` file to write; default ``export/model.onnx`` in the run
            folder (or in the checkpoint file's folder), ``export/model-int8.onnx`` with ``int8``.
        which: ``best`` or ``last`` to override the run's final checkpoint.
        opset: ONNX opset; default: the exporter's own.
        check_images: uint8 (N, H, W, C) images to verify on; default: up to 64
            images of the run's test split (random images when that data cannot
            be read, or for a checkpoint file).
        tolerance: the largest accepted absolute difference of probabilities
            between ONNX Runtime and PyTorch (and of the out-of-distribution score, relative
            to its scale: :func:`score_tolerance`).
        exporter: one of :data:`EXPORTERS`.
        int8: write the static int8 quantization of the checked graph instead (see
            :mod:`imgcls.quantize`): calibrated on :data:`CALIBRATION_IMAGES` images of the
            run's train split (a seeded sample), checked on its whole test split against
            the fp32 graph.  Needs the run's data.
        max_drop: with ``int8``, the largest accepted fall of test accuracy (mAP for a
            multi-label model) from fp32 to int8, a fraction: 0.01 is 1 point.  A negative
            value asks int8 to be better by that much.
        calibration: with ``int8``, one of :data:`imgcls.quantize.CALIBRATIONS`; default
            :data:`imgcls.quantize.DEFAULT_CALIBRATION`.
        data: with ``int8``, the run's data from where it is now, when it has moved since
            training (its seeded splits are made again from it).

    Returns:
        {"path", "max_abs_diff_probabilities", "max_abs_diff_logits", "tolerance",
        "exporter", "opset", "images_checked", "images_source", "seconds", ...; with an
        out-of-distribution score "ood_score", "max_abs_diff_ood_score", "ood_score_tolerance"
        (see :func:`score_tolerance`) and for kNN "ood_bank"},
        also written as ``export.json`` beside the model; with ``int8``, {"path", "bytes",
        "fp32_bytes", "times_smaller", "quantization", "check", "fp32_check", ...} written as
        ``export-int8.json``.

    Raises:
        ImgclsError: when ONNX Runtime and PyTorch disagree by more than
            ``tolerance``; nothing is written then (an earlier file at ``out`` is
            left as it was).
        AccuracyDropError: with ``int8``, when its accuracy falls by more than ``max_drop``;
            nothing is written, the figures are in the message.
        DataError: with ``int8``, when the run's images cannot be read.
    """
    started = time.perf_counter()
    _check_options(tolerance, exporter, int8, max_drop, calibration, data)
    if int8:
        require_quantization()  # a missing package is said before minutes of work
    source = Path(run_or_checkpoint)
    checkpoint = find_checkpoint(source, which)
    which = checkpoint.stem if source.is_dir() else which
    # fp32 on CPU: the reference the exported graph is checked against, and what the graph is traced from.
    clf = load(source, which=which, device="cpu")
    out = Path(out) if out is not None else _default_out(source, int8)
    images8 = _int8_images(clf, data) if int8 else None  # read first: missing data fails in seconds
    given = "given"
    if images8 is not None and check_images is None:
        check_images, given = images8["check"][:MAX_CHECK_IMAGES], f"{images8['check_split']} split"
    proto, report = _checked_graph(clf, checkpoint, out, opset, (check_images, given), tolerance, exporter)
    if images8 is not None:
        report_name = rundir.EXPORT_INT8_REPORT
        data_out, report = _quantized(proto, clf, images8, calibration or DEFAULT_CALIBRATION, max_drop, report)
    else:
        report_name = rundir.EXPORT_REPORT
        data_out = proto.SerializeToString()
    write_atomic(out, data_out)
    report["seconds"] = round(time.perf_counter() - started, 3)
    write_json(out.parent / Path(report_name).name, report)  # beside the model, wherever it goes
    return report


def _check_options(tolerance, exporter: str, int8: bool, max_drop, calibration, data) -> None:
    if not tolerance >= 0:  # also refuses NaN
        raise ConfigError(f"tolerance must be a number >= 0, got {tolerance!r}")
    if exporter not in EXPORTERS:
        raise ConfigError(f"unknown exporter {exporter!r}; choose one of: {', '.join(EXPORTERS)}")
    if not isinstance(int8, bool):
        raise ConfigError(f"int8 must be True or False, got {int8!r}")
    if not int8:
        given = [name for name, value in (("calibration", calibration), ("data", data)) if value is not None]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise ConfigError(f"{' and '.join(given)} {verb} to an int8 export: add int8=True (--int8)")
        return
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not -1 <= max_drop <= 1:
        raise ConfigError(f"max_drop must be a fraction between -1 and 1 (0.01 = 1 point of accuracy), "
                          f"got {max_drop!r}")
    if calibration is not None:
        check_calibration(calibration)


def _checked_graph(clf: TorchPredictor, checkpoint: Path, out: Path, opset, check_images: tuple, tolerance: float,
                   exporter: str):
    """The fp32 graph with its metadata, checked against PyTorch on ``check_images`` (images or None, where
    they came from): (onnx ModelProto, report)."""
    images, images_source = _images_to_check(clf, *check_images)
    wrapper = PixelClassifier(clf.model, clf.meta["normalize"], clf.meta.get("temperature", 1.0),
                              clf.meta.get("tta", "none"), clf.multilabel, clf.ood).eval()
    proto, used, fallback = _to_onnx(wrapper, clf.input_shape, opset, exporter, output_names(clf.meta))
    bank = store_bank(proto, wrapper.bank)
    _set_metadata(proto, onnx_metadata(clf.meta, _parameters(clf), checkpoint.name))
    data = proto.SerializeToString()

    diffs = _compare(data, clf, images, tolerance)
    report = {
        "path": str(out),
        "max_abs_diff_probabilities": diffs["probabilities"],
        "max_abs_diff_logits": diffs["logits"],
        "tolerance": tolerance,
        "exporter": used,
        "opset": _opset_of(proto),
        "images_checked": len(images),
        "images_source": images_source,
        "batch_sizes_checked": [1, len(images)],
        "checkpoint": str(checkpoint),
        "bytes": len(data),
    }
    if OOD_OUTPUT in diffs:
        report.update(ood_score=clf.ood["score"], max_abs_diff_ood_score=diffs[OOD_OUTPUT],
                      ood_score_tolerance=diffs["ood_score_tolerance"])
        if bank is not None:
            report["ood_bank"] = bank
    if fallback:
        report["dynamo_error"] = fallback
    failed = [(name, diffs[name], limit) for name, limit in
              (("probabilities", tolerance), (OOD_OUTPUT, diffs.get("ood_score_tolerance")))
              if limit is not None and not diffs[name] <= limit]  # NaN fails too
    if failed:
        what = "; ".join(f"max abs difference of {name} {diff:.3g} > tolerance {limit:g}" for name, diff, limit in failed)
        raise ImgclsError(
            f"the ONNX export of {checkpoint} does not match PyTorch: {what} over {len(images)} images "
            f"({images_source}; {used} exporter, opset {report['opset']}); {out} was not written. Try another opset "
            f"or exporter, or a larger tolerance if the difference is acceptable"
        )
    return proto, report


def score_tolerance(tolerance: float, scores: np.ndarray) -> float:
    """The largest accepted abs difference of the out-of-distribution score between ONNX Runtime and PyTorch:
    ``tolerance`` times the scores' scale, max(1, largest |score|).  MSP and kNN lie in [-1, 1], so theirs is
    ``tolerance`` itself; energy is in the logits' units, and float32 rounding is relative to their size."""
    scale = float(np.abs(scores).max()) if len(scores) else 0.0
    return tolerance * max(1.0, scale)


def store_bank(proto, bank: torch.Tensor | None) -> dict | None:
    """Keep a float16 kNN bank float16 in ``proto``: both exporters (and ONNX Runtime's optimiser before int8
    quantization) fold ``bank.float().T`` into a float32 constant, twice the bytes; that constant becomes a float16
    one and a Cast to float32 at the start of the graph, the same values exactly.  Returns what the graph holds
    ({"images", "features", "dtype", "bytes"}), or None without a bank."""
    if bank is None:
        return None
    import onnx
    from onnx import numpy_helper

    values = bank.float().numpy()
    for i, t in enumerate(proto.graph.initializer):
        if t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) or \
                sorted(t.dims) != sorted(values.shape):
            continue
        array = numpy_helper.to_array(t)
        if not any(array.shape == v.shape and np.array_equal(array, v) for v in (values, values.T)):
            continue
        if t.data_type == onnx.TensorProto.FLOAT and bank.dtype == torch.float16:
            half = numpy_helper.from_array(array.astype(np.float16), _unused_name(proto, t.name + "_float16"))
            cast = onnx.helper.make_node("Cast", [half.name], [t.name], to=onnx.TensorProto.FLOAT,
                                         name=_unused_name(proto, "ood_bank_to_float32"))
            proto.graph.initializer[i].CopyFrom(half)
            proto.graph.node.insert(0, cast)
            array = array.astype(np.float16)
        return {"images": int(bank.shape[0]), "features": int(bank.shape[1]), "dtype": str(array.dtype),
                "bytes": int(array.nbytes)}
    # Not an initializer (a Constant node, say): the graph still computes the score, as the exporter stored it.
    return {"images": int(bank.shape[0]), "features": int(bank.shape[1]), "dtype": "as the exporter stored it"}


def _unused_name(proto, name: str) -> str:
    taken = {t.name for t in proto.graph.initializer} | {n.name for n in proto.graph.node} | \
        {o for n in proto.graph.node for o in n.output}
    while name in taken:
        name += "_"
    return name


def _parameters(clf: TorchPredictor) -> int:
    return sum(p.numel() for p in clf.model.parameters())


def _default_out(source: Path, int8: bool = False) -> Path:
    folder = source if source.is_dir() else source.parent
    return folder / (rundir.EXPORT_INT8 if int8 else rundir.EXPORT)


def _images_to_check(clf: TorchPredictor, images: np.ndarray | None, source: str = "given") -> tuple[np.ndarray, str]:
    """uint8 (N, H, W, C) images to compare ONNX Runtime with PyTorch on, and where they came from."""
    c, h, w = clf.input_shape
    if images is not None:
        _check_pixels(images, (h, w, c), "check_images")
        if not len(images):
            raise DataError("check_images is empty; pass at least one image")
        return np.ascontiguousarray(images), source
    if clf.run_dir is not None:
        try:
            ds = clf.dataset()  # what evaluation.predictions.load_run gives: the run's own seeded splits
        except (ImgclsError, OSError):
            ds = None  # the data moved or is gone: random pixels still check the graph
        if ds is not None:
            split = next((s for s in ("test", "val", "train") if s in ds.splits and len(ds.splits[s].images)), None)
            if split is not None:
                return np.ascontiguousarray(ds.splits[split].images[:MAX_CHECK_IMAGES]), f"{split} split"
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (MAX_CHECK_IMAGES, h, w, c), dtype=np.uint8), "random pixels"


def _check_pixels(images, shape_hwc: tuple[int, int, int], what: str) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.shape[1:] != tuple(shape_hwc):
        got = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        h, w, c = shape_hwc
        raise DataError(f"{what} must be a uint8 array (N, {h}, {w}, {c}) of pixels at the model's size; got {got}")


@contextmanager
def _quiet_exporter():
    # The exporters log notes that do not concern the user (missing torchvision ops, deprecations).
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _to_onnx(wrapper: PixelClassifier, input_shape, opset: int | None, exporter: str,
             outputs: tuple[str, ...] = OUTPUT_NAMES):
    """(onnx ModelProto with ``outputs``, exporter used, why dynamo failed or None)."""
    c, h, w = input_shape
    example = torch.randint(0, 256, (2, h, w, c), dtype=torch.uint8)  # batch 2: batch 1 could be specialised
    dynamo_error = None
    if exporter in ("auto", "dynamo"):
        try:
            with _quiet_exporter():
                program = torch.onnx.export(
                    wrapper, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=list(outputs),
                    opset_version=opset, dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, verbose=False,
                )
            return program.model_proto, "dynamo", None
        except Exception as exc:  # any exporter failure: fall back, and say why in the report
            dynamo_error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            if exporter == "dynamo":
                raise ImgclsError(f"the dynamo ONNX exporter failed ({dynamo_error}); try exporter='torchscript'") from exc
    import io

    import onnx

    buffer = io.BytesIO()
    try:
        with _quiet_exporter():
            torch.onnx.export(
                wrapper, (example,), buffer, dynamo=False, input_names=[INPUT_NAME], output_names=list(outputs),
                opset_version=opset, dynamic_axes={INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in outputs}},
            )
    except Exception as exc:
        before = f"dynamo: {dynamo_error}; " if dynamo_error else ""
        raise ImgclsError(f"the model cannot be exported to ONNX ({before}torchscript: {type(exc).__name__}: {exc})") from exc
    return onnx.load_from_string(buffer.getvalue()), "torchscript", dynamo_error


def _opset_of(proto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def onnx_metadata(meta: dict, parameters: int, checkpoint_name: str) -> dict:
    """The ``imgcls_meta`` document of an exported model, from checkpoint metadata."""
    c, h, w = meta["input_shape"]
    norm = {"mean": list(meta["normalize"]["mean"]), "std": list(meta["normalize"]["std"]),
            "formula": "x = (pixels / 255 - mean) / std, per channel, computed inside the graph"}
    temperature = float(meta.get("temperature", 1.0))
    resize = meta.get("resize", "stretch")
    doc = {
        "format_version": META_FORMAT_VERSION,
        "arch": meta["arch"],
        "arch_kwargs": meta.get("arch_kwargs", {}),
        "classes": list(meta["classes"]),
        "input_name": INPUT_NAME,
        "input_shape": [h, w, c],
        "input_dtype": "uint8",
        "layout": "NHWC",
        "normalize": norm,
        "temperature": temperature,
        "resize": resize,
        "tta": meta.get("tta", "none"),
        "outputs": {"logits": "float32 (N, K), before temperature"
                              + ("" if meta.get("tta", "none") == "none" else
                                 f"; averaged over test-time augmented views ({meta['tta']}), inside the graph"),
                    "probabilities": f"float32 (N, K) = {_squash(meta)}(logits / temperature)"},
        "preprocessing": _preprocessing_text(c, h, w, resize, norm, temperature, _squash(meta), meta.get("ood")),
        "parameters": int(parameters),
        "checkpoint": dict({k: v for k, v in meta.items() if k not in _MAPPED_KEYS}, checkpoint_file=checkpoint_name),
    }
    if meta.get("thresholds") is not None:
        doc["thresholds"] = list(meta["thresholds"])
    if is_multilabel(meta):
        doc["task"] = "multilabel"
    if meta.get("ood") is not None:
        doc["outputs"][OOD_OUTPUT] = _score_text(meta)
        doc["ood"] = entry_record(meta["ood"])  # the bank of features is in the graph, not here
    return doc


def _score_text(meta: dict) -> str:
    """What the ``ood_score`` output is, for the metadata."""
    ood = meta["ood"]
    if ood["score"] == "knn":
        how = (f"the cosine similarity of the image's pooled features (of the plain view; signed square roots, unit "
               f"length) to its {ood['k']}th most similar of {len(ood['bank'])} training images' kept in the graph")
    else:
        how = {"msp": f"the largest {_squash(meta)} of the logits (before temperature)",
               "energy": "log-sum-exp of the logits (before temperature)"}[ood["score"]]
    return (f"float32 (N,): the out-of-distribution score {ood['score']}, {how}; an image scoring below "
            f"{ood['threshold']:.6g} (ood.threshold) is none of the classes: unknown")


def _squash(meta: dict) -> str:
    """What turns logits into probabilities: a softmax over classes, or a sigmoid per label (multi-label)."""
    return "sigmoid" if is_multilabel(meta) else "softmax"


def _preprocessing_text(c: int, h: int, w: int, resize: str, norm: dict, temperature: float,
                        squash: str = "softmax", ood: dict | None = None) -> str:
    how = {"stretch": "stretched to", "crop": "centre-cropped to the aspect ratio of, then resized to",
           "pad": "letterboxed (padded) to the aspect ratio of, then resized to"}.get(resize, f"resized ({resize}) to")
    colour = "RGB" if c == 3 else "greyscale (L)"
    return (f"Decode each image as {colour} (transparency composited on white), {how} {h}x{w} (height x width); "
            f"feed the uint8 pixels as '{INPUT_NAME}' of shape (N, {h}, {w}, {c}), NHWC, no scaling. "
            f"The graph computes x = (pixels / 255 - mean) / std per channel with mean {norm['mean']} and "
            f"std {norm['std']}, and returns 'logits' and 'probabilities' = {squash}(logits / {temperature:g})"
            + ("." if ood is None else f", and '{OOD_OUTPUT}', the out-of-distribution score ({ood['score']}): "
                                       f"below {ood['threshold']:.6g} an image is none of the classes."))


def _set_metadata(proto, doc: dict) -> None:
    import onnx

    onnx.helper.set_model_props(proto, {META_KEY: json.dumps(doc), CLASSES_KEY: json.dumps(doc["classes"])})
    proto.doc_string = doc["preprocessing"]
    onnx.checker.check_model(proto)


def _session(model: bytes | str, threads: int | None = None):
    """An ONNX Runtime CPU session; ``threads`` intra-op threads (default: the usable cores, at most 8)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or min(usable_cores(), 8)
    options.inter_op_num_threads = 1  # one sequential graph: a second pool would only contend
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _compare(data: bytes, clf: TorchPredictor, images: np.ndarray, tolerance: float) -> dict:
    """Max abs differences of every output (logits, probabilities, and the out-of-distribution score where the
    model stores one), ONNX Runtime vs PyTorch (:meth:`TorchPredictor.scored_arrays`), at batch sizes 1 and N."""
    session = _session(data)
    names = output_names(clf.meta)
    torch_logits = predict_logits(clf.model, images, clf.meta["normalize"], clf.runtime, clf.batch_size,
                                  clf.meta.get("tta", "none")).numpy()
    torch_proba, torch_scores = clf.scored_arrays(images)
    expected = {"logits": torch_logits, "probabilities": torch_proba, OOD_OUTPUT: torch_scores}
    whole = session.run(list(names), {INPUT_NAME: images})
    singles = [session.run(list(names), {INPUT_NAME: images[i:i + 1]}) for i in range(len(images))]
    diffs = {}
    for k, name in enumerate(names):
        one_by_one = np.concatenate([s[k] for s in singles])
        diffs[name] = float(max(np.abs(whole[k] - expected[name]).max(), np.abs(one_by_one - expected[name]).max()))
    if torch_scores is not None:
        diffs["ood_score_tolerance"] = score_tolerance(tolerance, torch_scores)
    return diffs


def _int8_images(clf: TorchPredictor, data) -> dict:
    """The images an int8 export needs: {"calibration": uint8 (n, H, W, C), "calibration_split": name,
    "calibration_source": text, "check": uint8 (N, H, W, C), "check_labels": (N,) or 0/1 (N, L), "check_split": name}."""
    if clf.run_dir is None and data is None:
        raise DataError("an int8 export calibrates on the run's train images and checks itself on its test split: "
                        "give the run folder rather than a lone checkpoint file, or the run's data with data= (--data)")
    try:
        ds = clf.dataset(data)
    except (ImgclsError, OSError) as exc:
        where = data if data is not None else _data_of_run(clf.run_dir)
        raise DataError(f"an int8 export calibrates on the run's own images and checks itself on its test split, but "
                        f"the run's data {where} cannot be read ({exc}). Put it back there, or give the same data "
                        f"from where it is now with --data (Python: data=)") from None
    have = [s for s in ("train", "val", "test") if s in ds.splits and len(ds.splits[s].images)]
    check = next((s for s in ("test", "val") if s in have), None)
    calibrate = next((s for s in ("train", "val") if s in have and s != check), None)
    if check is None or calibrate is None:
        raise DataError(f"an int8 export needs a split to calibrate on (train) and another to check on (test or "
                        f"val); the run's data {data or _data_of_run(clf.run_dir)} has {', '.join(have) or 'none'}")
    pool = ds.splits[calibrate].images
    n = min(CALIBRATION_IMAGES, len(pool))
    pick = np.sort(np.random.default_rng(CALIBRATION_SEED).choice(len(pool), n, replace=False))
    return {"calibration": np.ascontiguousarray(pool[pick]),
            "calibration_source": f"{calibrate} split: {n:,} of its {len(pool):,} images, a seeded sample (seed "
                                  f"{CALIBRATION_SEED}); the {check} split is kept for the check",
            "calibration_split": calibrate,
            "check": np.ascontiguousarray(ds.splits[check].images), "check_labels": ds.splits[check].labels,
            "check_split": check}


def _data_of_run(run_dir: Path) -> str:
    """What the run's config.yaml names as its data (for messages)."""
    try:
        return str(read_config_values(run_dir / rundir.CONFIG).get("data", {}).get("dataset"))
    except (ImgclsError, OSError, AttributeError):
        return f"(named in {run_dir / rundir.CONFIG})"


def _quantized(proto, clf: TorchPredictor, images: dict, method: str, max_drop: float, fp32: dict) -> tuple[bytes, dict]:
    """The int8 graph with its metadata and its report; AccuracyDropError when it falls more than ``max_drop``."""
    import onnx

    fp32_bytes = proto.SerializeToString()
    tried = []
    for reduce_range in (False, True):  # 7-bit weights only where 8 bits lose too much (see quantize_graph)
        int8_bytes, info = quantize_graph(fp32_bytes, images["calibration"], method, INPUT_NAME, (OOD_OUTPUT,),
                                          reduce_range=reduce_range)
        check = _check_int8(fp32_bytes, int8_bytes, clf, images, max_drop)
        tried.append({"reduce_range": reduce_range, "drop": check["drop"], "passed": check["passed"]})
        if check["passed"]:
            break
    info["calibration_split"], info["calibration_source"] = images["calibration_split"], images["calibration_source"]
    if len(tried) > 1:
        info["tried"] = tried
    int8_proto = onnx.load_from_string(int8_bytes)
    store_bank(int8_proto, _knn_bank(clf.ood))  # ONNX Runtime's optimiser folded its Cast before quantizing
    doc = onnx_metadata(clf.meta, _parameters(clf), Path(fp32["checkpoint"]).name)
    doc["quantization"] = {k: v for k, v in info.items() if k != "seconds"}
    _set_metadata(int8_proto, doc)
    data = int8_proto.SerializeToString()
    report = {
        "path": fp32["path"],
        "format": "onnx-int8",
        "bytes": len(data),
        "fp32_bytes": fp32["bytes"],
        "times_smaller": round(fp32["bytes"] / len(data), 2),
        "quantization": info,
        "check": check,
        "fp32_check": {k: fp32[k] for k in ("max_abs_diff_probabilities", "max_abs_diff_logits", "tolerance",
                                              "max_abs_diff_ood_score", "ood_score_tolerance", "images_checked",
                                              "images_source", "batch_sizes_checked") if k in fp32},
        "exporter": fp32["exporter"],
        "opset": fp32["opset"],
        "checkpoint": fp32["checkpoint"],
    }
    if not check["passed"]:
        others = ", ".join(m for m in CALIBRATIONS if m != method)
        raise AccuracyDropError(
            f"the int8 model of {fp32['checkpoint']} loses too much: with 8-bit weights a drop of "
            f"{tried[0]['drop'] * 100:.2f} points, with 7-bit weights {check_summary(check)}; the largest accepted "
            f"drop is {max_drop * 100:g} points (max_drop {max_drop:g}). {fp32['path']} was not written. Try "
            f"another calibration ({others}), or accept a larger drop (--max-drop)")
    return data, report


def _check_int8(fp32: bytes, int8: bytes, clf: TorchPredictor, images: dict, max_drop: float) -> dict:
    """fp32 and int8 graphs on the whole check split: agreement, the accuracy (or mAP) of each, and the verdict;
    with a stored out-of-distribution score, the share of images its threshold rejects under each."""
    names = output_names(clf.meta)[1:]  # probabilities, and the score where the model stores one
    (p32, *s32), (p8, *s8) = (run_batches(_session(graph), images["check"], names, INT8_BATCH)
                              for graph in (fp32, int8))
    thresholds = clf.meta.get("thresholds") if clf.multilabel else None
    ood = (s32[0], s8[0], clf.ood["threshold"]) if clf.ood is not None else None
    check = {"split": images["check_split"],
             **int8_figures(p32, p8, images["check_labels"], clf.multilabel, thresholds, max_drop, ood)}
    if ood is not None:
        check["ood"] = {"score": clf.ood["score"], **check["ood"]}
    return check


def int8_figures(p32: np.ndarray, p8: np.ndarray, labels: np.ndarray, multilabel: bool = False, thresholds=None,
                 max_drop: float = MAX_DROP, ood: tuple | None = None) -> dict:
    """How an int8 model compares with its fp32 model on labelled images, and whether it passes.

    Args:
        p32, p8: probabilities (N, K) of the fp32 and the int8 model.
        labels: (N,) class indices, or 0/1 (N, K) label sets for a multi-label model.
        multilabel: compare mAP and predicted label sets (each label's probability >= its threshold)
            rather than accuracy and top-1 classes.
        thresholds: a multi-label model's K thresholds (None: 0.5 each).
        max_drop: the largest accepted fall of the metric from fp32 to int8.
        ood: (fp32 scores (N,), int8 scores (N,), threshold) of a stored out-of-distribution score, or None.

    Returns:
        {"images", "metric", "<metric>_fp32", "<metric>_int8", "drop", "max_drop", "passed", agreement
        ("top1_agreement", or "exact_set_agreement" with both exact-set accuracies), mean and max abs
        differences of probabilities}.  The metric is "accuracy", "map", or "exact_set_accuracy" for a
        multi-label split where no label has a positive (mAP is undefined there).  With ``ood``, also
        "ood": {"threshold", "rejected_fp32", "rejected_int8" (the shares of images below the threshold),
        "rejected_by_one_only" (the share rejected under one and not the other), mean and max abs differences
        of the scores}: reported only, not part of "passed" (the threshold was fitted on fp32 features).
    """
    p32, p8 = np.asarray(p32, dtype=np.float64), np.asarray(p8, dtype=np.float64)
    figures = {"images": len(p32), "mean_abs_diff_probabilities": float(np.abs(p8 - p32).mean()),
               "max_abs_diff_probabilities": float(np.abs(p8 - p32).max())}
    if multilabel:
        y = np.asarray(labels) > 0
        t = np.full(p32.shape[1], 0.5) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
        s32, s8 = p32 >= t, p8 >= t
        figures.update(metric="map", map_fp32=mean_average_precision(y, p32), map_int8=mean_average_precision(y, p8),
                       exact_set_agreement=float((s32 == s8).all(1).mean()),
                       exact_set_accuracy_fp32=float((s32 == y).all(1).mean()),
                       exact_set_accuracy_int8=float((s8 == y).all(1).mean()))
        if figures["map_fp32"] is None:
            figures["metric"] = "exact_set_accuracy"
    else:
        top32, top8 = p32.argmax(1), p8.argmax(1)
        figures.update(metric="accuracy", top1_agreement=float((top32 == top8).mean()),
                       accuracy_fp32=float((top32 == labels).mean()), accuracy_int8=float((top8 == labels).mean()))
    metric = figures["metric"]
    figures["drop"] = figures[f"{metric}_fp32"] - figures[f"{metric}_int8"]
    figures["max_drop"] = max_drop
    figures["passed"] = bool(figures["drop"] <= max_drop + 1e-12)  # 1e-12: a drop of exactly max_drop passes
    if ood is not None:
        figures["ood"] = _rejection_figures(*ood)
    return figures


def _rejection_figures(s32: np.ndarray, s8: np.ndarray, threshold: float) -> dict:
    s32, s8 = np.asarray(s32, dtype=np.float64), np.asarray(s8, dtype=np.float64)
    r32, r8 = s32 < threshold, s8 < threshold
    return {"threshold": float(threshold), "threshold_fitted_on": "fp32 features (the val split)",
            "rejected_fp32": float(r32.mean()), "rejected_int8": float(r8.mean()),
            "rejected_by_one_only": float((r32 != r8).mean()),
            "mean_abs_diff_ood_score": float(np.abs(s8 - s32).mean()),
            "max_abs_diff_ood_score": float(np.abs(s8 - s32).max())}


def check_summary(check: dict) -> str:
    """One line of an int8 check's figures, for the CLI and for messages."""
    metric = {"accuracy": "accuracy", "map": "mAP", "exact_set_accuracy": "exact-set accuracy"}[check["metric"]]
    agreement = (f"top-1 agreement with fp32 {check['top1_agreement']:.1%}" if "top1_agreement" in check
                 else f"exact-set agreement with fp32 {check['exact_set_agreement']:.1%}")
    key = check["metric"]
    line = (f"on the {check['split']} split ({check['images']:,} images) {metric} {check[key + '_int8']:.2%} "
            f"against {check[key + '_fp32']:.2%} in fp32 (a drop of {check['drop'] * 100:.2f} points), {agreement}")
    if "ood" in check:
        ood = check["ood"]
        line += (f"; the out-of-distribution threshold rejects {ood['rejected_int8']:.1%} of its images in int8 "
                 f"against {ood['rejected_fp32']:.1%} in fp32 ({ood['rejected_by_one_only']:.1%} by one only)")
    return line


def run_batches(session, images: np.ndarray, names, batch: int) -> list[np.ndarray]:
    """The outputs ``names`` of an ONNX Runtime session for uint8 (N, H, W, C) images (N >= 1), ``batch`` images
    per call, each float64 with the N images first."""
    runs = [session.run(list(names), {INPUT_NAME: np.ascontiguousarray(images[s:s + batch])})
            for s in range(0, len(images), batch)]
    return [np.concatenate([r[k] for r in runs]).astype(np.float64) for k in range(len(names))]


def meta_from_onnx(doc: dict, path: Path) -> dict:
    """Checkpoint-style metadata (as :class:`imgcls.predictor.TorchPredictor` has it) from an ``imgcls_meta`` document."""
    version = doc.get("format_version")
    if not isinstance(version, int) or version > META_FORMAT_VERSION:
        raise CheckpointError(f"{path} has imgcls_meta version {version!r}; this imgcls reads versions up to "
                              f"{META_FORMAT_VERSION}: upgrade imgcls to load it")
    h, w, c = doc["input_shape"]
    meta = dict(doc.get("checkpoint", {}))
    meta.update(arch=doc["arch"], arch_kwargs=doc.get("arch_kwargs", {}), classes=list(doc["classes"]),
                input_shape=[c, h, w], normalize={"mean": doc["normalize"]["mean"], "std": doc["normalize"]["std"]},
                temperature=float(doc.get("temperature", 1.0)), resize=doc.get("resize", "stretch"),
                tta=doc.get("tta", "none"), parameters=doc.get("parameters"))  # the graph applies the TTA itself
    if doc.get("thresholds") is not None:
        meta["thresholds"] = list(doc["thresholds"])
    if doc.get("task") is not None:
        meta["task"] = doc["task"]
    if doc.get("quantization") is not None:
        meta["quantization"] = doc["quantization"]
    if doc.get("ood") is not None:
        meta["ood"] = _ood_of(doc["ood"], path)
    return meta


def _ood_of(entry, path: Path) -> dict:
    """The ``ood`` entry of an ``imgcls_meta`` document (without the bank: the graph holds it), checked."""
    problem = entry_problem(entry, with_bank=False)
    if problem:
        raise CheckpointError(f"{path} is damaged or was not exported by imgcls: the 'ood' entry of its {META_KEY} "
                              f"{problem}; got {entry!r:.200}")
    return dict(entry)


class OnnxClassifier(Predictor):
    """An exported model run by ONNX Runtime on the CPU, with the prediction surface of
    :class:`imgcls.predictor.TorchPredictor`: ``classes``, ``input_shape`` (C, H, W), ``meta``, ``ood``,
    ``load_inputs``, ``proba_of_arrays``, ``scored_arrays``, ``predict_proba`` and ``predict`` (with
    ``unknown=True`` too: the graph computes the stored out-of-distribution score).
    """

    def __init__(self, path: str | Path, threads: int | None = None, batch_size: int = 256):
        self.path = Path(path)
        if not self.path.is_file():
            int8 = " --int8" if self.path.name == Path(rundir.EXPORT_INT8).name else ""
            raise CheckpointError(f"ONNX model {self.path} does not exist; write it with: imgcls export RUN "
                                  f"--format onnx{int8}")
        try:
            self.session = _session(str(self.path), threads)
        except Exception as exc:  # onnxruntime raises its own error types for unreadable files
            raise CheckpointError(f"{self.path} cannot be loaded by ONNX Runtime ({exc})") from exc
        props = self.session.get_modelmeta().custom_metadata_map
        if META_KEY not in props:
            raise CheckpointError(f"{self.path} has no {META_KEY} metadata; it was not exported by imgcls "
                                  "(imgcls export RUN --format onnx)")
        self.meta = meta_from_onnx(json.loads(props[META_KEY]), self.path)
        outputs = [o.name for o in self.session.get_outputs()]
        if self.ood is not None and OOD_OUTPUT not in outputs:
            raise CheckpointError(f"{self.path} is damaged or was not exported by imgcls: its {META_KEY} stores an "
                                  f"out-of-distribution score but the graph has no '{OOD_OUTPUT}' output (it has "
                                  f"{', '.join(outputs)}); export the run again")
        self.batch_size = batch_size

    def proba_of_arrays(self, images: np.ndarray) -> np.ndarray:
        """Probabilities (N, num_classes) float64 for uint8 (N, H, W, C) images already at the model's size."""
        return self._outputs(images, OUTPUT_NAMES[1])[0]

    def scored_arrays(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities (N, num_classes), the graph's out-of-distribution scores (N,) or None when the model
        stores no score), float64, for uint8 (N, H, W, C) images already at the model's size."""
        if self.ood is None:
            return self.proba_of_arrays(images), None
        proba, scores = self._outputs(images, OUTPUT_NAMES[1], OOD_OUTPUT)  # one pass of the graph for both
        return proba, scores

    def _outputs(self, images: np.ndarray, *names: str) -> list[np.ndarray]:
        c, h, w = self.input_shape
        _check_pixels(images, (h, w, c), "images")
        if not len(images):
            return [np.zeros((0, len(self.classes)) if name == OUTPUT_NAMES[1] else (0,)) for name in names]
        return run_batches(self.session, images, names, self.batch_size)

    def __repr__(self) -> str:
        c, h, w = self.input_shape
        return f"OnnxClassifier({self.meta['arch']}, {len(self.classes)} classes, input {c}x{h}x{w}, {self.path})"


def load_onnx(path: str | Path, threads: int | None = None, batch_size: int = 256, int8: bool = False) -> OnnxClassifier:
    """Load an exported model: a ``.onnx`` file, or a run folder (its ``export/model.onnx``; with ``int8``, its
    ``export/model-int8.onnx``)."""
    path = Path(path)
    if path.is_dir():
        path = _default_out(path, int8)
    return OnnxClassifier(path, threads=threads, batch_size=batch_size)
