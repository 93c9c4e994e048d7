"""Run histories on disk: JSON + CSV of every epoch's metrics and a PNG of the curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence

import pandas as pd


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
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(3.2 * max(1, len(keys)), 2.8), squeeze=False)
    for ax, k in zip(axes[0], keys):
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
