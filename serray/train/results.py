"""Leave-one-session-out results: metrics.json, a Markdown table, predictions CSV and PNG plots."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pandas as pd

from serray import storage
from serray.data.features import LABEL_INDEX
from serray.data.iemocap import LABELS
from serray.train.metrics import confusion

METRICS = ("ua", "wa", "macro_f1")
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


def summarise(folds: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Per-fold metrics plus mean and sample standard deviation (n - 1) over folds."""
    table = {k: np.array([f[k] for f in folds], dtype=float) for k in METRICS}
    return {"folds": [{k: f[k] for k in FOLD_KEYS if k in f} for f in folds],
            "mean": {k: float(np.nanmean(v)) for k, v in table.items()},
            "std": {k: _sample_sd(v) for k, v in table.items()}, "std_convention": SD_CONVENTION}


def markdown_table(summary: Dict[str, Any], title: str = "") -> str:
    """A paper-style table in percent: one row per fold and a mean ± sd (sample, n − 1) row."""
    lines = [f"### {title}", ""] if title else []
    lines += [f"| fold (test {summary.get('group_name', 'session')}) | n_test | UA % | WA % | macro-F1 % |",
              "|---|---:|---:|---:|---:|"]
    for f in summary["folds"]:
        lines.append(f"| {f['fold']} | {f['n_test']} | {100 * f['ua']:.2f} | {100 * f['wa']:.2f} | {100 * f['macro_f1']:.2f} |")
    m, s = summary["mean"], summary["std"]
    lines.append("| **mean ± sd** | {} | {:.2f} ± {:.2f} | {:.2f} ± {:.2f} | {:.2f} ± {:.2f} |".format(
        sum(f["n_test"] for f in summary["folds"]), 100 * m["ua"], 100 * s["ua"], 100 * m["wa"], 100 * s["wa"],
        100 * m["macro_f1"], 100 * s["macro_f1"]))
    lines += ["", "sd: sample standard deviation over folds (n − 1)."]
    return "\n".join(lines) + "\n"


def write_results(folds: List[Dict[str, Any]], out_dir: str | Path, extra: Dict[str, Any],
                  folds_dir: Optional[str] = None) -> Dict[str, Any]:
    """Write metrics.json, results.md, predictions.csv, confusion_matrix.png and learning_curves.png.

    The folds' ``fold<k>/predictions.csv`` are read from ``folds_dir`` (default ``out_dir``; a local
    path or a storage URI)."""

    out = Path(out_dir)
    src = folds_dir or str(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {**summarise(folds), **extra}
    storage.write_text(out / "metrics.json", json.dumps(summary, indent=2))
    storage.write_text(out / "results.md", markdown_table(summary, extra.get("title", "")))
    preds = read_fold_predictions(src, folds)
    preds.to_csv(out / "predictions.csv", index=False)
    cm = confusion([LABEL_INDEX[l] for l in preds["label"]], [LABEL_INDEX[l] for l in preds["pred"]], len(LABELS))
    _plot_confusion(cm, out / "confusion_matrix.png", summary)
    _plot_curves(folds, out / "learning_curves.png")
    return summary


def _plot_confusion(cm: np.ndarray, path: Path, summary: Dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(LABELS)), LABELS)
    ax.set_yticks(range(len(LABELS)), LABELS)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(LABELS)):
        for j in range(len(LABELS)):
            ax.text(j, i, f"{norm[i, j]:.2f}\n({cm[i, j]})", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    m = summary["mean"]
    ax.set_title(f"{summary.get('plot_title', 'LOSO, all folds')}: UA {100 * m['ua']:.1f}  WA {100 * m['wa']:.1f}  F1 {100 * m['macro_f1']:.1f}", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_curves(folds: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for f in folds:
        h = pd.DataFrame(f.get("history", []))
        if h.empty:
            continue
        axes[0].plot(h["epoch"], h["loss"], label=f"fold {f['fold']}")
        axes[1].plot(h["epoch"], h["val_ua"], label=f"fold {f['fold']}")
    axes[0].set_title("train loss", fontsize=9)
    axes[1].set_title("validation UA", fontsize=9)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
