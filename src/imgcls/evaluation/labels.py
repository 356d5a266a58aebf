"""Likely label errors from out-of-sample predicted probabilities: confident learning (Northcutt, Jiang and
Chuang, "Confident Learning: Estimating Uncertainty in Dataset Labels", JAIR 70, 2021).

    thresholds t_j        the mean probability of class j over the images labelled j (per-class, so a class
                          the model is less sure of is judged by its own standard)
    confident joint C     C[i, j] counts images labelled i whose probability of j is at least t_j (the largest
                          such j when several are), calibrated so that each row sums to the count of label i
    prune by noise rate   for every off-diagonal (i, j), the round(C[i, j]) images labelled i with the largest
                          margin p_j - p_i are flagged; an image whose most probable class is its label is not

Flags are ranked by self-confidence: the lower an image's probability of its own label, the likelier it is
mislabelled.  The probabilities must be out-of-sample (each image scored by a model that never saw it): a
model scores its own training images too confidently.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class LabelIssues:
    """Confident learning's verdict, one entry per image."""

    flagged: np.ndarray  # bool (N,): likely mislabelled
    score: np.ndarray  # float (N,): 1 - the probability of the given label (higher: likelier wrong)
    suggested: np.ndarray  # int (N,): the most probable class other than the given label
    confident_joint: np.ndarray  # int (K, K): calibrated counts, rows the given labels, columns the likely true ones


def per_class_thresholds(labels: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """t_j: the mean probability of class j over the images labelled j, shape (K,) (1.0 for a class without any)."""
    k = proba.shape[1]
    return np.array([proba[labels == j, j].mean() if (labels == j).any() else 1.0 for j in range(k)])


def confident_joint(labels: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """The calibrated confident joint, int (K, K) (see the module docstring)."""
    n, k = proba.shape
    above = proba >= per_class_thresholds(labels, proba)[None, :] - 1e-6
    confident = np.where(above.any(1), np.where(above, proba, -1.0).argmax(1), -1)
    joint = np.zeros((k, k), np.float64)
    keep = confident >= 0
    np.add.at(joint, (labels[keep], confident[keep]), 1)
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    rows = joint.sum(1, keepdims=True)
    joint = np.where(rows > 0, joint / np.maximum(rows, 1) * counts[:, None], 0.0)
    joint *= n / max(joint.sum(), 1e-12)
    return np.rint(joint).astype(np.int64)


def find_label_issues(labels: np.ndarray, proba: np.ndarray) -> LabelIssues:
    """Confident learning on out-of-sample ``proba`` (N, K) for integer ``labels`` (N,)."""
    labels = np.asarray(labels, np.int64)
    n, k = proba.shape
    joint = confident_joint(labels, proba)
    flagged = np.zeros(n, bool)
    for i in range(k):
        mine = np.flatnonzero(labels == i)
        for j in range(k):
            count = int(joint[i, j]) if i != j else 0
            if count <= 0 or not len(mine):
                continue
            margin = proba[mine, j] - proba[mine, i]
            flagged[mine[np.argsort(-margin, kind="stable")[:count]]] = True
    flagged &= proba.argmax(1) != labels
    own = proba[np.arange(n), labels]
    others = proba.copy()
    others[np.arange(n), labels] = -1.0
    return LabelIssues(flagged=flagged, score=1.0 - own, suggested=others.argmax(1), confident_joint=joint)
