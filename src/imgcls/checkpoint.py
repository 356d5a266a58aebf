"""The checkpoint format: the one module that reads and writes checkpoints.

A checkpoint is a single ``.safetensors`` file.  Its tensors are the model's
weights (``model.*``) and, in a training checkpoint, the optimiser's state
(``optim.*``); its header metadata holds one JSON document (key ``imgcls``)
with the format version, the model's name and arguments, class names, input
shape, normalisation and metrics.  Loading never unpickles anything.

The metadata also holds a SHA-256 of every tensor (name, dtype, shape and
bytes, in name order), written at save time and checked at load, so that a
file whose weights changed on disk is refused instead of predicting from
damaged weights.  Checkpoints written before the checksum existed still load,
with one note per file that they cannot be checked.

Writes go to a temporary file in the same folder, are flushed to disk and
renamed over the final name, so a crash mid-write never leaves a broken file.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from imgcls import rundir
from imgcls.errors import CheckpointError, ConfigError, is_disk_full
from imgcls.io import atomic_path
from imgcls.models import create_model
from imgcls.ood import entry_problem

FORMAT_VERSION = 1
META_KEY = "imgcls"
CHECKPOINT_NAMES = ("best", "last")
CHECKSUM_KEY = "tensors_sha256"
_UNCHECKED_NOTED: set[str] = set()  # files already reported as written without a checksum


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def flatten_state(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested dict/list by a reference, collecting tensors.

    Returns a JSON-serialisable skeleton; ``tensors`` receives ``prefix.path`` keys.
    """
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[_key(k), flatten_state(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(f"cannot store a value of type {type(obj).__name__} at {prefix} in a checkpoint")


def _key(k: Any) -> Any:
    # Optimiser state is keyed by int parameter ids; JSON object keys would turn them into str.
    if isinstance(k, (int, str)):
        return k
    raise CheckpointError(f"cannot store a dict key of type {type(k).__name__} in a checkpoint")


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(skeleton, dict) and "__tensor__" in skeleton:
        return tensors[skeleton["__tensor__"]]
    if isinstance(skeleton, dict) and "__dict__" in skeleton:
        return {k: unflatten_state(v, tensors) for k, v in skeleton["__dict__"]}
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    return skeleton


def save_checkpoint(path: str | Path, model: torch.nn.Module, meta: dict, train_state: dict | None = None) -> Path:
    """Write ``model``'s weights, ``meta`` and an optional training state atomically.

    Args:
        path: destination ``.safetensors`` file.
        model: the (unwrapped) model whose ``state_dict`` is saved.
        meta: JSON-serialisable metadata (see module docstring).
        train_state: optional nested dict (optimiser state, schedule, RNG...);
            its tensors are stored beside the weights.
    """
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        tensors[f"model.{name}"] = value.detach().to("cpu").contiguous().clone()
    doc = dict(meta, format_version=FORMAT_VERSION)
    if train_state is not None:
        doc["train_state"] = flatten_state(train_state, "train", tensors)
    if doc.get("ood") is not None:  # the out-of-distribution score, with its bank of training features
        doc["ood"] = flatten_state(doc["ood"], "ood", tensors)
    doc[CHECKSUM_KEY] = tensors_digest(tensors)
    try:
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(doc)})
    except Exception as exc:  # safetensors reports a full disk as its own error type, with the OS's words
        if not is_disk_full(exc):
            raise
        kept = f"the previous {path.name} is kept as it was" if path.exists() else f"no {path.name} was written"
        raise CheckpointError(f"the disk is full: checkpoint {path} could not be written ({kept}). Free space on "
                              f"the disk that holds {path.parent}, then resume with `imgcls train --resume` on "
                              f"the run folder") from None
    return path


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint file: (model state_dict, metadata incl. ``train_state`` if any)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"checkpoint {path} cannot be read ({exc}); is it a safetensors file written by imgcls?") from exc
    if META_KEY not in header:
        raise CheckpointError(f"checkpoint {path} has no imgcls metadata; it was not written by imgcls")
    try:
        doc = json.loads(header[META_KEY])
    except (ValueError, RecursionError):
        raise CheckpointError(f"checkpoint {path} has metadata that is not valid JSON; it is damaged or was not "
                              f"written by imgcls") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"checkpoint {path} has metadata that is a {type(doc).__name__}, not a mapping; it is "
                              f"damaged or was not written by imgcls")
    meta = upgrade_meta(doc, path)
    verify_tensors(path, tensors, meta.pop(CHECKSUM_KEY, None))
    check_meta(meta, path)
    check_finite(path, tensors)
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    if "train_state" in meta:
        meta["train_state"] = unflatten_state(meta["train_state"], tensors)
    if meta.get("ood") is not None:
        meta["ood"] = unflatten_state(meta["ood"], tensors)
        _check_ood(meta, path)
    return state, meta


