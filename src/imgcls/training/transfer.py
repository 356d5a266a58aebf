"""Transfer learning from a pretrained backbone, fast on a CPU: the parts that see only tensors.

Stage 1 of a pretrained run (``head_first``) trains the classifier alone on
the frozen backbone's features: the backbone's globally pooled features of
every image are computed once, and a multinomial logistic regression (the
model's own linear classifier) is fitted to them in about a second.  The
features are cached per (images, backbone weights, image size, view, runtime),
so a second run on the same data starts from them.

The frozen forward pass is the expensive part, and it runs where it is
fastest (``benchmarks/own_photos.py`` and benchmarks/README.md have the
figures): on a CPU through ONNX Runtime in fp32 (EfficientNet-Lite0 at 128 px,
64 images a batch, on the 2-core AVX512 CPU: about 640 images/s, against 165
for PyTorch eager fp32 in channels_last and 500 for PyTorch with bf16
autocast), except for fewer than ``ORT_MIN_IMAGES`` images, where exporting
the graph costs more than it saves, and when the export fails; there, and on
a GPU, through PyTorch in the runtime it is given (fp32 in training, as the
test split is scored).

Stage 2 (fine-tuning) is the ordinary training loop, started from the stage-1
head, with the backbone at ``backbone_lr_scale`` of the learning rate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from imgcls.data.download import data_dir
from imgcls.inference import Runtime, normalization_tensors, to_input
from imgcls.tensorfile import DamagedFile, load_checked, save_checked, tensor_digest
from imgcls.training.losses import classification_loss, count_correct

VIEWS = ("none", "hflip")
ORT_NAME = "onnxruntime fp32"  # a runner's name (part of the features' cache key) when ONNX Runtime computes
FEATURE_BATCH = 64  # images per frozen forward pass: ORT's throughput is flat from 32 to 128 at 128 px
# Fewer images than this go through PyTorch: exporting the graph and starting a session (and importing onnx)
# cost about 1.3 s, which ONNX Runtime wins back after some 1,000 images of EfficientNet-Lite0 at 128 px (640
# against 360 images/s for PyTorch fp32 with the BatchNorm folded; one-off, the 2-core AVX512 CPU).
ORT_MIN_IMAGES = 1000
# The exported graph is kept in the data folder's graphs/ (as the features are), under GRAPH_FORMAT, the torch
# version, the backbone's digest and the image size; a later run reads it back (20 MB for Lite2: 0.1 s, where the
# export takes 0.6-1.3 s) and then runs ONNX Runtime for as few as ORT_CACHED_MIN_IMAGES images. Change
# GRAPH_FORMAT with PooledFeatures or the export's settings.
GRAPH_FORMAT = "pooled-features-1"
ORT_CACHED_MIN_IMAGES = 64
# L2 strengths tried for the head, per unit of the mean cross-entropy, on features scaled to unit variance:
# from the strongest down, until the val loss has risen twice in a row (it is U-shaped in the strength).
L2_GRID = (0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4, 1e-4)
LBFGS_ITERATIONS = 40  # warm-started from the previous strength: 30 to 100 give the same choice and val loss to 3e-4 on flowers.zip, at 0.7 against 2.0 s
# A head fit smaller than this (multiply-adds of one product of the features and the weight) runs in one thread:
# its L-BFGS is thousands of small operations, and where other work shares the cores each thread waits on the
# other (an update of 3,433 flowers, 5,500 x 2,120 features x 5 classes, one strength: 0.7-1.1 s in one thread,
# 4.6-5.1 s in two, on the 2-core AVX512 machine at a load of 4).  A larger fit keeps every thread.
ONE_THREAD_MACS = 1 << 28


class PooledFeatures(torch.nn.Module):
    """uint8 (N, H, W, C) pixels -> (N, F) globally averaged backbone features, normalisation included.

    Taking the pixels as they are stored keeps the preprocessing inside the
    exported graph: the batches go to ONNX Runtime as slices of the dataset,
    with no float copy made in Python.
    """

    def __init__(self, model: torch.nn.Module, norm: dict) -> None:
        super().__init__()
        self.model = model
        mean, std = normalization_tensors(norm, torch.device("cpu"))
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = to_input(pixels, self.mean, self.std, channels_last=True)  # as every prediction path normalises
        return self.model.forward_features(x).mean((2, 3))


@dataclass
class FeatureRunner:
    """Runs the frozen backbone on uint8 pixels: an ONNX Runtime session on the CPU, else PyTorch."""

    module: PooledFeatures
    runtime: Runtime
    session: object | None = None
    name: str = "torch"
    pending: tuple[int, int] | None = None  # lazy: the image size of the session to export at the first call

    graph: str | None = None  # this backbone's graph key (graph_key), where exported graphs are kept
    graph_file: Path | None = None  # and the file it is kept in

    @classmethod
    def create(cls, model: torch.nn.Module, runtime: Runtime, image_size: tuple[int, int],
               norm: dict, images: int = ORT_MIN_IMAGES, lazy: bool = False,
               graphs: Path | None = None, backbone: str | None = None) -> FeatureRunner:
        """A runner for ``images`` forward passes at ``image_size`` (H, W), normalising with ``norm``.

        ``lazy``: export the ONNX Runtime session at the first call rather than now, so that features all found
        in the cache cost no export (1 to 4 s); its name says ONNX Runtime until an export fails, and then
        PyTorch (:func:`cached_features` files what it computes under the name it was computed with).
        ``graphs``: the folder of exported graphs: one kept there from an earlier run is read instead of
        exported, and serves from ORT_CACHED_MIN_IMAGES images on; a new export is kept there. ``backbone``: the
        model's :func:`backbone_digest` where the caller has it.
        """
        module = PooledFeatures(model.eval(), norm).to(runtime.device)
        runner = cls(module, runtime)
        if graphs is not None:
            runner.graph = graph_key(backbone or backbone_digest(model, norm), image_size)
            runner.graph_file = Path(graphs) / f"{runner.graph[:32]}.safetensors"
        least = ORT_CACHED_MIN_IMAGES if runner.graph_file is not None and runner.graph_file.is_file() \
            else ORT_MIN_IMAGES
        if runtime.device.type == "cpu" and images >= least:
            if lazy:
                runner.pending, runner.name = tuple(image_size), ORT_NAME
                return runner
            runner.session = _ort_session(module, image_size, runner.graph_file, runner.graph)
            if runner.session is not None:
                runner.name = ORT_NAME
        if runner.session is None:
            runner.name = runner.torch_name
        return runner

    @property
    def torch_name(self) -> str:
        return f"torch {'bf16' if self.runtime.bf16 else 'fp32'}"

    @torch.no_grad()
    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, C) -> (N, F) float32 numpy."""
        if self.pending is not None:
            size, self.pending = self.pending, None
            self.session = _ort_session(self.module, size, self.graph_file, self.graph)
            self.name = ORT_NAME if self.session is not None else self.torch_name
        if self.session is not None:
            return self.session.run(None, {"pixels": np.ascontiguousarray(pixels)})[0]
        x = torch.as_tensor(np.ascontiguousarray(pixels)).to(self.runtime.device)
        with self.runtime.autocast():
            return self.module(x).float().cpu().numpy()


