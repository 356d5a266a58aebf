"""Out-of-distribution rejection: how well a score tells a model's own classes from images that are none of them.

A model for five flowers shown a cat still names a flower.  Three scores of how much an image looks like the
training data, higher meaning more so:

    msp      the largest class probability (softmax; with several labels per image, the largest sigmoid)
    energy   log-sum-exp of the logits (Liu et al., 2020)
    knn      the cosine similarity of the image's pooled features to its k-th nearest training image's (Sun et al.,
             2022), on signed square roots of the features: a bank of up to BANK_IMAGES training images is kept
             with the model

Each is measured on the val split (in) against images from outside the classes (out): the area under the ROC
curve, and the share of out images accepted at the threshold that rejects ``frr`` of the val images.  The score
with the highest AUROC is kept, with that threshold.  On flowers.zip against CIFAR-10 photos (32 px, upscaled),
kNN reached an AUROC of 0.96 where MSP and energy reached 0.73 and 0.76 (benchmarks/README.md).
"""

from __future__ import annotations

import numpy as np
import torch

SCORES = ("msp", "energy", "knn")
K = 10  # neighbours: the 10th nearest training image's similarity (1 to 50 gave AUROC within 0.005 on flowers)
BANK_IMAGES = 1000  # training images kept for kNN (float16): 1,000 gave the AUROC of all 3,400 to 0.002
FRR = 0.05  # share of in-class images the default threshold may reject
MARGIN_Z = 0.84  # standard errors the threshold keeps below FRR on val: new images rejected under FRR 4 times in 5


def directions(pooled: torch.Tensor) -> torch.Tensor:
    """Pooled features (N, F) as kNN compares them: signed square roots, each row scaled to unit length, float32.

    The square root evens out a few large activations (it raised the AUROC on flowers from 0.94 to 0.96 over
    the plain last stage's directions).  Pure tensor code: the ONNX export computes it inside the graph."""
    x = pooled.float()
    x = torch.sign(x) * torch.sqrt(torch.abs(x))
    return x / x.square().sum(1, keepdim=True).sqrt().clamp_min(1e-12)  # not linalg.norm: both exporters take this


def kth_similarity(query: torch.Tensor, bank: torch.Tensor, k: int = K) -> torch.Tensor:
    """Similarity (N,) float32 of each row of ``query`` (N, F) to its k-th most similar row of ``bank`` (B, F;
    unit rows, any float type: a float16 bank is computed in float32); k is capped at B."""
    similarity = query.float() @ bank.float().T  # (N, B)
    return torch.topk(similarity, min(int(k), bank.shape[0]), dim=1).values[:, -1]


def score_tensor(score: str, logits: torch.Tensor, pooled: torch.Tensor | None = None, multilabel: bool = False,
                 bank: torch.Tensor | None = None, k: int = K) -> torch.Tensor:
    """The score named ``score`` (one of :data:`SCORES`), (N,), of images with ``logits`` (N, K), before any
    temperature, in their own precision, and (kNN) pooled features (N, F) against ``bank`` (B, F).

    The one definition of the scores: :func:`score_of` and :func:`logit_scores` compute them with it, and the
    ONNX export traces it into the graph (pure tensor code)."""
    if score == "knn":
        return kth_similarity(directions(pooled), bank, k)
    if score == "msp":
        return (torch.sigmoid(logits) if multilabel else torch.softmax(logits, 1)).max(1).values
    if score == "energy":
        return torch.logsumexp(logits, 1)
    raise ValueError(f"unknown out-of-distribution score {score!r}; choose one of: {', '.join(SCORES)}")


def feature_directions(pooled: np.ndarray) -> np.ndarray:
    """:func:`directions` of numpy features (N, F): float32 (N, F)."""
    return directions(torch.as_tensor(np.asarray(pooled, np.float32))).numpy()


