"""Attribution maps land where the evidence is, and the sanity checks can fail.

A ResNet-8 is trained here on :func:`patterns.make_pattern_dataset`: 32x32 noise with
one 8x8 class shape (cross, ring, diagonal, square) and one 8x8 distractor
shape of no class, each of random colour at a random place, so the only
evidence for the class is the class shape.  On held-out images the model
classifies correctly, Grad-CAM's peak must fall inside the class shape's box.
A map that follows bright pixels or edges, blind to the model, finds the
class shape only about half the time, and the test checks that too, so the
task cannot be passed by looking at the image alone.

The whole file takes about 25 s on 2 CPU cores (training: about 12 s).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from patterns import make_pattern_dataset, train_pattern_model

from imgcls.explain.attribution import METHODS, attribute
from imgcls.explain.sanity import (
    RANDOMISATION_THRESHOLD,
    deletion_auc,
    deletion_curve,
    edge_map,
    peak_in_box,
    random_deletion_auc,
    randomisation_check,
)
from imgcls.inference import channel_stats, normalization_tensors, to_input

THREADS = 2  # fixed, so that the float sums (and so the figures) do not depend on the machine
TRAIN_IMAGES = 3000
TEST_IMAGES = 128
TRAIN_STEPS = 300  # Adam steps
BATCH = 64  # images per step
LR = 2e-3  # Adam, per step
# Grad-CAM reads ResNet-8's last stage, an 8x8 map (4 pixels per cell) upsampled
# bilinearly to 32x32, so its peak may sit up to about half a cell off the shape.
MARGIN = 2  # pixels around the 8x8 box
LOCALISATION_FLOOR = 0.9  # fraction of correctly classified held-out images
ACCURACY_FLOOR = 0.95


pytestmark = pytest.mark.slow  # trains its own model on planted patterns (about 25 s)


@pytest.fixture(scope="module", autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def _to_input(images: np.ndarray, norm: dict) -> torch.Tensor:
    mean, std = normalization_tensors(norm, torch.device("cpu"))
    return to_input(torch.from_numpy(images), mean, std, channels_last=False)


def _train(x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> torch.nn.Module:
    return train_pattern_model(x, y, seed, steps=TRAIN_STEPS, batch=BATCH, lr=LR)


@pytest.fixture(scope="module")
def trained():
    """The trained model and its correctly classified held-out images with their boxes."""
    images, labels, _ = make_pattern_dataset(TRAIN_IMAGES, seed=0)
    norm = channel_stats(images)
    model = _train(_to_input(images, norm), torch.from_numpy(labels))
    test_images, test_labels, test_boxes = make_pattern_dataset(TEST_IMAGES, seed=1)
    x, y = _to_input(test_images, norm), torch.from_numpy(test_labels)
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    keep = correct.numpy()
    return {"model": model, "accuracy": float(correct.float().mean()),
            "x": x[correct], "y": y[correct], "boxes": test_boxes[keep]}


@pytest.fixture(scope="module")
def maps(trained):
    """Maps (N, H, W) of every method, and of the model-blind edge map, on the correct images."""
    out = {m: attribute(trained["model"], trained["x"], trained["y"], m) for m in METHODS}
    out["edges (control)"] = edge_map(trained["model"], trained["x"], trained["y"])
    return out


def test_model_learns_the_patterns(trained):
    assert trained["accuracy"] >= ACCURACY_FLOOR
    assert len(trained["x"]) >= 100  # enough images for a rate


def test_localisation_rates(trained, maps):
    rates = {m: float(peak_in_box(v, trained["boxes"], MARGIN).mean()) for m, v in maps.items()}
    print("\npeak inside the pattern's box (+-2 px):",
          ", ".join(f"{m} {r:.1%}" for m, r in rates.items()))
    for method in ("gradcam", "gradcam++"):
        assert rates[method] >= LOCALISATION_FLOOR, (method, rates)
    # The task is not solvable by looking at bright pixels or edges: a map blind
    # to the model lands on the distractor about half the time.
    assert rates["edges (control)"] < 0.75, rates


def test_gradcam_deletion_beats_random_order(trained, maps):
    model, x, y = trained["model"], trained["x"], trained["y"]
    gradcam = deletion_auc(deletion_curve(model, x, y, maps["gradcam"])).mean()
    random = random_deletion_auc(model, x, y, steps=20, seed=0).mean()
    print(f"\ndeletion AUC: gradcam {gradcam:.3f}, random order {random:.3f}")
    assert gradcam < random - 0.1


def test_randomisation_check_passes_gradcam(trained):
    check = randomisation_check(trained["model"], trained["x"], trained["y"], "gradcam", seed=0)
    print(f"\ngradcam: trained vs randomised Spearman {check['mean']:.3f}")
    assert check["threshold"] == RANDOMISATION_THRESHOLD
    assert check["passed"]
    assert check["mean"] < RANDOMISATION_THRESHOLD


def test_randomisation_check_flags_a_weight_independent_map(trained):
    # The check can fail: an edge detector gives the same map whatever the weights.
    check = randomisation_check(trained["model"], trained["x"], trained["y"], edge_map, seed=0)
    assert not check["passed"]
    assert check["mean"] > 0.99