def graph_key(backbone: str, image_size: tuple[int, int]) -> str:
    """The key an exported graph of a backbone (its :func:`backbone_digest`) at ``image_size`` is kept under."""
    text = f"{GRAPH_FORMAT}|{torch.__version__}|{backbone}|{tuple(image_size)}"
    return hashlib.sha256(text.encode()).hexdigest()


def _kept_graph(path: Path, key: str) -> bytes | None:
    """The graph kept in ``path`` (as :func:`cached_features` keeps features: :func:`save_checked`, ``key`` in its
    metadata), or None: none there, or one that fails its checksum or is another's (removed: exported again)."""
    if not path.is_file():
        return None
    try:
        tensors, meta = load_checked(path)
        if meta.get("key") != key:
            raise DamagedFile(f"kept for key {str(meta.get('key'))[:12]}...")
        return tensors["graph"].numpy().tobytes()
    except (DamagedFile, KeyError):
        path.unlink(missing_ok=True)
        return None


def _ort_session(module: PooledFeatures, image_size: tuple[int, int], kept: Path | None = None,
                 key: str | None = None):
    """An ONNX Runtime session of ``module`` (dynamic batch), or None when export or load fails. With ``kept`` (a
    file) and ``key``, the graph is read from there when kept, else exported and kept."""
    try:
        import onnxruntime as ort

        graph = _kept_graph(kept, key) if kept is not None and key else None
        if graph is None:
            buf = io.BytesIO()
            example = torch.zeros(2, *image_size, module.model.in_chans, dtype=torch.uint8)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # The TorchScript exporter: 1 s for EfficientNet-Lite0, where the dynamo one takes several.
                torch.onnx.export(module, (example,), buf, input_names=["pixels"], output_names=["features"],
                                  dynamic_axes={"pixels": {0: "n"}, "features": {0: "n"}}, dynamo=False)
            graph = buf.getvalue()
            if kept is not None and key:
                with contextlib.suppress(OSError):  # a cache that cannot be written costs the next run an export
                    kept.parent.mkdir(parents=True, exist_ok=True)
                    save_checked(kept, {"graph": torch.from_numpy(np.frombuffer(graph, np.uint8).copy())},
                                 {"key": key})
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.log_severity_level = 3
        return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - any exporter or runtime failure: PyTorch eager computes the same features
        return None