def knn_score(query: np.ndarray, bank, k: int = K) -> np.ndarray:
    """Similarity (N,) float32 of each row of ``query`` (N, F) to its k-th most similar row of ``bank`` (B, F,
    array or tensor; both unit rows, as :func:`feature_directions` gives them): :func:`kth_similarity`, 1024
    images at a time."""
    bank = bank.float() if isinstance(bank, torch.Tensor) else torch.as_tensor(np.asarray(bank, np.float32))
    rows = torch.as_tensor(np.asarray(query, np.float32))
    out = [kth_similarity(rows[start:start + 1024], bank, k) for start in range(0, len(rows), 1024)]  # (1024, B)
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def logit_scores(logits: np.ndarray, multilabel: bool = False) -> dict[str, np.ndarray]:
    """``msp`` and ``energy`` (N,) float64 of logits (N, K)."""
    t = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    return {name: score_tensor(name, t, multilabel=multilabel).numpy() for name in ("msp", "energy")}


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """The probability that an in-class image scores above an out-of-class one (ties count one half)."""
    scores = np.concatenate([inside, outside]).astype(np.float64)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # average 1-based rank of each value
    n_in, n_out = len(inside), len(outside)
    return float((ranks[:n_in].sum() - n_in * (n_in + 1) / 2) / (n_in * n_out))


def threshold_at(inside: np.ndarray, frr: float = FRR, margin: float = MARGIN_Z) -> float:
    """The score below which ``frr`` of the in-class images fall, less ``margin`` standard errors of that share on
    ``len(inside)`` images: the images below it are rejected, and on new in-class images the share rejected stays
    under ``frr`` with about 80% confidence (``margin`` 0.84) rather than one time in two.  On 430 val images
    the quantile taken is 3.9% for 5%."""
    inside = np.asarray(inside, np.float64)
    share = max(frr - margin * np.sqrt(frr * (1 - frr) / max(len(inside), 1)), frr / 2)
    return float(np.quantile(inside, share, method="lower"))


def score_of(ood: dict, logits: np.ndarray, pooled: np.ndarray | None, multilabel: bool = False) -> np.ndarray:
    """The stored score (``meta["ood"]``: score, threshold, and for kNN its bank and k) of images with ``logits``
    (N, K) and pooled features (N, F); an image is "unknown" when it falls below ``ood["threshold"]``."""
    if ood["score"] == "knn":
        return knn_score(feature_directions(pooled), ood["bank"], int(ood["k"]))
    return logit_scores(logits, multilabel)[ood["score"]]


def entry_problem(entry, with_bank: bool = True) -> str | None:
    """What makes a stored ``ood`` entry unusable, in words, or None when predictions can use it: one of
    :data:`SCORES` with a finite threshold; with ``with_bank`` (a checkpoint's entry: the ONNX export's metadata
    holds none, its graph does), kNN's (B, F) tensor bank of finite features and a whole ``k`` of 1 or more."""
    def number(value, whole: bool = False) -> bool:
        kinds = int if whole else (int, float)
        return isinstance(value, kinds) and not isinstance(value, bool) and bool(np.isfinite(value))

    if not (isinstance(entry, dict) and entry.get("score") in SCORES and number(entry.get("threshold"))):
        return f"must name a score ({', '.join(SCORES)}) with a finite threshold"
    if with_bank and entry["score"] == "knn":
        bank, k = entry.get("bank"), entry.get("k")
        if not (isinstance(bank, torch.Tensor) and bank.ndim == 2 and len(bank) > 0 and bool(torch.isfinite(bank).all())
                and number(k, whole=True) and k >= 1):
            return "of score knn must hold a bank of features (a 2-d tensor of finite values) and k (1 or more)"
    return None


def entry_record(entry: dict) -> dict:
    """A stored ``ood`` entry as JSON (``ood.json``, the ONNX export's metadata): everything but the bank of
    features, whose size is given as ``bank_images``."""
    record = {k: v for k, v in entry.items() if k != "bank"}
    if entry.get("bank") is not None:
        record["bank_images"] = len(entry["bank"])
    return record


def choose(inside: dict[str, np.ndarray], outside: dict[str, np.ndarray], frr: float = FRR) -> dict:
    """Measure every score given in both ``inside`` (val) and ``outside``; keep the one with the highest AUROC.

    Returns:
        ``{"score", "threshold", "frr_target", "measured": {score: {"auroc", "far", "frr", "threshold"}}}``,
        FAR the share of out-of-class images accepted and FRR the share of val images rejected at the threshold.
    """
    measured = {}
    for name in (s for s in SCORES if s in inside and s in outside):
        t = threshold_at(inside[name], frr)
        measured[name] = {"auroc": round(auroc(inside[name], outside[name]), 4), "threshold": t,
                          "far": round(float(np.mean(outside[name] >= t)), 4),
                          "frr": round(float(np.mean(inside[name] < t)), 4)}
    best = max(measured, key=lambda s: measured[s]["auroc"])
    return {"score": best, "threshold": measured[best]["threshold"], "frr_target": frr, "measured": measured}
