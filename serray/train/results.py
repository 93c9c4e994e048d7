"""What the leave-one-session-out results of every task share (:mod:`serray.train.tasks`): the folds'
predictions read back, the per-fold keys, the sample standard deviation, the confusion-matrix and learning-curve plots.
Each task writes its own metrics.json, results.md, predictions.csv and plots
(:meth:`serray.train.tasks.Task.write_results`)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np
import pandas as pd

from serray import storage
from serray.data.corpora.base import LABELS

FOLD_KEYS = ("fold", "test_session", "ua", "wa", "macro_f1", "n_test", "n_train", "n_val", "best_epoch", "val_ua",
             "val_loss", "epochs_run", "classes_in_test", "seed", "protocol", "pretrain_sessions", "stats_sessions",
             "val_speakers", "test_evaluations")


SD_CONVENTION = "sample standard deviation over folds (n - 1)"  # as the ablation's sd over runs


#: columns that are names, never numbers (EmoDB's speaker "03", a CSV corpus's "0042" utterance id)
ID_COLUMNS = {"utt_id": str, "speaker": str}


def read_fold_predictions(src: str, folds: List[Dict[str, Any]]) -> pd.DataFrame:
    """The folds' ``fold<k>/predictions.csv`` under ``src`` (a path or storage URI), one frame; ids as names."""
    return pd.concat([pd.read_csv(io.StringIO(storage.read_text(storage.join(src, f"fold{f['fold']}", "predictions.csv"))),
                                  dtype=ID_COLUMNS) for f in folds], ignore_index=True)


def _sample_sd(v: np.ndarray) -> float:
    v = v[~np.isnan(v)]
    return float(v.std(ddof=1)) if len(v) > 1 else 0.0


def _plot_confusion(cm: np.ndarray, path: Path, summary: Dict[str, Any], labels: Sequence[str] = LABELS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    labels = list(labels)
    grow = max(0, len(labels) - 4) * 0.55  # room for more classes; the four-class figure as it was
    fig, ax = plt.subplots(figsize=(4.2 + grow, 3.8 + grow))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, f"{norm[i, j]:.2f}\n({cm[i, j]})", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    m = summary["mean"]
    ax.set_title(f"{summary.get('plot_title', 'LOSO, all folds')}: UA {100 * m['ua']:.1f}  WA {100 * m['wa']:.1f}  F1 {100 * m['macro_f1']:.1f}", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(folds: List[Dict[str, Any]], path: Path, metric: str, title: str) -> None:
    """Each fold's training loss and validation ``metric`` per epoch (``learning_curves.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for f in folds:
        h = pd.DataFrame(f.get("history", []))
        if h.empty:
            continue
        axes[0].plot(h["epoch"], h["loss"], label=f"fold {f['fold']}")
        if metric in h:
            axes[1].plot(h["epoch"], h[metric], label=f"fold {f['fold']}")
    axes[0].set_title("train loss", fontsize=9)
    axes[1].set_title(title, fontsize=9)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