def images_digest(images: np.ndarray) -> str:
    """SHA-256 of a uint8 (N, H, W, C) array's shape and bytes."""
    digest = hashlib.sha256(repr(images.shape).encode())
    flat = np.ascontiguousarray(images).reshape(-1)
    for start in range(0, flat.size, 1 << 26):
        digest.update(memoryview(flat[start:start + (1 << 26)]))
    return digest.hexdigest()


def backbone_digest(model: torch.nn.Module, norm: dict) -> str:
    """SHA-256 of the backbone's weights and buffers (everything but the classifier), its input normalisation,
    and which stages its pooled features come from."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    return tensor_digest(state) + repr(sorted(norm.items())) + f"|head_stages={getattr(model, 'head_stages', 1)}"


def frozen_pass(model: torch.nn.Module, runtime: Runtime, image_size: tuple[int, int], norm: dict, passes: int,
                cached: bool) -> tuple[FeatureRunner, Path | None, str]:
    """The frozen features' runner for ``passes`` images (lazy: no export while the features come from the cache),
    the folder those features are cached in (None unless ``cached``) and the backbone's digest: the data folder's
    ``features/`` and ``graphs/``, which training and ``imgcls inspect`` share."""
    backbone = backbone_digest(model, norm)
    root = data_dir() if cached else None
    runner = FeatureRunner.create(model, runtime, image_size, norm, passes, lazy=True,
                                  graphs=root / "graphs" if root else None, backbone=backbone)
    return runner, (root / "features" if root else None), backbone


def last_stage_directions(features: np.ndarray, model: torch.nn.Module) -> np.ndarray:
    """The last stage's part of pooled ``features`` (N, F) (the model's ``num_features`` columns, at the end),
    each row scaled to unit length: float32 (N, D), what copies and outliers are compared on."""
    last = features[:, -getattr(model, "num_features", features.shape[1]):]
    return (last / np.maximum(np.linalg.norm(last, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def compute_features(runner: FeatureRunner, images: np.ndarray, view: str = "none") -> np.ndarray:
    """(N, F) float32 pooled features of uint8 (N, H, W, C) images, mirrored first when ``view`` is hflip."""
    out = []
    for start in range(0, len(images), FEATURE_BATCH):
        batch = images[start:start + FEATURE_BATCH]
        out.append(runner(batch[:, :, ::-1] if view == "hflip" else batch))
    width = getattr(runner.module.model, "num_features", None) or 0
    return np.concatenate(out) if out else np.zeros((0, width), np.float32)


def cached_features(runner: FeatureRunner, images: np.ndarray, view: str, cache_dir, backbone: str,
                    say=print) -> tuple[np.ndarray, bool]:
    """:func:`compute_features`, read from or written to ``cache_dir`` (None: no cache).

    Returns (features, whether they came from the cache).  A cache file that
    fails its checksum is said so and computed again.
    """
    if cache_dir is None:
        return compute_features(runner, images, view), False
    digest = images_digest(images)
    key = _feature_key(digest, backbone, view, runner.name)
    path = cache_dir / f"{key[:32]}.safetensors"
    if path.is_file():
        try:
            tensors, meta = load_checked(path)
            features = tensors["features"]
            if meta.get("key") != key or features.ndim != 2 or features.shape[0] != len(images):
                raise DamagedFile(f"they were computed for other images or another backbone (key "
                                  f"{str(meta.get('key'))[:12]}..., {tuple(features.shape)})")
            return features.numpy(), True
        except (DamagedFile, KeyError) as exc:
            say(f"note: cached features {path} were computed again: {exc}")
            path.unlink(missing_ok=True)
    features = compute_features(runner, images, view)
    if _feature_key(digest, backbone, view, runner.name) != key:  # a lazy runner's export failed: PyTorch computed
        key = _feature_key(digest, backbone, view, runner.name)
        path = cache_dir / f"{key[:32]}.safetensors"
    try:
        save_checked(path, {"features": torch.from_numpy(features)}, {"view": view, "runtime": runner.name,
                                                                      "key": key})
    except OSError as exc:
        say(f"note: the features could not be cached in {cache_dir} ({exc})")
    return features, False


def _feature_key(images: str, backbone: str, view: str, runtime: str) -> str:
    """The cache key of features: the images' digest, the backbone's, the view and the runner's name."""
    return hashlib.sha256(f"{images}|{backbone}|{view}|{runtime}".encode()).hexdigest()


