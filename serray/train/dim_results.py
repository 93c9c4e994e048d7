"""LOSO results of a dimensional or multitask run: metrics.json, results.md (CCC per dimension, and
UA / WA / F1 for multitask), predictions.csv, a scatter plot of predicted vs true ratings per
dimension (``dimensions_scatter.png``) and the learning curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from serray.train.results import FOLD_KEYS, SD_CONVENTION, _plot_confusion, _sample_sd, read_fold_predictions


def metric_keys(names: Sequence[str], multitask: bool) -> List[str]:
    keys = [f"{m}_{n}" for n in names for m in ("ccc", "pearson", "mae")] + ["ccc_mean"]
    return keys + (["ua", "wa", "macro_f1"] if multitask else [])


def summarise(folds: List[Dict[str, Any]], keys: Sequence[str]) -> Dict[str, Any]:
    table = {k: np.array([f.get(k, np.nan) for f in folds], dtype=float) for k in keys}
    extra = [k for k in ("task", "dims_dropped") if k in (folds[0] if folds else {})]
    val = sorted({k for f in folds for k in f if k.startswith("val_ccc_")})
    return {"folds": [{k: f[k] for k in (*FOLD_KEYS, *keys, *val, *extra) if k in f} for f in folds],
            "mean": {k: float(np.nanmean(v)) for k, v in table.items()},
            "std": {k: _sample_sd(v) for k, v in table.items()}, "std_convention": SD_CONVENTION}


def markdown_table(summary: Dict[str, Any], names: Sequence[str], multitask: bool, title: str = "") -> str:
    lines = [f"### {title}", ""] if title else []
    head = [f"CCC {n}" for n in names] + ["CCC mean"] + (["UA %"] if multitask else [])
    lines += [f"| fold (test {summary.get('group_name', 'session')}) | n_test | " + " | ".join(head) + " |",
              "|---|---:|" + "---:|" * len(head)]
    keys = [f"ccc_{n}" for n in names] + ["ccc_mean"]

    def cells(get, fmt):
        out = [fmt(get(k), 1) for k in keys]
        return out + ([fmt(get("ua"), 100)] if multitask else [])

    for f in summary["folds"]:
        lines.append(f"| {f['fold']} | {f['n_test']} | " + " | ".join(cells(f.get, lambda v, s: f"{s * v:.3f}"
                                                                             if s == 1 else f"{s * v:.2f}")) + " |")
    m, sd = summary["mean"], summary["std"]
    means = [f"{m[k]:.3f} ± {sd[k]:.3f}" for k in keys] + ([f"{100 * m['ua']:.2f} ± {100 * sd['ua']:.2f}"] if multitask else [])
    lines.append(f"| **mean ± sd** | {sum(f['n_test'] for f in summary['folds'])} | " + " | ".join(means) + " |")
    lines += ["", "Pearson r / MAE (corpus scale), mean over folds: "
              + "; ".join(f"{n} {m[f'pearson_{n}']:.3f} / {m[f'mae_{n}']:.3f}" for n in names) + ".",
              "", "CCC over each fold's whole test split; sd: sample standard deviation over folds (n − 1)."]
    return "\n".join(lines) + "\n"


def write_dimensional_results(folds: List[Dict[str, Any]], out_dir: str | Path, extra: Dict[str, Any],
                              names: Sequence[str], multitask: bool, folds_dir: Optional[str] = None) -> Dict[str, Any]:
    """metrics.json, results.md, predictions.csv, dimensions_scatter.png, learning_curves.png (and
    confusion_matrix.png for multitask) of finished folds."""
    from serray import storage
    from serray.data.features import LABEL_INDEX
    from serray.data.iemocap import LABELS
    from serray.train.metrics import confusion

    out = Path(out_dir)
    src = folds_dir or str(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {**summarise(folds, metric_keys(names, multitask)), **extra, "dimensions": list(names)}
    storage.write_text(out / "metrics.json", json.dumps(summary, indent=2))
    storage.write_text(out / "results.md", markdown_table(summary, names, multitask, extra.get("title", "")))
    preds = read_fold_predictions(src, folds)
    preds.to_csv(out / "predictions.csv", index=False)
    _plot_scatter(preds, names, summary, out / "dimensions_scatter.png")
    if multitask:
        cm = confusion([LABEL_INDEX[lab] for lab in preds["label"]], [LABEL_INDEX[lab] for lab in preds["pred"]], len(LABELS))
        _plot_confusion(cm, out / "confusion_matrix.png", summary)
    _plot_curves(folds, out / "learning_curves.png")
    return summary


def _plot_scatter(preds: pd.DataFrame, names: Sequence[str], summary: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), squeeze=False)
    for ax, n in zip(axes[0], names):
        y, p = preds[n].to_numpy(float), preds[f"pred_{n}"].to_numpy(float)
        ax.scatter(y, p, s=8, alpha=0.6)
        lo, hi = float(np.nanmin([y.min(), p.min()])), float(np.nanmax([y.max(), p.max()]))
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
        ax.set_xlabel(f"true {n}", fontsize=8)
        ax.set_ylabel(f"predicted {n}", fontsize=8)
        ax.set_title(f"{n}: CCC {summary['mean'][f'ccc_{n}']:.3f} (fold mean)", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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
        if "val_ccc_mean" in h:
            axes[1].plot(h["epoch"], h["val_ccc_mean"], label=f"fold {f['fold']}")
    axes[0].set_title("train loss", fontsize=9)
    axes[1].set_title("validation CCC (mean over dimensions)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def loso_table(cfg, summary: Dict[str, Any], title: str = "") -> str:
    """The LOSO table of a run of ``cfg``'s task (the four-class table, or CCC per dimension)."""
    task = str(cfg.finetune.get("task", "categorical") or "categorical")
    if task == "categorical":
        from serray.train.results import markdown_table as categorical_table

        return categorical_table(summary, title)
    return markdown_table(summary, list(cfg.finetune.dimensions), task == "multitask", title)
