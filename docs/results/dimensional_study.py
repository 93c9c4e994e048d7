"""The dimensional-emotion study of docs/dimensional.md: the default synthetic corpus, leave-one-session-out
(5 folds), training seeds 0-2, one run per task (categorical / dimensional / multitask), then

* CCC (and Pearson r, MAE) per dimension for dimensional and multitask, over the 15 seed x fold runs;
* multitask vs dimensional on CCC, multitask vs categorical on UA: the run-level paired statistics of
  serray.train.stats / serray.train.tasks.dimensional (sign-flip over runs, two-level bootstrap interval).

The runs: seed 0 is `serray pipeline` (per-fold pre-training, then fine-tuning); seeds 1 and 2
fine-tune from seed 0's per-fold adapters (the pre-training seed stays 0, the fine-tuning seed
varies), each task from the same adapter of its fold (2-core machine: ~12 min, then ~7 min a task):

    C=runs/m-s0; base="data.root=$C/synthetic/IEMOCAP_full_release features.dir=$C/features data.manifest=$C/manifest.parquet"
    serray pipeline output_dir=$C seed=0 $base
    serray finetune output_dir=$C seed=0 $base finetune.task=dimensional finetune.dir=$C/finetune-dimensional  # and multitask
    for s in 1 2; do O=runs/m-s$s; for t in categorical dimensional multitask; do
      serray finetune output_dir=$O seed=$s $base finetune.init_from=$PWD/$C/pretrain/fold{fold}/adapter \
        finetune.task=$t finetune.dir=$O/finetune-$t   # (categorical: finetune.dir=$O/finetune)
    done; done
    python docs/results/dimensional_study.py runs   # prints the tables of docs/dimensional.md, writes dimensional.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from serray.train.stats import run_level_test, run_metrics
from serray.train.tasks.dimensional import run_level_test_ccc, run_metrics_ccc

DIMS = ["valence", "arousal", "dominance"]
SEEDS = [0, 1, 2]


def _preds(root: Path, task: str, seeds=SEEDS) -> pd.DataFrame:
    sub = "finetune" if task == "categorical" else f"finetune-{task}"
    return pd.concat([pd.read_csv(root / f"m-s{s}" / sub / "predictions.csv") for s in seeds], ignore_index=True)


def _ms(v) -> str:
    v = np.asarray(v, float)
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}"


def main(root: Path, seeds=SEEDS, write: bool = True) -> None:
    preds = {t: _preds(root, t, seeds) for t in ("categorical", "dimensional", "multitask")}
    out = {"seeds": list(seeds), "folds": sorted(preds["categorical"]["fold"].unique().tolist()), "tasks": {}}
    lines = ["# Dimensional study: CCC per dimension and what multitask does to UA", "",
             "Default synthetic corpus (200 utterances, 170 four-class), leave-one-session-out, training seeds "
             f"{list(seeds)}; mean ± sd over the {len(seeds) * len(out['folds'])} seed x fold runs (each run: CCC over its fold's "
             "whole test split).", "",
             "| task | " + " | ".join(f"CCC {d}" for d in DIMS) + " | CCC mean | Pearson r (V / A / D) | MAE (V / A / D, 1-5) | UA % |",
             "|---|" + "---:|" * (len(DIMS) + 4)]
    for task in ("dimensional", "multitask", "categorical"):
        p = preds[task]
        row = {}
        if task != "categorical":
            runs = run_metrics_ccc(p, DIMS)
            row.update({f"ccc_{d}": [r[f"ccc_{d}"] for r in runs] for d in DIMS})
            row["ccc_mean"] = [r["ccc_mean"] for r in runs]
            from serray.train.tasks.dimensional import dimensional_metrics

            per = [dimensional_metrics(g[DIMS].to_numpy(), g[[f"pred_{d}" for d in DIMS]].to_numpy(), DIMS)
                   for _, g in p.groupby(["seed", "fold"])]
            row.update({f"{m}_{d}": [x[f"{m}_{d}"] for x in per] for m in ("pearson", "mae") for d in DIMS})
        if "pred" in p.columns:
            row["ua"] = [r["ua"] for r in run_metrics(p[["seed", "fold", "utt_id", "label", "pred"]])]
        out["tasks"][task] = {k: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)), "runs": list(map(float, v))}
                              for k, v in row.items()}
        cells = [(_ms(row[f"ccc_{d}"]) if f"ccc_{d}" in row else "-") for d in DIMS]
        cells.append(_ms(row["ccc_mean"]) if "ccc_mean" in row else "-")
        cells.append(" / ".join(f"{np.mean(row[f'pearson_{d}']):.3f}" for d in DIMS) if "pearson_valence" in row else "-")
        cells.append(" / ".join(f"{np.mean(row[f'mae_{d}']):.3f}" for d in DIMS) if "mae_valence" in row else "-")
        cells.append(f"{100 * np.mean(row['ua']):.2f} ± {100 * np.std(row['ua'], ddof=1):.2f}" if "ua" in row else "-")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines += ["", "Per fold (test session), mean over the seeds:", "",
              "| task | fold | " + " | ".join(f"CCC {d}" for d in DIMS) + " | UA % |", "|---|---:|" + "---:|" * 4]
    for task in ("dimensional", "multitask"):
        runs = pd.DataFrame(run_metrics_ccc(preds[task], DIMS))
        ua = pd.DataFrame(run_metrics(preds[task][["seed", "fold", "utt_id", "label", "pred"]])) if task == "multitask" else None
        for fold, g in runs.groupby("fold"):
            u = f"{100 * ua[ua['fold'] == fold]['ua'].mean():.2f}" if ua is not None else "-"
            lines.append(f"| {task} | {fold} | " + " | ".join(f"{g[f'ccc_{d}'].mean():.3f}" for d in DIMS) + f" | {u} |")
    comps = []
    for metric in ("ccc_mean", *(f"ccc_{d}" for d in DIMS)):
        c = run_level_test_ccc(preds["multitask"], preds["dimensional"], metric, DIMS, n_boot=2000, seed=0)
        comps.append({"a": "multitask", "b": "dimensional", **c})
    cat = preds["categorical"][["seed", "fold", "utt_id", "label", "pred"]]
    mt = preds["multitask"][["seed", "fold", "utt_id", "label", "pred"]]
    c = run_level_test(mt, cat, "ua", n_boot=2000, seed=0)
    comps.append({"a": "multitask", "b": "categorical", "metric": "ua", **c})
    out["comparisons"] = comps
    lines += ["", f"Paired over the {len(seeds) * len(out['folds'])} seed x fold runs (run-level sign-flip p; 95 % interval: two-level bootstrap):", "",
              "| comparison | metric | Δ (A − B) | 95 % interval | p | runs A > B / A < B |", "|---|---|---:|---:|---:|---:|"]
    for c in comps:
        scale = 100 if c["metric"] == "ua" else 1
        fmt = "{:+.2f}" if scale == 100 else "{:+.3f}"
        lines.append(f"| {c['a']} vs {c['b']} | {c['metric']}{' (points)' if scale == 100 else ''} | "
                     f"{fmt.format(scale * c['delta'])} | [{fmt.format(scale * c['ci95'][0])}, {fmt.format(scale * c['ci95'][1])}] "
                     f"| {c['p_value']:.3f} | {c['wins']} / {c['losses']} |")
    if write:
        (Path(__file__).parent / "dimensional.json").write_text(json.dumps(out, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs"),
         [int(x) for x in sys.argv[2].split(",")] if len(sys.argv) > 2 else SEEDS)