@dataclass
class FeatureStore:
    """Where stage 1 gets frozen features: :func:`cached_features`, block by block.

    ``blocks``: per split, the rows where a block of images starts (after the first, at row 0), each cached on
    its own: the images of the run an update starts from, then each folder added to them, so that an update
    finds the features of the images it had before as they were cached, and passes only the new block through
    the backbone.  Without blocks a split is one.
    """

    runner: FeatureRunner
    cache_dir: Path | None  # None: no cache
    backbone: str  # backbone_digest of the runner's model
    say: Callable[[str], None] = print
    blocks: dict[str, list[int]] = field(default_factory=dict)
    computed: int = 0  # images that went through the backbone (each view counted)

    def features(self, split: str, images: np.ndarray, view: str = "none") -> tuple[np.ndarray, bool]:
        """(N, F) features of ``split``'s uint8 (N, H, W, C) ``images`` in ``view``; whether all came from the
        cache."""
        cuts = [c for c in self.blocks.get(split, ()) if 0 < c < len(images)]
        blocks = [b for b in np.split(images, cuts) if len(b)] if cuts else [images]
        parts, hits = [], []
        for block in blocks:
            f, hit = cached_features(self.runner, block, view, self.cache_dir, self.backbone, self.say)
            parts.append(f)
            hits.append(hit)
            self.computed += 0 if hit else len(block)
        return (parts[0] if len(parts) == 1 else np.concatenate(parts)), all(hits)


@dataclass
class HeadFit:
    """A linear classifier fitted on features: logits = features @ weight.T + bias."""

    weight: torch.Tensor  # (classes, F)
    bias: torch.Tensor  # (classes,)
    l2: float
    train_loss: float
    train_accuracy: float
    val_loss: float | None
    val_accuracy: float | None
    tried: dict  # L2 strength -> val loss (or train loss without val)

    def logits(self, features: np.ndarray) -> torch.Tensor:
        """(N, classes) logits of (N, F) features."""
        return torch.from_numpy(np.asarray(features, np.float32)) @ self.weight.T + self.bias


