"""Metrics of dimensional emotion (valence, arousal, dominance): the concordance correlation
coefficient (CCC, the MSP-Podcast challenge's ranking metric), Pearson r and MAE per dimension.

CCC is computed over a whole split at once (every test utterance of a fold), never averaged over
batches: ``2 cov(y, p) / (var y + var p + (mean y - mean p)^2)`` with population moments (n, not
n - 1). It is 1 for perfect agreement, 0 for constant predictions, -1 for mirrored ones, and it
penalises a bias or a wrong scale that Pearson r ignores. The training loss ``1 - CCC`` is the
same formula on one batch (:func:`ccc_loss`).
"""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
import torch


def ccc(y_true: Sequence[float], y_pred: Sequence[float]) -> float:
    """Lin's concordance correlation coefficient of two equally long vectors (nan when empty, and
    when both are constant and equal: no variance to agree on)."""
    y, p = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    if len(y) == 0:
        return float("nan")
    my, mp = y.mean(), p.mean()
    cov = np.mean((y - my) * (p - mp))
    denom = y.var() + p.var() + (my - mp) ** 2
    return float(2.0 * cov / denom) if denom > 0 else float("nan")


def pearson(y_true: Sequence[float], y_pred: Sequence[float]) -> float:
    """Pearson r (nan when either side is constant)."""
    y, p = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    if len(y) < 2 or y.std() == 0 or p.std() == 0:
        return float("nan")
    return float(np.mean((y - y.mean()) * (p - p.mean())) / (y.std() * p.std()))


def dimensional_metrics(y_true: np.ndarray, y_pred: np.ndarray, names: Sequence[str]) -> Dict[str, float]:
    """``ccc_<dim>``, ``pearson_<dim>``, ``mae_<dim>`` for every column and ``ccc_mean``.

    ``y_true`` / ``y_pred``: ``[N, len(names)]`` on one scale (MAE is in that scale's units)."""
    y_true, y_pred = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    out: Dict[str, float] = {}
    for j, name in enumerate(names):
        out[f"ccc_{name}"] = ccc(y_true[:, j], y_pred[:, j])
        out[f"pearson_{name}"] = pearson(y_true[:, j], y_pred[:, j])
        out[f"mae_{name}"] = float(np.mean(np.abs(y_true[:, j] - y_pred[:, j]))) if len(y_true) else float("nan")
    out["ccc_mean"] = float(np.mean([out[f"ccc_{n}"] for n in names]))
    return out


def ccc_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - CCC`` per column of ``[B, K]`` tensors, averaged over the K dimensions (population
    moments over the batch; a small epsilon keeps a constant batch finite)."""
    pred, target = pred.float(), target.float()
    mp, mt = pred.mean(0), target.mean(0)
    cov = ((pred - mp) * (target - mt)).mean(0)
    denom = pred.var(0, unbiased=False) + target.var(0, unbiased=False) + (mp - mt) ** 2
    return (1.0 - 2.0 * cov / (denom + 1e-8)).mean()
