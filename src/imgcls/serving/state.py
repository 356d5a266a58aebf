"""What one app holds: the loaded model, its micro-batcher, the explanation thread, the metrics, the model card.

:class:`ServingState` is made by :func:`imgcls.serving.app.create_app` and kept in ``app.state.serving``;
nothing here is global, so two apps in one process share nothing, not even their Prometheus registry
(:class:`Metrics`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from imgcls import rundir
from imgcls.checkpoint import find_checkpoint
from imgcls.errors import ConfigError, ImgclsError
from imgcls.explain.explain import explain_arrays
from imgcls.predictor import load
from imgcls.serving.batching import MicroBatcher
from imgcls.serving.errors import ServingError

log = logging.getLogger("imgcls.serving")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # seconds
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # images per model call
EXPLAIN_QUEUE = 8  # explanations admitted at once (one runs, the rest wait); more are answered 503 busy
ONNX_FILES = {"onnx": rundir.EXPORT, "onnx-int8": rundir.EXPORT_INT8}  # runtime -> the run folder's file it serves


class Metrics:
    """Prometheus metrics in a registry of their own (one per app, no global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("request_latency_seconds", "time to answer a request, by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("batch_size", "images per model call (micro-batching)",
                                    buckets=BATCH_BUCKETS, registry=self.registry)

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def text(self) -> bytes:
        return generate_latest(self.registry)


class ServingState:
    """What one app holds: options, the loaded model, its batcher, metrics and the model card."""

    def __init__(self, run_path: Path, runtime: str, max_batch: int, max_wait_ms: float, max_bytes: int,
                 max_pixels: int, max_files: int):
        self.run_path, self.runtime = run_path, runtime
        self.max_bytes, self.max_pixels, self.max_files = max_bytes, max_pixels, max_files
        self.name = run_path.stem if run_path.is_file() else run_path.name
        # The run's own records are read now: a damaged one refuses the app before it starts (CheckpointError
        # naming the file), as `imgcls report` refuses it; a missing one leaves its figures out of the model card.
        self.run_info = rundir.read_doc(run_path / rundir.RUN, "restore it, or train the run again")
        self.test_metrics = _test_metrics(run_path, self.run_info)
        self.metrics = Metrics()
        self.batcher = MicroBatcher(self._predict_locked, max_batch, max_wait_ms,
                                    on_batch=self.metrics.batch_size.observe)
        self.clf = None  # imgcls.predictor.Classifier or imgcls.export.OnnxClassifier, once loaded
        self.card: dict | None = None
        self.ready = False
        # Hooks (Grad-CAM) and train/eval switches make one torch model unsafe to use from two
        # threads at once: predictions and explanations of the same model take turns.
        self.model_lock = threading.Lock()
        # Explanations (an occlusion map is hundreds of forward passes) run on a model of their own, one at a time
        # in a thread of their own, at most EXPLAIN_QUEUE admitted at once: predictions never wait for them.
        self._explainer = None  # the torch Classifier used for explanations
        self._explainer_lock = threading.Lock()
        self.explain_pool = ThreadPoolExecutor(1, thread_name_prefix="imgcls-explain")
        self.explaining = 0  # explanations admitted: running or waiting

    def preload(self) -> None:
        """Load the model now, so that a model that cannot be served fails with its own error before the server
        starts (``serve`` calls it; the app's start-up then keeps what is loaded)."""
        self.clf = self._load()

    async def start(self) -> None:
        if self.clf is None:
            self.clf = await asyncio.to_thread(self._load)
        self.card = await asyncio.to_thread(self._model_card)
        await self.batcher.start()
        self.ready = True
        c, h, w = self.clf.input_shape
        log.info("serving %s (%s runtime, %d classes, input %dx%dx%d)", self.name, self.runtime,
                 len(self.clf.classes), c, h, w)

    async def stop(self) -> None:
        self.ready = False
        await self.batcher.stop()
        self.explain_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def saturated(self) -> bool:
        """Every explanation slot is taken: another would be refused (503) until one ends."""
        return self.explaining >= EXPLAIN_QUEUE

    async def explain(self, image: np.ndarray, name: str, method: str):
        """Explain ``image`` in the explanation thread; 503 when EXPLAIN_QUEUE explanations are admitted already."""
        if self.saturated:
            raise ServingError(503, "busy", f"{self.explaining} explanations are running or waiting, the most this "
                               f"server takes at once; retry in a few seconds", headers={"Retry-After": "5"})
        self.explaining += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.explain_pool, explain_image, self, image,
                                                                    name, method)
        finally:
            self.explaining -= 1

    def _load(self):
        if self.runtime == "torch":
            return load(self.run_path, device="cpu")
        onnx_file = self.run_path / ONNX_FILES[self.runtime]
        if not onnx_file.is_file():
            how, instead = ((f"imgcls export {self.run_path} --int8", "onnx or torch") if self.runtime == "onnx-int8"
                            else (f"imgcls export {self.run_path} --format onnx", "torch"))
            raise ConfigError(f"{onnx_file} does not exist: the {self.runtime} runtime serves an exported model; "
                              f"run `{how}` first, or serve with runtime {instead}")
        from imgcls.export import load_onnx  # onnxruntime: on use

        return load_onnx(onnx_file)

    def _predict_locked(self, images: np.ndarray) -> np.ndarray:
        """Probabilities (n, K), and with a stored out-of-distribution score that score as one more column (the
        batcher slices rows: see :func:`split_scores`)."""
        with self.model_lock:
            proba, scores = self.clf.scored_arrays(images)
        return proba if scores is None else np.column_stack([proba, scores])

    def split_scores(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities, out-of-distribution scores or None) of rows of :meth:`_predict_locked`."""
        k = len(self.clf.classes)
        return (rows[:, :k], rows[:, k]) if rows.shape[1] > k else (rows, None)

    def explainer(self):
        """The torch Classifier that explains: the run's checkpoint, loaded once beside the served model (a model
        of its own, so that an explanation's hooks and its minutes of forward passes never hold up predictions)."""
        with self._explainer_lock:
            if self._explainer is None:
                try:
                    self._explainer = load(self.run_path, device="cpu")
                except ImgclsError as exc:
                    raise ServingError(501, "explain_unavailable",
                                       f"explanations need the torch checkpoint of the run, which cannot be loaded: "
                                       f"{exc}") from None
        return self._explainer, self._explainer_lock

    def _model_card(self) -> dict:
        meta = self.clf.meta
        parameters = self.run_info.get("parameters")
        if parameters is None and self.runtime == "torch":
            parameters = sum(p.numel() for p in self.clf.model.parameters())
        return {
            "name": self.name,
            "arch": str(meta.get("arch", "unknown")),
            "classes": [str(c) for c in self.clf.classes],
            "input_shape": [int(v) for v in self.clf.input_shape],
            "test_metrics": self.test_metrics,
            "trained": meta.get("created") or self._checkpoint_time(),
            "temperature": float(meta.get("temperature", 1.0) or 1.0),
            "has_thresholds": class_thresholds(meta, len(self.clf.classes)) is not None,
            "task": "multilabel" if self.clf.multilabel else "single",
            "runtime": self.runtime,
            "parameters": None if parameters is None else int(parameters),
            "unknown": _unknown_card(self.clf.ood),
        }

    def _checkpoint_time(self) -> str | None:
        try:
            path = find_checkpoint(self.run_path)
        except ImgclsError:
            return None
        return datetime.fromtimestamp(path.stat().st_mtime).isoformat(timespec="seconds")