def fit_linear_head(x_train: np.ndarray, y_train: np.ndarray, num_classes: int, x_val: np.ndarray | None = None,
                    y_val: np.ndarray | None = None, class_weights: torch.Tensor | None = None,
                    label_smoothing: float = 0.0, grid: tuple[float, ...] = L2_GRID, start: float | None = None,
                    init: tuple[torch.Tensor, torch.Tensor] | None = None) -> HeadFit:
    """Multinomial logistic regression with an L2 penalty chosen by the val split's cross-entropy.

    ``y_train``/``y_val``: int (N,) classes, or 0/1 (N, K) label matrices: then one-vs-rest logistic
    regression (a sigmoid per label, binary cross-entropy; ``class_weights`` weigh each label's positives),
    and the accuracies are exact-set accuracies.

    Full-batch L-BFGS on features centred and scaled to unit variance (which
    makes one L2 grid fit every backbone); the scaling is folded back into the
    returned weight and bias, so they apply to the raw features.  Without a
    val split the middle of the grid is used.

    The strengths are tried from the strongest down until the val loss has risen twice in a row.  With
    ``start`` (a strength that was best on similar data: the L2 of the run an update starts from), the search
    begins at the grid's strength nearest it and walks one way then the other, each way until the val loss
    rises once: three fits where ``start`` is still the best, as the loss is U-shaped in the strength.
    ``init``: a weight (K0, F) and bias (K0,) on the raw features, K0 <= ``num_classes``, to start the first
    fit from (the classes after K0 start from zero).
    """
    xt = torch.from_numpy(np.asarray(x_train, np.float32))
    yt = label_tensor(y_train)
    mu, sigma = xt.mean(0), xt.std().clamp_min(1e-6)
    zt = (xt - mu) / sigma
    has_val = x_val is not None and len(x_val) > 0
    zv = (torch.from_numpy(np.asarray(x_val, np.float32)) - mu) / sigma if has_val else None
    yv = label_tensor(y_val) if has_val else None
    grid = tuple(sorted(grid, reverse=True)) if has_val else (grid[len(grid) // 2],)
    w, b = _standardized_start(init, mu, sigma, num_classes)
    with _threads(1 if zt.numel() * num_classes < ONE_THREAD_MACS else None):
        best, tried = _search_l2(zt, yt, zv, yv, w, b, grid, start, class_weights, label_smoothing)
    _, l2, wz, bz = best
    weight = wz / sigma
    bias = bz - weight @ mu
    with torch.no_grad():
        train_logits = xt @ weight.T + bias
        fit = HeadFit(weight, bias, l2, classification_loss(train_logits, yt).item(),
                      count_correct(train_logits, yt).item() / max(len(yt), 1), None, None, tried)
        if has_val:
            val_logits = (zv * sigma + mu) @ weight.T + bias
            fit.val_loss = classification_loss(val_logits, yv).item()
            fit.val_accuracy = count_correct(val_logits, yv).item() / max(len(yv), 1)
    return fit


def _search_l2(zt, yt, zv, yv, w: torch.Tensor, b: torch.Tensor, grid: tuple[float, ...], start: float | None,
               class_weights, label_smoothing: float) -> tuple[tuple, dict]:
    """The L2 search of :func:`fit_linear_head` on standardised features: ((val loss, l2, weight, bias) of the
    best fit, {l2: val loss} of every fit), from ``w``, ``b``."""
    has_val = zv is not None
    best, tried = None, {}

    def fit_at(l2: float, w: torch.Tensor, b: torch.Tensor) -> bool:
        """Fit at strength ``l2`` from ``w``, ``b`` (in place); whether it is the best so far."""
        nonlocal best
        _lbfgs(w, b, zt, yt, l2, class_weights, label_smoothing)
        with torch.no_grad():
            score = classification_loss(zv @ w.T + b, yv).item() if has_val else \
                classification_loss(zt @ w.T + b, yt).item()
        tried[l2] = round(score, 5)
        if best is None or score < best[0]:
            best = (score, l2, w.detach().clone(), b.detach().clone())
            return True
        return False

    if start is None or len(grid) == 1:
        worse = 0
        for l2 in grid:  # strongest first, each fit warm-started from the last
            worse = 0 if fit_at(l2, w, b) else worse + 1
            if worse == 2:
                break
    else:
        i = min(range(len(grid)), key=lambda k: abs(math.log(grid[k]) - math.log(max(start, 1e-12))))
        fit_at(grid[i], w, b)
        centre = (best[2], best[3])
        for side in (grid[i - 1::-1] if i else (), grid[i + 1:]):  # stronger, then weaker, from the start's fit
            w, b = centre[0].clone(), centre[1].clone()
            for l2 in side:
                if not fit_at(l2, w, b):
                    break
    return best, tried


@contextlib.contextmanager
def _threads(n: int | None):
    """torch's intra-op threads set to ``n`` for the block (None: as they are)."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _standardized_start(init: tuple[torch.Tensor, torch.Tensor] | None, mu: torch.Tensor, sigma: torch.Tensor,
                        num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (K, F) weight and (K,) bias on standardised features ((x - mu) / sigma) that give the logits ``init``
    gives on raw ones (zero without it, and for the classes after init's)."""
    w = torch.zeros(num_classes, len(mu))
    b = torch.zeros(num_classes)
    if init is not None:
        weight, bias = (torch.as_tensor(t, dtype=torch.float32) for t in init)
        if weight.shape[1] != len(mu) or len(weight) > num_classes or bias.shape != (len(weight),):
            raise ValueError(f"a head of shape {tuple(weight.shape)} cannot start a fit of {num_classes} classes "
                             f"on {len(mu)} features")
        w[:len(weight)] = weight * sigma
        b[:len(weight)] = bias + weight @ mu
    return w.requires_grad_(), b.requires_grad_()


def label_tensor(y: np.ndarray) -> torch.Tensor:
    """Labels as the loss takes them: int64 (N,) classes, or a float 0/1 (N, K) label matrix."""
    y = np.asarray(y)
    return torch.from_numpy(y.astype(np.float32) if y.ndim == 2 else y.astype(np.int64))


@dataclass
class StageChoice:
    """The classifier stage 1 keeps: which of the model's pooled stages it reads, and its fit."""

    fit: HeadFit  # weight (classes, F) over every pooled feature, zero on the columns of stages not read
    stages: int  # how many of the last pooled stages it reads
    tried: dict  # stages read -> val loss (train loss without val)


def fit_stage_head(x_train: np.ndarray, y_train: np.ndarray, num_classes: int, widths: tuple[int, ...],
                   x_val: np.ndarray | None = None, y_val: np.ndarray | None = None, margin: float = 2.0,
                   stages: int | None = None, init: tuple[torch.Tensor, torch.Tensor] | None = None,
                   **options) -> StageChoice:
    """:func:`fit_linear_head` on the pooled outputs of the last k stages: every stage, or the last alone.

    ``x_train`` holds the pooled outputs of ``len(widths)`` stages side by side (widths: their channels, in
    order; the model's head convolution last).  Two readings are fitted: every stage and the last stage alone
    (the original classifier).  Middle and early stages carry what a network far from the data still shares
    with it (edges, textures, parts): on folders far from ImageNet they gain most (benchmarks/README.md).
    Every stage is kept unless the last alone has the lower val cross-entropy by more than ``margin``
    standard errors of the per-image difference: on a small val split the lower loss alone chose the last
    stage by chance (20 draws of 250 flowers: +0.6 to +1.6 points for this rule), and every stage won on
    every folder measured.  The stages not read get zero weights, so the returned weight applies to
    ``x_train``'s columns as they are.

    ``stages``: read that many of the last stages, without trying the other reading (an update keeps the
    reading of the run it starts from).  ``init``: a weight over every pooled feature and a bias to start from
    (see :func:`fit_linear_head`); the other ``options`` go to :func:`fit_linear_head` as they are.
    """
    has_val = x_val is not None and len(x_val) > 0
    total = sum(widths)
    if x_train.shape[1] != total:
        raise ValueError(f"{x_train.shape[1]} features given for stages of {total} channels")
    if stages is not None and not 1 <= stages <= len(widths):
        raise ValueError(f"stages {stages} is not a reading of {len(widths)} stages")
    candidates = [stages] if stages is not None else sorted({len(widths), 1}, reverse=True) if has_val \
        else [len(widths)]
    fits, tried, losses = {}, {}, {}
    for k in candidates:
        first = total - sum(widths[len(widths) - k:])
        start = None if init is None else (torch.as_tensor(init[0])[:, first:], torch.as_tensor(init[1]))
        fit = fit_linear_head(x_train[:, first:], y_train, num_classes, x_val[:, first:] if has_val else None,
                              y_val, init=start, **options)
        fits[k] = (first, fit)
        tried[k] = round(fit.val_loss if has_val else fit.train_loss, 5)
        if has_val:
            losses[k] = classification_loss(fit.logits(x_val[:, first:]), label_tensor(y_val), reduction="none")
    k = candidates[0] if stages is not None else len(widths)
    if 1 in losses and k != 1:
        gain = (losses[k] - losses[1]).double()  # > 0 where the last stage alone does better
        spread = gain.std().item() / len(gain) ** 0.5 if len(gain) > 1 else float("inf")
        if gain.mean().item() > margin * spread:
            k = 1
    first, fit = fits[k]
    weight = torch.zeros(num_classes, total)
    weight[:, first:] = fit.weight
    return StageChoice(dataclasses.replace(fit, weight=weight), k, tried)


def _lbfgs(w: torch.Tensor, b: torch.Tensor, z: torch.Tensor, y: torch.Tensor, l2: float,
           class_weights: torch.Tensor | None, label_smoothing: float) -> None:
    """Minimise the L2-penalised cross-entropy over ``w`` and ``b`` in place, from their values.

    Limited-memory BFGS (Nocedal and Wright, algorithm 7.4/7.5) with a
    backtracking Armijo line search, on the flat vector of both.  Written out
    rather than ``torch.optim.LBFGS``, whose first use imports torch._dynamo
    (1.4 s, the largest single cost of stage 1 on a few hundred photos).
    """
    sizes = (w.numel(), b.numel())

    def loss_and_grad(theta: torch.Tensor) -> tuple[float, torch.Tensor]:
        theta = theta.detach().requires_grad_()
        ww, bb = theta[:sizes[0]].view_as(w), theta[sizes[0]:].view_as(b)
        loss = classification_loss(z @ ww.T + bb, y, class_weights, label_smoothing)
        loss = loss + l2 * ww.square().sum()
        (grad,) = torch.autograd.grad(loss, theta)
        return loss.item(), grad

    theta = torch.cat([w.detach().reshape(-1), b.detach().reshape(-1)])
    loss, grad = loss_and_grad(theta)
    steps: list[tuple[torch.Tensor, torch.Tensor, float]] = []  # (s, y, 1 / y.s), oldest first
    for iteration in range(LBFGS_ITERATIONS):
        if grad.abs().max() <= 1e-6:
            break
        direction = _two_loop(grad, steps)
        slope = float(grad @ direction)
        if slope >= 0:  # not a descent direction (rounding): restart from the gradient
            steps.clear()
            direction, slope = -grad, -float(grad @ grad)
        t = 1.0 if steps or iteration else min(1.0, 1.0 / float(grad.abs().sum()))
        while True:  # Armijo: a sufficient decrease, halving the step until there is one
            new_loss, new_grad = loss_and_grad(theta + t * direction)
            if new_loss <= loss + 1e-4 * t * slope or t < 1e-10:
                break
            t *= 0.5
        step, change = t * direction, new_grad - grad
        curvature = float(change @ step)
        if curvature > 1e-10:
            steps.append((step, change, 1.0 / curvature))
            if len(steps) > 20:
                steps.pop(0)
        theta, grad, done = theta + step, new_grad, abs(new_loss - loss) < 1e-9
        loss = new_loss
        if done or not math.isfinite(loss):
            break
    if not torch.isfinite(theta).all():
        raise FloatingPointError("the head's fit diverged")
    with torch.no_grad():
        w.copy_(theta[:sizes[0]].view_as(w))
        b.copy_(theta[sizes[0]:].view_as(b))


def _two_loop(grad: torch.Tensor, steps: list) -> torch.Tensor:
    """-H grad, with H the inverse-Hessian estimate of the stored (s, y) pairs (the L-BFGS two-loop recursion)."""
    q = grad.clone()
    alphas = []
    for s, y, rho in reversed(steps):
        alpha = rho * float(s @ q)
        q -= alpha * y
        alphas.append(alpha)
    if steps:
        s, y, _ = steps[-1]
        q *= float(s @ y) / float(y @ y)
    for (s, y, rho), alpha in zip(steps, reversed(alphas)):
        q += (alpha - rho * float(y @ q)) * s
    return -q