def _check_ood(meta: dict, path: Path) -> None:
    """Refuse an out-of-distribution entry that would crash or mislead predictions (:func:`imgcls.ood.entry_problem`)."""
    problem = entry_problem(meta["ood"])
    if problem:
        raise CheckpointError(f"checkpoint {path} is damaged or was not written by imgcls: its 'ood' entry {problem}")


def verify_tensors(path: Path, tensors: dict[str, torch.Tensor], expected: str | None) -> None:
    """Refuse a checkpoint whose tensors do not match the checksum saved with them; note one saved without."""
    if expected is None:
        if str(path) not in _UNCHECKED_NOTED:
            _UNCHECKED_NOTED.add(str(path))
            print(f"note: checkpoint {path} was written before imgcls stored checksums, so its weights cannot be "
                  f"checked for damage; saving it again (e.g. `imgcls calibrate`) adds one", file=sys.stderr)
        return
    if tensors_digest(tensors) != expected:
        raise CheckpointError(f"checkpoint {path} is damaged: its tensor data does not match the checksum saved "
                              f"with it (the file changed after it was written). Use another checkpoint of the run "
                              f"(checkpoints/last or best) or train again")


def check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse weights that hold NaN or infinity: every prediction from them would be NaN."""
    bad = [k for k, v in tensors.items() if k.startswith("model.") and v.is_floating_point()
           and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"checkpoint {path} is damaged: {len(bad)} weight tensor(s) hold NaN or infinite "
                              f"values (such as {bad[0][len('model.'):]}); use another checkpoint of the run "
                              f"(checkpoints/last or best) or train again")


MAX_INPUT_SIDE = 8192  # pixels: an input_shape beyond this is damage, not a model
NORMALIZE_RANGE = {"mean": (-1e3, 1e3), "std": (1e-4, 1e3)}  # for pixels in [0, 1]: anything outside is damage


def check_meta(meta: dict, path: Path) -> None:
    """Refuse metadata that would crash or silently mislead evaluate, predict, serve, resume or export."""
    def bad(what: str, value) -> CheckpointError:
        shown = json.dumps(value)[:80] if _jsonable(value) else type(value).__name__
        return CheckpointError(f"checkpoint {path} is damaged or was not written by imgcls: {what}, got {shown}")

    if not isinstance(meta.get("arch"), str) or not meta["arch"]:
        raise bad("'arch' must name a model", meta.get("arch"))
    classes = meta.get("classes")
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        raise bad("'classes' must be a list of at least 2 class names", classes)
    shape = meta.get("input_shape")
    if (not isinstance(shape, list) or len(shape) != 3 or not all(_whole(v) for v in shape)
            or shape[0] not in (1, 3) or not all(1 <= v <= MAX_INPUT_SIDE for v in shape[1:])):
        raise bad(f"'input_shape' must be [channels (1 or 3), height, width] with sides of 1 to {MAX_INPUT_SIDE}",
                  shape)
    if not isinstance(meta.get("arch_kwargs", {}), dict):
        raise bad("'arch_kwargs' must be a mapping of model options", meta.get("arch_kwargs"))
    norm = meta.get("normalize")
    if norm is not None:
        ok = isinstance(norm, dict) and all(
            isinstance(norm.get(k), list) and len(norm[k]) == shape[0]
            and all(_finite(v) and lo <= v <= hi for v in norm[k]) for k, (lo, hi) in NORMALIZE_RANGE.items())
        if not ok:
            (mlo, mhi), (slo, shi) = NORMALIZE_RANGE["mean"], NORMALIZE_RANGE["std"]
            raise bad(f"'normalize' must hold {shape[0]} finite 'mean' values in [{mlo:g}, {mhi:g}] and positive "
                      f"'std' values in [{slo:g}, {shi:g}]", norm)
    temperature = meta.get("temperature")
    if temperature is not None and not (_finite(temperature) and temperature > 0):
        raise bad("'temperature' must be a positive number", temperature)
    thresholds = meta.get("thresholds")
    if thresholds is not None and not (isinstance(thresholds, list) and len(thresholds) == len(classes)
                                       and all(_finite(v) for v in thresholds)):
        raise bad(f"'thresholds' must be {len(classes)} numbers, one per class", thresholds)
    for key in ("tta", "resize"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise bad(f"'{key}' must be a string", meta[key])
    if meta.get("task", "single") not in TASKS:
        raise bad(f"'task' must be one of {', '.join(TASKS)}", meta.get("task"))


def is_multilabel(meta: dict) -> bool:
    """Whether the model's metadata says it gives several labels per image (a sigmoid per label)."""
    return meta.get("task") == "multilabel"


TASKS = ("single", "multilabel")
"""What a model's ``meta["task"]`` may say: one class per image (softmax; the default), or several labels."""


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        return False
    return True


