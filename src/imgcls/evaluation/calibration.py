"""Confidence calibration: temperature scaling, expected calibration error, reliability diagrams.

Temperature scaling (Guo et al., 2017, "On Calibration of Modern Neural Networks")
divides every logit by one scalar T > 0 fitted on held-out data.  It changes the
confidence of each prediction, never its argmax, so accuracy is untouched.
Fit T on the validation split and judge it on the test split.
"""

from __future__ import annotations

import math

import numpy as np

_LOG_T_BOUNDS = (-3.0, 3.0)  # T in [e^-3, e^3] ~ [0.05, 20]


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Softmax probabilities (N, K) of logits (N, K) divided by ``temperature``, in float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of ``labels`` under softmax(logits / T), via log-sum-exp."""
    z = logits / temperature
    m = z.max(axis=1)
    log_norm = m + np.log(np.exp(z - m[:, None]).sum(axis=1))
    return float((log_norm - z[np.arange(len(labels)), labels]).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T > 0 that minimises the NLL of softmax(logits / T).

    Optimises log T over [-3, 3] (a bounded scalar search, deterministic).

    Args:
        logits: float (N, K), before any temperature, on held-out data.
        labels: int (N,), the true classes.

    Returns:
        T rounded to 4 decimals; 1.0 when there are no images or only one class is present
        (the NLL would then reward ever larger confidence and say nothing about calibration).
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    _check(logits, labels, "logits")
    if len(labels) == 0 or len(np.unique(labels)) < 2:
        return 1.0
    log_t = golden_section(lambda x: _nll(logits, labels, math.exp(x)), *_LOG_T_BOUNDS, tol=1e-6)
    return round(math.exp(log_t), 4)


def golden_section(f, low: float, high: float, tol: float) -> float:
    """The x in [low, high] that minimises a unimodal ``f``, to within ``tol`` (golden-section search).

    The NLL of temperature-scaled logits is convex in 1/T, so unimodal in log T.
    (SciPy's bounded Brent did this before; importing scipy.optimize took 0.3 s of every run's report.)
    """
    ratio = (math.sqrt(5) - 1) / 2
    a, b = low, high
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(d)
    return (a + b) / 2


def reliability_bins(proba: np.ndarray, labels: np.ndarray, bins: int = 15) -> dict:
    """Accuracy against confidence in equal-width bins of the top probability.

    Bin i holds the images whose confidence (max probability) lies in
    (i / bins, (i + 1) / bins]; a confidence of exactly 0 goes to bin 0.

    Args:
        proba: class probabilities, float (N, K).
        labels: true labels, int (N,).
        bins: number of bins over [0, 1].

    Returns:
        ``edges`` (bins + 1 floats) and per-bin lists ``confidence`` (mean top probability),
        ``accuracy`` (fraction whose argmax is right) and ``count``; an empty bin has count 0
        and None for confidence and accuracy.
    """
    proba = np.asarray(proba, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    _check(proba, labels, "proba")
    if bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    edges = np.linspace(0.0, 1.0, bins + 1)
    conf = proba.max(axis=1) if len(proba) else np.zeros(0)
    correct = (proba.argmax(axis=1) == labels) if len(proba) else np.zeros(0, dtype=bool)
    which = np.searchsorted(edges[1:-1], conf, side="left")  # (lo, hi] bins
    out = {"edges": edges.tolist(), "confidence": [], "accuracy": [], "count": []}
    for b in range(bins):
        mask = which == b
        n = int(mask.sum())
        out["count"].append(n)
        out["confidence"].append(float(conf[mask].mean()) if n else None)
        out["accuracy"].append(float(correct[mask].mean()) if n else None)
    return out


def expected_calibration_error(proba: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE: sum over bins of (bin count / N) * |accuracy - mean confidence| (0 for no images).

    Bins as in :func:`reliability_bins`.
    """
    rel = reliability_bins(proba, labels, bins)
    total = sum(rel["count"])
    if total == 0:
        return 0.0
    return float(sum(n / total * abs(a - c)
                     for n, a, c in zip(rel["count"], rel["accuracy"], rel["confidence"]) if n))


def _check(scores: np.ndarray, labels: np.ndarray, name: str) -> None:
    if scores.ndim != 2 or labels.ndim != 1 or len(scores) != len(labels):
        raise ValueError(f"{name} must be (N, K) and labels (N,); got {scores.shape} and {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= scores.shape[1]):
        raise ValueError(f"labels must lie in [0, {scores.shape[1] - 1}] for {scores.shape[1]} classes; "
                         f"got values from {labels.min()} to {labels.max()}")
