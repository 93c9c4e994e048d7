"""The paper's metrics, computed with scikit-learn: UA (mean per-class recall), WA (accuracy), macro-F1.

Classes absent from a fold's test labels are left out of UA and macro-F1 (sklearn's recall/F1
over the labels present in ``y_true``), so a test session lacking a class still gets defined metrics.
"""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int]) -> Dict[str, float]:
    """UA, WA and macro-F1 of integer labels (over the classes present in ``y_true``)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) == 0:
        return {"ua": float("nan"), "wa": float("nan"), "macro_f1": float("nan")}
    present = np.unique(y_true)
    return {
        "ua": float(balanced_accuracy_score(y_true, y_pred)),
        "wa": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
    }


def class_index(classes: Sequence[str]) -> Dict[str, int]:
    """Class name -> its output index (``classes`` in index order)."""
    return {label: i for i, label in enumerate(classes)}


def confusion(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """Raw confusion counts [true, pred]."""
    return confusion_matrix(y_true, y_pred, labels=list(range(num_classes)))
