"""Layer-wise linear probes: how linearly decodable the classes are at each stage.

For every convolutional stage named in ``model.stages`` the stage's output
(N, C, h, w) is global-average-pooled to (N, C).  A multinomial logistic
regression is fitted on pooled features of *training* images and scored on
*held-out* images, once on the stage alone ("accuracy") and once on the
standardised features of all stages up to and including it concatenated
("cumulative_accuracy").  Fitting and scoring on different images is what
makes the number mean something: with enough channels a probe can fit any
labels on the images it was fitted to.
"""

from __future__ import annotations

import numpy as np
import torch

from imgcls.data.base import Split
from imgcls.errors import ConfigError, DataError
from imgcls.inference import Runtime, memory_safe_batch, normalization_tensors, to_input

PROBE_C = 1.0  # inverse L2 strength of the logistic regression, on standardised features
PROBE_MAX_ITER = 1000  # lbfgs iterations; the features are standardised, so this is rarely reached


def _stage_modules(model: torch.nn.Module, stages) -> list[tuple[str, torch.nn.Module]]:
    names = list(getattr(model, "stages", ()) if stages is None else stages)
    if not names:
        raise ConfigError(f"{type(model).__name__} names no stages to probe; "
                          "pass stages=[...] with dotted module names")
    modules = []
    for name in names:
        try:
            modules.append((name, model.get_submodule(name)))
        except AttributeError:
            known = ", ".join(getattr(model, "stages", ())) or "(none)"
            raise ConfigError(f"stage {name!r} is not a module of {type(model).__name__}; "
                              f"its stages are: {known}") from None
    return modules


def _pool(output: torch.Tensor) -> torch.Tensor:
    """Stage output (N, C, ...) -> (N, C) float32 on CPU, averaged over the spatial axes."""
    out = output.float()
    if out.ndim > 2:
        out = out.flatten(2).mean(2)
    return out.cpu()


