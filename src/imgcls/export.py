"""Export a trained model to ONNX, and run exported models with ONNX Runtime.

The exported graph is self-contained: its input ``images`` is raw uint8 pixels
(N, H, W, C), as images are decoded; the graph normalises them exactly as
:func:`imgcls.inference.to_input` does, ``x = (pixels / 255 - mean) / std`` per
channel, and returns ``logits`` (N, K) and ``probabilities`` (N, K) =
softmax(logits / temperature), or for a multi-label model an independent
sigmoid(logits / temperature) per label.  The batch dimension is dynamic.  What a caller
needs to prepare images (classes, size, resize mode, normalisation,
temperature, thresholds) is stored in the model's ``metadata_props``: JSON under
``imgcls_meta`` and a JSON list under ``class_names``.

Every export is verified before it is written: ONNX Runtime and PyTorch are run
on real images (the run's own test split) at batch size 1 and N, and the file is
written only when their probabilities agree within the tolerance.

    info = export_onnx("runs/digits")      # runs/digits/export/model.onnx and export.json
    clf = load_onnx("runs/digits")         # same surface as imgcls.load(...) for prediction
    clf.predict(["seven.png"])
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
from imgcls.errors import CheckpointError, ConfigError, DataError, ImgclsError
from imgcls.inference import normalization_tensors, predict_logits, to_input, tta_logits
from imgcls.io import write_atomic, write_json
from imgcls.predictor import Predictor, TorchPredictor, load
from imgcls.startup import usable_cores

FORMATS = ("onnx",)
EXPORTERS = ("auto", "dynamo", "torchscript")
"""``auto`` tries the dynamo exporter and falls back to the TorchScript one if it fails."""
META_KEY = "imgcls_meta"
CLASSES_KEY = "class_names"
META_FORMAT_VERSION = 1
INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "probabilities")
MAX_CHECK_IMAGES = 64
# Checkpoint metadata stored at the top level of imgcls_meta (in its own layout); the rest is kept under "checkpoint".
_MAPPED_KEYS = ("arch", "arch_kwargs", "classes", "input_shape", "normalize", "temperature", "thresholds", "resize",
                "tta", "task", "format_version", "train_state", "ood")


class PixelClassifier(nn.Module):
    """A model with its preprocessing: uint8 (N, H, W, C) -> (logits, probabilities), each (N, K) float32."""

    def __init__(self, model: nn.Module, normalize: dict, temperature: float = 1.0, tta: str = "none",
                 multilabel: bool = False):
        super().__init__()
        self.model = model
        self.tta = tta
        self.multilabel = multilabel
        mean, std = normalization_tensors(normalize, torch.device("cpu"))
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.register_buffer("temperature", torch.tensor(float(temperature), dtype=torch.float32))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = tta_logits(self.model, to_input(images, self.mean, self.std, channels_last=False), self.tta)
        if self.multilabel:
            return logits, torch.sigmoid(logits / self.temperature)
        return logits, F.softmax(logits / self.temperature, dim=1)


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
) -> dict:
    """Export a trained model as a self-contained ONNX file, verified against PyTorch.

    Args:
        run_or_checkpoint: a run folder (its final checkpoint, as :func:`imgcls.load`
            picks it) or a checkpoint file.
        out: the ``.onnx`` file to write; default ``export/model.onnx`` in the run
            folder (or in the checkpoint file's folder).
        which: ``best`` or ``last`` to override the run's final checkpoint.
        opset: ONNX opset; default: the exporter's own.
        check_images: uint8 (N, H, W, C) images to verify on; default: up to 64
            images of the run's test split (random images when that data cannot
            be read, or for a checkpoint file).
        tolerance: the largest accepted absolute difference of probabilities
            between ONNX Runtime and PyTorch.
        exporter: one of :data:`EXPORTERS`.

    Returns:
        {"path", "max_abs_diff_probabilities", "max_abs_diff_logits", "tolerance",
        "exporter", "opset", "images_checked", "images_source", "seconds", ...},
        also written as ``export.json`` beside the model.

    Raises:
        ImgclsError: when ONNX Runtime and PyTorch disagree by more than
            ``tolerance``; nothing is written then (an earlier file at ``out`` is
            left as it was).
    """
    started = time.perf_counter()
    if not tolerance >= 0:  # also refuses NaN
        raise ConfigError(f"tolerance must be a number >= 0, got {tolerance!r}")
    if exporter not in EXPORTERS:
        raise ConfigError(f"unknown exporter {exporter!r}; choose one of: {', '.join(EXPORTERS)}")
    source = Path(run_or_checkpoint)
    checkpoint = find_checkpoint(source, which)
    which = checkpoint.stem if source.is_dir() else which
    # fp32 on CPU: the reference the exported graph is checked against, and what the graph is traced from.
    clf = load(source, which=which, device="cpu")
    out = Path(out) if out is not None else _default_out(source)
    images, images_source = _images_to_check(clf, check_images)

    wrapper = PixelClassifier(clf.model, clf.meta["normalize"], clf.meta.get("temperature", 1.0),
                              clf.meta.get("tta", "none"), clf.multilabel).eval()
    proto, used, fallback = _to_onnx(wrapper, clf.input_shape, opset, exporter)
    parameters = sum(p.numel() for p in clf.model.parameters())
    _set_metadata(proto, onnx_metadata(clf.meta, parameters, checkpoint.name))
    data = proto.SerializeToString()

    diffs = _compare(data, clf, images)
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
    if fallback:
        report["dynamo_error"] = fallback
    if not diffs["probabilities"] <= tolerance:  # NaN fails too
        raise ImgclsError(
            f"the ONNX export of {checkpoint} does not match PyTorch: max abs difference of probabilities "
            f"{diffs['probabilities']:.3g} > tolerance {tolerance:g} over {len(images)} images ({images_source}; "
            f"{used} exporter, opset {report['opset']}); {out} was not written. Try another opset or exporter, "
            f"or a larger tolerance if the difference is acceptable"
        )
    write_atomic(out, data)
    report["seconds"] = round(time.perf_counter() - started, 3)
    write_json(out.parent / Path(rundir.EXPORT_REPORT).name, report)  # beside the model, wherever it goes
    return report


def _default_out(source: Path) -> Path:
    folder = source if source.is_dir() else source.parent
    return folder / rundir.EXPORT


def _images_to_check(clf: TorchPredictor, images: np.ndarray | None) -> tuple[np.ndarray, str]:
    """uint8 (N, H, W, C) images to compare ONNX Runtime with PyTorch on, and where they came from."""
    c, h, w = clf.input_shape
    if images is not None:
        _check_pixels(images, (h, w, c), "check_images")
        if not len(images):
            raise DataError("check_images is empty; pass at least one image")
        return np.ascontiguousarray(images), "given"
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


def _to_onnx(wrapper: PixelClassifier, input_shape, opset: int | None, exporter: str):
    """(onnx ModelProto, exporter used, why dynamo failed or None)."""
    c, h, w = input_shape
    example = torch.randint(0, 256, (2, h, w, c), dtype=torch.uint8)  # batch 2: batch 1 could be specialised
    dynamo_error = None
    if exporter in ("auto", "dynamo"):
        try:
            with _quiet_exporter():
                program = torch.onnx.export(
                    wrapper, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
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
                wrapper, (example,), buffer, dynamo=False, input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                opset_version=opset, dynamic_axes={INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in OUTPUT_NAMES}},
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
        "preprocessing": _preprocessing_text(c, h, w, resize, norm, temperature, _squash(meta)),
        "parameters": int(parameters),
        "checkpoint": dict({k: v for k, v in meta.items() if k not in _MAPPED_KEYS}, checkpoint_file=checkpoint_name),
    }
    if meta.get("thresholds") is not None:
        doc["thresholds"] = list(meta["thresholds"])
    if is_multilabel(meta):
        doc["task"] = "multilabel"
    return doc


def _squash(meta: dict) -> str:
    """What turns logits into probabilities: a softmax over classes, or a sigmoid per label (multi-label)."""
    return "sigmoid" if is_multilabel(meta) else "softmax"


def _preprocessing_text(c: int, h: int, w: int, resize: str, norm: dict, temperature: float,
                        squash: str = "softmax") -> str:
    how = {"stretch": "stretched to", "crop": "centre-cropped to the aspect ratio of, then resized to",
           "pad": "letterboxed (padded) to the aspect ratio of, then resized to"}.get(resize, f"resized ({resize}) to")
    colour = "RGB" if c == 3 else "greyscale (L)"
    return (f"Decode each image as {colour} (transparency composited on white), {how} {h}x{w} (height x width); "
            f"feed the uint8 pixels as '{INPUT_NAME}' of shape (N, {h}, {w}, {c}), NHWC, no scaling. "
            f"The graph computes x = (pixels / 255 - mean) / std per channel with mean {norm['mean']} and "
            f"std {norm['std']}, and returns 'logits' and 'probabilities' = {squash}(logits / {temperature:g}).")


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


def _compare(data: bytes, clf: TorchPredictor, images: np.ndarray) -> dict:
    """Max abs differences of logits and probabilities, ONNX Runtime vs PyTorch, at batch sizes 1 and N."""
    session = _session(data)
    torch_logits = predict_logits(clf.model, images, clf.meta["normalize"], clf.runtime, clf.batch_size,
                                  clf.meta.get("tta", "none")).numpy()
    torch_proba = clf.proba_of_arrays(images)
    whole = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
    singles = [session.run(list(OUTPUT_NAMES), {INPUT_NAME: images[i:i + 1]}) for i in range(len(images))]
    diffs = {}
    for k, name in enumerate(OUTPUT_NAMES):
        reference = torch_logits if name == "logits" else torch_proba
        one_by_one = np.concatenate([s[k] for s in singles])
        diffs[name] = float(max(np.abs(whole[k] - reference).max(), np.abs(one_by_one - reference).max()))
    return diffs


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
    return meta


class OnnxClassifier(Predictor):
    """An exported model run by ONNX Runtime on the CPU, with the prediction surface of
    :class:`imgcls.predictor.TorchPredictor`: ``classes``, ``input_shape`` (C, H, W), ``meta``,
    ``load_inputs``, ``proba_of_arrays``, ``predict_proba`` and ``predict``.
    """

    def __init__(self, path: str | Path, threads: int | None = None, batch_size: int = 256):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"ONNX model {self.path} does not exist; write it with: imgcls export RUN --format onnx")
        try:
            self.session = _session(str(self.path), threads)
        except Exception as exc:  # onnxruntime raises its own error types for unreadable files
            raise CheckpointError(f"{self.path} cannot be loaded by ONNX Runtime ({exc})") from exc
        props = self.session.get_modelmeta().custom_metadata_map
        if META_KEY not in props:
            raise CheckpointError(f"{self.path} has no {META_KEY} metadata; it was not exported by imgcls "
                                  "(imgcls export RUN --format onnx)")
        self.meta = meta_from_onnx(json.loads(props[META_KEY]), self.path)
        self.batch_size = batch_size

    def proba_of_arrays(self, images: np.ndarray) -> np.ndarray:
        """Probabilities (N, num_classes) float64 for uint8 (N, H, W, C) images already at the model's size."""
        c, h, w = self.input_shape
        _check_pixels(images, (h, w, c), "images")
        out = [self.session.run([OUTPUT_NAMES[1]], {INPUT_NAME: np.ascontiguousarray(images[s:s + self.batch_size])})[0]
               for s in range(0, len(images), self.batch_size)]
        if not out:
            return np.zeros((0, len(self.classes)))
        return np.concatenate(out).astype(np.float64)

    def __repr__(self) -> str:
        c, h, w = self.input_shape
        return f"OnnxClassifier({self.meta['arch']}, {len(self.classes)} classes, input {c}x{h}x{w}, {self.path})"


def load_onnx(path: str | Path, threads: int | None = None, batch_size: int = 256) -> OnnxClassifier:
    """Load an exported model: a ``.onnx`` file, or a run folder (its ``export/model.onnx``)."""
    path = Path(path)
    if path.is_dir():
        path = _default_out(path)
    return OnnxClassifier(path, threads=threads, batch_size=batch_size)
