"""Run histories on disk: JSON + CSV of every epoch's metrics and a PNG of the curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence

import pandas as pd


def grid_shape(n: int, max_cols: int = 4) -> tuple:
    """(rows, columns) of a panel grid a person reads at a glance: at most ``max_cols`` wide."""
    cols = max(1, min(max_cols, n))
    return max(1, -(-n // cols)), cols


def write_history(history: List[Dict[str, float]], out_dir: str | Path, keys: Sequence[str], title: str) -> Path:
    """Write ``history.json``, ``history.csv`` and ``curves.png`` (one panel per key) into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "history.json").write_text(json.dumps(history, indent=2))
    df = pd.DataFrame(history)
    df.to_csv(out / "history.csv", index=False)
    keys = [k for k in keys if k in df.columns]
    rows, cols = grid_shape(len(keys))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= len(keys):
            ax.set_axis_off()
            continue
        k = keys[i]
        ax.plot(df["epoch"], df[k], marker="o", ms=3)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