def _test_metrics(run_path: Path, run_info: dict) -> dict:
    """accuracy, macro_f1 and other scalars of the run's test evaluation (eval_test.json, else run.json)."""
    ev = rundir.read_doc(run_path / f"{rundir.eval_stem('test')}.json",
                         f"`imgcls evaluate {run_path} --split test` writes it again")
    metrics = {"accuracy": ev.get("accuracy", run_info.get("test_accuracy")),
               "macro_f1": (ev.get("macro_avg") or {}).get("f1", run_info.get("test_macro_f1"))}
    if (ev.get("weighted_avg") or {}).get("f1") is not None:
        metrics["weighted_f1"] = ev["weighted_avg"]["f1"]
    for key in ("top_k_accuracy", "top_k", "loss", "n", "map", "micro_f1", "subset_accuracy", "hamming_loss"):
        if isinstance(ev.get(key), (int, float)):
            metrics[key] = ev[key]
    return metrics


def class_thresholds(meta: dict, num_classes: int) -> np.ndarray | None:
    """The per-class thresholds stored in a checkpoint's ``meta`` (float64 (K,)); None without one for each class."""
    t = meta.get("thresholds")
    if t is None or len(t) != num_classes:
        return None
    return np.asarray(t, dtype=np.float64)


def explain_image(state: ServingState, image: np.ndarray, name: str, method: str):
    """An Explanation of one uint8 (H, W, C) image by the torch model (runs in a worker thread)."""
    clf, lock = state.explainer()
    with lock:
        return explain_arrays(clf.model, clf.meta, image[None], method=method, device=None, names=[name])


def _unknown_card(ood: dict | None) -> dict | None:
    """The model card's view of a stored out-of-distribution score (what answers "unknown"), or None."""
    if ood is None:
        return None
    measured = (ood.get("measured") or {}).get(ood["score"]) or {}
    return {"score": ood["score"], "threshold": float(ood["threshold"]), "frr_target": ood.get("frr_target"),
            "auroc": measured.get("auroc"), "against": ood.get("against")}