@torch.no_grad()
def stage_features(model: torch.nn.Module, images: np.ndarray, norm: dict, runtime: Runtime,
                   stages: list[str] | None = None, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Global-average-pooled outputs of each stage for a batch of images.

    Args:
        model: an image classifier; it is put in eval mode.
        images: uint8 array (N, H, W, C).
        norm: ``{"mean": [...], "std": [...]}`` per channel, as in a checkpoint's metadata.
        runtime: device, precision and memory layout for the forward passes.
        stages: dotted module names (default ``model.stages``), in the order wanted.
        batch_size: images per forward pass.

    Returns:
        Stage name -> float32 array (N, C_stage), in the order of ``stages``.
    """
    modules = _stage_modules(model, stages)
    model.eval()
    mean, std = normalization_tensors(norm, runtime.device)
    images = torch.as_tensor(images)
    pooled: dict[str, list[torch.Tensor]] = {name: [] for name, _ in modules}

    def hook_for(name):
        def hook(_module, _inputs, output):
            pooled[name].append(_pool(output))
        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in modules]
    try:
        step = memory_safe_batch(batch_size, images.shape[1:3])
        for start in range(0, len(images), step):
            x = to_input(images[start:start + step].to(runtime.device), mean, std, runtime.channels_last)
            with runtime.autocast():
                model(x)
    finally:
        for handle in handles:
            handle.remove()

    features = {}
    for name, chunks in pooled.items():
        if len(images) and sum(len(c) for c in chunks) != len(images):
            raise ConfigError(f"stage {name!r} did not produce one output per image "
                              f"(called {len(chunks)} times); is it used in the forward pass?")
        features[name] = torch.cat(chunks).numpy() if chunks else np.zeros((0, 0), np.float32)
    return features


def stratified_subsample(labels: np.ndarray, max_n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most ``max_n`` items, each class kept in proportion.

    Items are shuffled, then ordered by their rank within their class divided
    by the class size, so any prefix holds the classes in their proportions
    (each class at least once, as far as ``max_n`` allows).
    """
    labels = np.asarray(labels)
    if max_n < 1:
        raise ConfigError(f"a probe needs at least one image per split, got max_n={max_n}")
    if len(labels) <= max_n:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    shuffled = labels[order]
    _, inverse, counts = np.unique(shuffled, return_inverse=True, return_counts=True)
    rank = np.empty(len(order), dtype=np.int64)
    for cls in range(len(counts)):
        where = np.flatnonzero(inverse == cls)
        rank[where] = np.arange(len(where))
    key = (rank + 0.5) / counts[inverse]  # +0.5: a class's first item comes before a large class's second
    chosen = order[np.argsort(key, kind="stable")[:max_n]]
    return np.sort(chosen)


def _fit_score(train_x: np.ndarray, train_y: np.ndarray, eval_x: np.ndarray, eval_y: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression

    # lbfgs minimises the multinomial (softmax) loss for more than two classes.
    probe = LogisticRegression(C=PROBE_C, max_iter=PROBE_MAX_ITER)
    probe.fit(train_x, train_y)
    return float(probe.score(eval_x, eval_y))


def probe_layers(model: torch.nn.Module, meta: dict, train: Split, held_out: Split, runtime: Runtime,
                 max_train: int = 5000, max_eval: int = 5000, seed: int = 0) -> list[dict]:
    """Linear-probe accuracy of each stage, alone and with all earlier stages.

    The probes are fitted on (a stratified, seeded subsample of) ``train`` and
    scored on (one of) ``held_out``; features are standardised with the
    training images' statistics only.

    Args:
        model: an image classifier with ``stages``.
        meta: checkpoint metadata; ``meta["normalize"]`` gives the input normalisation.
        train: images the probes are fitted on; labels in the model's class order.
        held_out: images the probes are scored on (validation or test), same label order.
        runtime: device, precision and layout for the forward passes.
        max_train, max_eval: at most this many images from each split.
        seed: for the subsamples.

    Returns:
        One dict per stage, in ``model.stages`` order: ``stage``, ``channels``,
        ``accuracy`` (this stage alone), ``cumulative_accuracy`` (this stage and
        every earlier one, concatenated) and ``chance`` (share of the most
        common class among the scored held-out images: the accuracy of always
        guessing it; the same in every row).
    """
    from sklearn.preprocessing import StandardScaler

    train_idx = stratified_subsample(train.labels, max_train, seed)
    eval_idx = stratified_subsample(held_out.labels, max_eval, seed + 1)
    train_y, eval_y = train.labels[train_idx], held_out.labels[eval_idx]
    if len(np.unique(train_y)) < 2:
        raise DataError(f"a probe needs at least two classes among the training images, "
                        f"got {len(np.unique(train_y))} in {len(train_y)} images")
    if len(eval_y) == 0:
        raise DataError("the held-out split has no images to score the probes on")

    norm = meta["normalize"]
    train_feats = stage_features(model, train.images[train_idx], norm, runtime)
    eval_feats = stage_features(model, held_out.images[eval_idx], norm, runtime)
    chance = float(np.bincount(eval_y).max() / len(eval_y))

    rows, seen_train, seen_eval = [], [], []
    for name, train_x in train_feats.items():
        scaler = StandardScaler().fit(train_x)
        seen_train.append(scaler.transform(train_x))
        seen_eval.append(scaler.transform(eval_feats[name]))
        accuracy = _fit_score(seen_train[-1], train_y, seen_eval[-1], eval_y)
        if len(seen_train) == 1:
            cumulative = accuracy  # the same features, so the same probe
        else:
            cumulative = _fit_score(np.hstack(seen_train), train_y, np.hstack(seen_eval), eval_y)
        rows.append({"stage": name, "channels": int(train_x.shape[1]), "accuracy": accuracy,
                     "cumulative_accuracy": cumulative, "chance": chance})
    return rows


def format_probes(rows: list[dict]) -> str:
    """A plain-text table of probe results, one line per stage."""
    width = max([len("stage")] + [len(r["stage"]) for r in rows])
    lines = [f"{'stage':<{width}}  {'channels':>8}  {'accuracy':>8}  {'cumulative':>10}"]
    for r in rows:
        lines.append(f"{r['stage']:<{width}}  {r['channels']:>8d}  {r['accuracy']:>8.4f}  "
                     f"{r['cumulative_accuracy']:>10.4f}")
    if rows and "chance" in rows[0]:
        lines.append(f"chance (most common held-out class): {rows[0]['chance']:.4f}")
    return "\n".join(lines)