def upgrade_meta(meta: dict, path: Path) -> dict:
    """Bring metadata written by an older imgcls up to the current format."""
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {version!r}; this imgcls reads versions up to "
            f"{FORMAT_VERSION}: upgrade imgcls to load it"
        )
    # Version 1 is the first format: nothing to upgrade yet.  Later versions add steps here.
    return meta


def find_checkpoint(run_or_file: str | Path, which: str | None = None) -> Path:
    """Resolve a run folder (or a checkpoint file) to a checkpoint file.

    A run folder resolves to ``checkpoints/<which>.safetensors``, refused when
    that file is missing (never another checkpoint in its place).
    ``which=None`` means the run's final checkpoint (``final_checkpoint`` in
    run.json); for a run still training (no run.json yet), its best so far,
    or ``last`` before it has one.
    """
    p = Path(run_or_file)
    if p.is_file():
        return p
    if not p.is_dir():
        raise CheckpointError(f"{p} is neither a run folder nor a checkpoint file")
    named = which is not None
    if which is None:
        if (p / rundir.RUN).is_file():
            which = _final_checkpoint(p / rundir.RUN)
        else:
            which = "best" if (p / rundir.CHECKPOINTS / "best.safetensors").is_file() else "last"
    elif which not in CHECKPOINT_NAMES:
        raise CheckpointError(f"no checkpoint named {str(which)[:60]!r}; a run keeps {' and '.join(CHECKPOINT_NAMES)}")
    candidate = p / rundir.CHECKPOINTS / f"{which}.safetensors"
    if candidate.is_file():
        return candidate
    others = [n for n in CHECKPOINT_NAMES if n != which and (p / rundir.CHECKPOINTS / f"{n}.safetensors").is_file()]
    said = "--checkpoint " + which if named else f"its final checkpoint, {which} (run.json)"
    if others:
        raise CheckpointError(f"run folder {p} has no checkpoints/{which}.safetensors ({said}); it keeps "
                              f"{' and '.join(others)}: give --checkpoint {others[0]} to use it")
    raise CheckpointError(f"run folder {p} holds no checkpoint (looked for checkpoints/{which}.safetensors)")


def _final_checkpoint(info: Path) -> str:
    """The run's final checkpoint as its run.json names it (``best`` when there is none yet)."""
    fix = "restore it, or name the checkpoint (--checkpoint best or last)"
    which = rundir.read_doc(info, fix).get("final_checkpoint", "best")
    if which not in CHECKPOINT_NAMES:
        raise CheckpointError(f"{info} is damaged: its final_checkpoint must be one of {', '.join(CHECKPOINT_NAMES)}, "
                              f"got {json.dumps(which)[:60]}; {fix}")
    return which


def build_model(meta: dict, path: Path | None = None) -> torch.nn.Module:
    """Rebuild the architecture described by checkpoint metadata (weights not loaded).

    Raises:
        CheckpointError: the metadata names a model or options that cannot be built (naming ``path``).
    """
    c, h, w = meta["input_shape"]
    try:
        return create_model(meta["arch"], in_chans=c, num_classes=len(meta["classes"]), img_size=(h, w),
                            **meta.get("arch_kwargs", {}))
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {path or 'metadata'} describes a model that cannot be built: {exc}") \
            from None


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load a checkpoint's weights into ``model``; CheckpointError in one line when they do not fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        parts = [f"{len(names)} {what} (such as {names[0]})" for what, names in
                 (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)) if names]
        raise CheckpointError(f"checkpoint {path} does not match the model its metadata describes: weights "
                              f"{'; '.join(parts)}; it is damaged or was not written by imgcls")
    model.load_state_dict(state)


def load_model(run_or_file: str | Path, which: str | None = None, device: str | torch.device = "cpu"):
    """Load a model from a run folder or checkpoint file: (model in eval mode, metadata)."""
    path = find_checkpoint(run_or_file, which)
    state, meta = read_checkpoint(path)
    model = build_model(meta, path)
    load_state(model, state, path)
    return model.to(device).eval(), meta


def update_meta(path: str | Path, updates: dict) -> dict:
    """Merge ``updates`` into a checkpoint's metadata, rewriting the file atomically.

    Used to store what is fitted after training (temperature, thresholds).
    Returns the new metadata (without the training state).
    """
    path = Path(path)
    state, meta = read_checkpoint(path)
    train_state = meta.pop("train_state", None)
    meta.update(updates)
    model = _StateHolder(state)
    save_checkpoint(path, model, meta, train_state=train_state)
    return meta


class _StateHolder(torch.nn.Module):
    """Stands in for a model when only its saved state_dict is at hand."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        self._saved = state

    def state_dict(self, *args, **kwargs):  # noqa: D102 - same contract as nn.Module
        return self._saved
