"""Dimensional emotion (``finetune.task: dimensional | multitask``): its metrics, its fine-tuning, its
LOSO results and its run-level statistics, and :class:`Dimensional`, the task they make up.

The same folds, splits, body and loop as the four-class task (:mod:`serray.train.finetune`); what
changes is the target and the head:

* the targets are the corpus's valence / arousal / dominance ratings (the manifest's ``valence``,
  ``activation``, ``dominance`` columns) mapped to [0, 1] from the scale the corpus declares
  (:attr:`serray.data.corpora.base.Corpus.dimension_range`: IEMOCAP 1-5, MSP-Podcast 1-7); an utterance
  whose rating is missing or outside the scale is dropped from its split and counted per group;
* the loss is ``1 - CCC`` per dimension (``finetune.dim_loss: mse`` for mean squared error), plus the
  weighted cross-entropy of the class head for ``multitask`` (``finetune.dim_loss_weight`` weighs the
  dimensional part);
* the epoch is selected on ``finetune.select_metric`` (default: ``val_ccc_mean`` for dimensional,
  ``val_ua`` for multitask), computed on the fold's validation part only;
* the test split is scored once with CCC, Pearson r and MAE per dimension over all its utterances
  (:func:`dimensional_metrics`), on the corpus's original scale.

The dimensional task uses the four-class utterances of the categorical task (the same splits), so a
multitask run's UA is comparable fold by fold with a categorical one.

Sections: metrics (CCC, Pearson r, MAE); fine-tuning (targets, :class:`DimensionalTask`); LOSO results
(metrics.json, results.md, predictions.csv, plots); run-level statistics of CCC (the ablation); the task.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from serray import storage
from serray.data.corpora.base import DIMENSION_COLUMNS
from serray.data.corpora import classes_of
from serray.data.features.training import PadCollate
from serray.data.corpora.base import LABELS
from serray.errors import DataError
from serray.train.ablation_report import DEFAULT_COMPARISONS, _plain, _sort_key
from serray.train.loop import eval_batches
from serray.train.metrics import class_index, classification_metrics, confusion
from serray.train.results import FOLD_KEYS, SD_CONVENTION, _plot_confusion, _sample_sd, plot_curves, read_fold_predictions
from serray.train.stats import FOLD_LEVEL_TEST, RUN_LEVEL_TEST, scoped_inference, scoped_verdicts, summarise_runs
from serray.train.tasks import Task, task_name
from serray.train.tasks.categorical import FinetuneTask, cv_estimate

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ metrics
# Metrics of dimensional emotion (valence, arousal, dominance): the concordance correlation
# coefficient (CCC, the MSP-Podcast challenge's ranking metric), Pearson r and MAE per dimension.
#
# CCC is computed over a whole split at once (every test utterance of a fold), never averaged over
# batches: ``2 cov(y, p) / (var y + var p + (mean y - mean p)^2)`` with population moments (n, not
# n - 1). It is 1 for perfect agreement, 0 for constant predictions, -1 for mirrored ones, and it
# penalises a bias or a wrong scale that Pearson r ignores. The training loss ``1 - CCC`` is the
# same formula on one batch (:func:`ccc_loss`).


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


# ------------------------------------------------------------------ fine-tuning


def select_metric(cfg) -> str:
    """The validation metric that picks a fold's epoch (and the registry's fold model)."""
    chosen = cfg.finetune.get("select_metric")
    if chosen:
        return str(chosen)
    return "val_ccc_mean" if task_name(cfg) == "dimensional" else "val_ua"


def dimension_range(cfg) -> Tuple[float, float]:
    """The corpus's declared rating scale (config validation guarantees one for these tasks)."""
    from serray.data import corpora

    corpus = corpora.get(str(cfg.data.corpus))
    if corpus.dimension_range is None:
        raise DataError(f"corpus {corpus.name} declares no emotion dimensions; finetune.task={task_name(cfg)} needs "
                        "them (use finetune.task=categorical)")
    return tuple(float(v) for v in corpus.dimension_range)


def read_dimensions(cfg) -> pd.DataFrame:
    """``utt_id`` + one column per ``finetune.dimensions`` (original scale) from the manifest."""
    names = list(cfg.finetune.dimensions)
    path = str(cfg.data.manifest)
    if not storage.is_file(path):
        raise DataError(f"finetune.task={task_name(cfg)} reads the V/A/D ratings from the manifest, and there is none at "
                        f"{storage.describe(path)} (run `serray manifest` or `serray featurize`)")
    columns = ["utt_id", *(DIMENSION_COLUMNS[n] for n in names)]
    df = storage.parquet_file(path).read(columns=columns).to_pandas()
    return df.rename(columns={DIMENSION_COLUMNS[n]: n for n in names})


def attach_dimensions(cfg, split: Dict[str, pd.DataFrame]) -> Tuple[Dict[str, pd.DataFrame], Dict[str, Dict[int, int]]]:
    """The split with each row's ratings (original scale) as columns; rows whose ratings are missing or
    outside the corpus's scale dropped, and counted per split and fold group."""
    names = list(cfg.finetune.dimensions)
    lo, hi = dimension_range(cfg)
    dims = read_dimensions(cfg)
    out, dropped = {}, {}
    for part, rows in split.items():
        rows = rows.drop(columns=[n for n in names if n in rows.columns]).merge(dims, on="utt_id", how="left")
        values = rows[names].to_numpy(dtype=np.float64)
        ok = np.isfinite(values).all(axis=1) & (values >= lo).all(axis=1) & (values <= hi).all(axis=1)
        if (~ok).any():
            dropped[part] = {int(g): int(n) for g, n in rows.loc[~ok, "session"].value_counts().sort_index().items()}
            log.warning("%s split: %d utterance(s) without valid %s ratings in [%g, %g] dropped (per group: %s)",
                        part, int((~ok).sum()), "/".join(names), lo, hi, dropped[part])
        out[part] = rows[ok].reset_index(drop=True)
    return out, dropped


def scaled_targets(rows: pd.DataFrame, names: Sequence[str], scale: Tuple[float, float]) -> Dict[str, List[float]]:
    """utt_id -> ratings mapped to [0, 1]."""
    lo, hi = scale
    values = (rows[list(names)].to_numpy(dtype=np.float64) - lo) / (hi - lo)
    return {u: [float(x) for x in v] for u, v in zip(rows["utt_id"], values)}


class TargetCollate(PadCollate):
    """:class:`PadCollate` plus ``targets`` [B, K] looked up by utterance id."""

    def __init__(self, targets: Dict[str, List[float]], *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.targets = targets

    def __call__(self, batch):
        out = super().__call__(batch)
        out["targets"] = torch.tensor([self.targets[str(u)] for u in batch["utt_id"]], dtype=torch.float32)
        return out


class DimensionalTask(FinetuneTask):
    """Fine-tuning of the dimensional or multitask model (see the module docstring)."""

    def __init__(self, config: Dict[str, Any]):
        super().__init__(config)
        self.multitask = config["model"]["task"] == "multitask"

    def collate(self, train: bool, epoch: int = 0) -> PadCollate:
        return TargetCollate(self.config["targets"], self.config["max_frames"] if train else None, random_crop=train,
                             seed=self.config.get("run_seed", self.config["seed"]) * 1000 + epoch)

    def _dim_loss(self, dims: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.config["dim_loss"] == "mse":
            return F.mse_loss(dims.float(), targets)
        return ccc_loss(dims, targets)

    def step(self, model, batch, step: int, rank: int = 0):
        out = model(batch["x"], batch["padding_mask"])
        targets = batch["targets"].to(out["dims"].device)
        dim_loss = self._dim_loss(out["dims"], targets)
        record = {"dim_loss": float(dim_loss.detach())}
        loss = dim_loss
        if self.multitask:
            weight = None if self.weight is None else self.weight.to(out["logits"].device)
            ce = F.cross_entropy(out["logits"].float(), batch["labels"], weight=weight)
            loss = ce + self.config["dim_loss_weight"] * dim_loss
            record["ce_loss"] = float(ce.detach())
        record["loss"] = float(loss.detach())
        return loss, record

    @torch.no_grad()
    def evaluate(self, model, core, rt, epoch: int) -> Dict[str, float]:
        """CCC / Pearson r / MAE per dimension over the whole validation part (and UA / WA / F1 for
        multitask); the loss is the training objective on the whole part (under inner cross-validation:
        the inner folds' estimate, as :meth:`FinetuneTask.evaluate`)."""
        if self.config.get("cv_curve"):
            return cv_estimate(self.config["cv_curve"], epoch)
        core.eval()
        if self._val_rows is None:
            self._val_rows = rt.rows("val")
        ys, preds, dims, targets = [], [], [], []
        for batch in eval_batches(self._val_rows, self.config["batch_size"], self.collate(train=False)):
            out = core(batch["x"].to(rt.device), batch["padding_mask"].to(rt.device))
            dims.append(out["dims"].float().cpu())
            targets.append(batch["targets"])
            if self.multitask:
                ys.append(batch["labels"].numpy())
                preds.append(out["logits"].float().argmax(-1).cpu().numpy())
        d, t = torch.cat(dims), torch.cat(targets)
        names = self.config["dimensions"]
        metrics = {f"val_{k}": v for k, v in dimensional_metrics(t.numpy(), d.numpy(), names).items()}
        val_loss = float(self._dim_loss(d, t))
        if self.multitask:
            m = classification_metrics(np.concatenate(ys), np.concatenate(preds))
            metrics.update(val_ua=m["ua"], val_wa=m["wa"], val_macro_f1=m["macro_f1"])
        metrics["val_loss"] = val_loss
        return metrics

    def checkpoint_meta(self, core, step: int, epoch: int) -> Dict[str, Any]:
        return {**super().checkpoint_meta(core, step, epoch), "task": self.config["model"]["task"],
                "dimensions": {"names": list(self.config["dimensions"]), "scale": list(self.config["dim_scale"])}}


def loop_config(cfg, split: Dict[str, pd.DataFrame], model_kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The dimensional keys of a fold's loop config (targets of the training and validation rows only:
    the test split's ratings never reach training)."""
    names = list(cfg.finetune.dimensions)
    scale = dimension_range(cfg)
    targets = {**scaled_targets(split["train"], names, scale), **scaled_targets(split["val"], names, scale)}
    return {"model": {**model_kwargs, "task": task_name(cfg), "num_dims": len(names)}, "targets": targets,
            "dimensions": names, "dim_scale": list(scale), "dim_loss": str(cfg.finetune.dim_loss),
            "dim_loss_weight": float(cfg.finetune.dim_loss_weight), "select_metric": select_metric(cfg)}


def test_metrics(cfg, preds: pd.DataFrame, test_rows: pd.DataFrame) -> Tuple[pd.DataFrame, Dict[str, float]]:
    """The test predictions with the true ratings beside the predicted ones (both on the corpus's
    scale), and their metrics over the whole split (plus UA / WA / F1 for multitask)."""
    names = list(cfg.finetune.dimensions)
    preds = preds.merge(test_rows[["utt_id", *names]], on="utt_id", how="left")
    m = dimensional_metrics(preds[names].to_numpy(), preds[[f"pred_{n}" for n in names]].to_numpy(), names)
    if "pred" in preds.columns:
        index = class_index(classes_of(cfg))
        m.update(classification_metrics([index[lab] for lab in preds["label"]], [index[lab] for lab in preds["pred"]]))
    return preds, m


# ------------------------------------------------------------------ LOSO results
# LOSO results of a dimensional or multitask run: metrics.json, results.md (CCC per dimension, and
# UA / WA / F1 for multitask), predictions.csv, a scatter plot of predicted vs true ratings per
# dimension (``dimensions_scatter.png``) and the learning curves.


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
                              names: Sequence[str], multitask: bool, folds_dir: Optional[str] = None,
                              classes: Sequence[str] = LABELS) -> Dict[str, Any]:
    """metrics.json, results.md, predictions.csv, dimensions_scatter.png, learning_curves.png (and
    confusion_matrix.png for multitask) of finished folds."""
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
        index = class_index(classes)
        cm = confusion([index[lab] for lab in preds["label"]], [index[lab] for lab in preds["pred"]], len(classes))
        _plot_confusion(cm, out / "confusion_matrix.png", summary, classes)
    plot_curves(folds, out / "learning_curves.png", "val_ccc_mean", "validation CCC (mean over dimensions)")
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


# ------------------------------------------------------------------ run-level statistics of CCC
# Run-level statistics of CCC (dimensional emotion), the same as :mod:`serray.train.stats` gives UA.
#
# A *dimensional predictions frame* has ``seed``, ``fold``, ``utt_id`` and, per dimension ``d``, the
# true rating ``d`` and the prediction ``pred_d`` (what a dimensional / multitask fold writes to its
# ``predictions.csv``). A run is one (seed, fold); its metric is the CCC of one dimension over the
# fold's whole test split (``ccc_<d>``), or ``ccc_mean`` over the dimensions.
#
# :func:`run_level_test_ccc` is :func:`serray.train.stats.run_level_test` for these metrics: the
# sign-flip permutation p over the runs' paired differences, and a two-level bootstrap interval (runs,
# then each drawn run's test utterances, resampled with replacement -- one draw per fold shared by
# both arms and every seed, so the pairing holds; no stratification: there are no classes).


def _weighted_ccc(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """CCC of ``y``, ``p`` (n,) (or p (S, n)) under utterance counts ``w`` (B, n): (B,) or (B, S)."""
    tot = w.sum(axis=1, keepdims=True)
    wn = w / tot  # (B, n)
    my = wn @ y  # (B,)
    vy = wn @ (y * y) - my**2
    p2 = np.atleast_2d(p)  # (S, n)
    mp = wn @ p2.T  # (B, S)
    vp = wn @ (p2 * p2).T - mp**2
    cov = wn @ (y[:, None] * p2.T) - my[:, None] * mp
    denom = vy[:, None] + vp + (my[:, None] - mp) ** 2
    out = np.where(denom > 0, 2 * cov / np.where(denom > 0, denom, 1.0), np.nan)
    return out if p.ndim == 2 else out[:, 0]


def run_metrics_ccc(preds: pd.DataFrame, names: Sequence[str]) -> List[Dict[str, Any]]:
    """``ccc_<d>`` of every dimension and ``ccc_mean`` for every (seed, fold) run."""
    runs = []
    for (seed, fold), g in preds.groupby(["seed", "fold"], sort=True):
        r = {"seed": int(seed), "fold": int(fold), "n_test": int(len(g))}
        for n in names:
            r[f"ccc_{n}"] = ccc(g[n], g[f"pred_{n}"])
        r["ccc_mean"] = float(np.mean([r[f"ccc_{n}"] for n in names]))
        runs.append(r)
    return runs


def _fold_arrays(preds_a: pd.DataFrame, preds_b: pd.DataFrame, dims: Sequence[str]):
    """Per fold: true ratings (n, K), predictions of both arms (S, n, K), utterances and seeds in one order."""
    out = []
    key = ["seed", "fold", "utt_id"]
    a, b = preds_a.sort_values(key), preds_b.sort_values(key)
    if not a[key].reset_index(drop=True).equals(b[key].reset_index(drop=True)):
        raise ValueError("the two arms do not hold the same (seed, fold, utterance) rows")
    for fold, ga in a.groupby("fold", sort=True):
        gb = b[b["fold"] == fold]
        seeds = sorted(ga["seed"].unique())
        first = ga[ga["seed"] == seeds[0]]
        y = first[list(dims)].to_numpy(float)
        pa = np.stack([ga[ga["seed"] == s][[f"pred_{d}" for d in dims]].to_numpy(float) for s in seeds])
        pb = np.stack([gb[gb["seed"] == s][[f"pred_{d}" for d in dims]].to_numpy(float) for s in seeds])
        out.append((fold, y, pa, pb))
    return out


def run_level_test_ccc(preds_a: pd.DataFrame, preds_b: pd.DataFrame, metric: str, names: Sequence[str],
                       n_boot: int = 2000, seed: int = 0) -> Dict[str, Any]:
    """Arm A minus arm B on ``metric`` (``ccc_<d>`` or ``ccc_mean``): ``{"delta", "ci95", "p_value",
    "test", "n_boot", "n_runs", "wins", "losses"}`` as :func:`serray.train.stats.run_level_test`."""
    dims = list(names) if metric == "ccc_mean" else [metric[len("ccc_"):]]
    if any(d not in names for d in dims):
        raise ValueError(f"unknown metric {metric!r}: ccc_mean or ccc_<dimension> of {list(names)}")
    ra, rb = run_metrics_ccc(preds_a, names), run_metrics_ccc(preds_b, names)
    ka, kb = {(r["seed"], r["fold"]): r[metric] for r in ra}, {(r["seed"], r["fold"]): r[metric] for r in rb}
    if set(ka) != set(kb):
        raise ValueError("the two arms have different (seed, fold) runs")
    rng = np.random.default_rng(seed)
    per_fold = []
    idx = [names.index(d) for d in dims]
    for fold, y, pa, pb in _fold_arrays(preds_a, preds_b, names):
        seeds = sorted(s for s, f in ka if f == fold)
        observed = np.array([ka[(s, fold)] - kb[(s, fold)] for s in seeds])
        w = rng.multinomial(len(y), np.full(len(y), 1.0 / len(y)), size=n_boot).astype(float)  # (B, n)
        da = np.mean([_weighted_ccc(y[:, j], pa[:, :, j], w) for j in idx], axis=0)  # (B, S)
        db = np.mean([_weighted_ccc(y[:, j], pb[:, :, j], w) for j in idx], axis=0)
        per_fold.append((observed, (da - db).T))  # (S,), (S, B)
    return {"metric": metric, **scoped_inference(per_fold, rng, seed), "test": RUN_LEVEL_TEST,
            "fold_test": FOLD_LEVEL_TEST}


# ------------------------------------------------------------------ the ablation on CCC (ablate.metric)


def build_dim_ablation(cells: Dict[Any, pd.DataFrame], protocol: str, folds: Sequence[int], seeds: Sequence[int],
                       metric: str, names: Sequence[str], n_boot: int = 2000, boot_seed: int = 0,
                       arm_val: Dict[Any, Dict[Any, float]] | None = None, comparisons=None) -> Dict[str, Any]:
    """The ablation dict of :func:`serray.train.ablation_report.build_ablation` on a CCC metric:
    per arm the metric's mean / sd / 95 % t-interval over the runs (and the selected epochs'
    validation score), and the paired comparisons by :func:`run_level_test_ccc`."""
    arms = []
    for arm, mode, fraction in sorted(cells, key=lambda k: _sort_key(*k)):
        runs = run_metrics_ccc(cells[(arm, mode, fraction)], names)
        entry = {"arm": arm, "mode": mode, "label_fraction": float(fraction),
                 metric: summarise_runs([{"ua": r[metric]} for r in runs], "ua")}
        val = (arm_val or {}).get((arm, mode, fraction))
        if val:
            for r in runs:
                r["val"] = val.get((r["seed"], r["fold"]))
            entry["val"] = summarise_runs([{"ua": r["val"]} for r in runs], "ua")
        arms.append({**entry, "runs": runs})
    results = []
    for a, b in comparisons or DEFAULT_COMPARISONS:
        both = sorted({(m, f) for (arm, m, f) in cells if arm == a} & {(m, f) for (arm, m, f) in cells if arm == b})
        for mode, fraction in both:
            res = run_level_test_ccc(cells[(a, mode, fraction)], cells[(b, mode, fraction)], metric, names, n_boot,
                                     boot_seed)
            results.append({"a": a, "b": b, "mode": mode, "label_fraction": float(fraction), **res,
                            **scoped_verdicts(res)})
    return {"protocol": protocol, "metric": metric, "dimensions": list(names), "folds": [int(f) for f in folds],
            "seeds": [int(s) for s in seeds], "arms": arms, "comparisons": results}


def dim_ablation_markdown(ab: Dict[str, Any]) -> str:
    m = ab["metric"]
    lines = [f"### Ablation on {m} ({ab['protocol']}; seeds {ab['seeds']} x folds {ab['folds']})", "",
             f"| arm | mode | labels | test {m} (mean ± sd over runs) | validation (selected epochs) |",
             "|---|---|---:|---:|---:|"]
    for r in ab["arms"]:
        val = f"{r['val']['mean']:.3f}" if r.get("val") and r["val"]["mean"] is not None else "-"
        lines.append(f"| {r['arm']} | {r['mode']} | x{r['label_fraction']:g} | {r[m]['mean']:.3f} ± {r[m]['sd']:.3f} "
                     f"| {val} |")
    lines += ["", "| comparison | mode | labels | Δ (A − B) | these test groups: 95 % interval | p | runs A > B | reading "
              "| new test groups: 95 % interval | p | folds A > B | reading |",
              "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    for c in ab["comparisons"]:
        fci = c.get("fold_ci95") or [float("nan")] * 2
        lines.append(f"| {c['a']} vs {c['b']} | {c['mode']} | x{c['label_fraction']:g} | {c['delta']:+.3f} | "
                     f"[{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] | {c['p_value']:.3f} | {c['wins']}/{c['n_runs']} | "
                     f"A {c['verdict']} B | [{fci[0]:+.3f}, {fci[1]:+.3f}] | {c.get('fold_p_value', float('nan')):.3f} | "
                     f"{c.get('folds_ahead', '-')}/{c.get('n_folds', '-')} | {c.get('fold_verdict', '-')} |")
    lines += ["", f"{RUN_LEVEL_TEST}.", f"{FOLD_LEVEL_TEST}."]
    return "\n".join(lines) + "\n"


def write_dim_ablation(ab: Dict[str, Any], out_dir) -> Dict[str, Any]:
    """``ablation.json`` and ``ablation.md`` of a CCC ablation."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "ablation.json", "md": out / "ablation.md"}
    paths["json"].write_text(json.dumps(_plain(ab), indent=2) + "\n")
    paths["md"].write_text(dim_ablation_markdown(ab))
    return paths


# ------------------------------------------------------------------ the task


class Dimensional(Task):
    """Valence / arousal / dominance (``dimensional``), with the four-class head beside them (``multitask``)."""

    has_dimensions = True

    def __init__(self, multitask: bool = False):
        self.multitask = bool(multitask)
        self.name = "multitask" if self.multitask else "dimensional"
        self.has_classes = self.multitask

    @property
    def loop_task(self) -> type:
        return DimensionalTask

    def metric_keys(self, cfg) -> List[str]:
        return metric_keys(list(cfg.finetune.dimensions), self.multitask)

    def select_metric(self, cfg) -> str:
        return select_metric(cfg)

    def prepare_split(self, cfg, split):
        """:func:`attach_dimensions`: each row's ratings; rows without valid ones dropped and counted."""
        return attach_dimensions(cfg, split)

    def loop_config(self, cfg, split, model_kwargs) -> Dict[str, Any]:
        return loop_config(cfg, split, model_kwargs)

    def selection_record(self, best_metrics, dims_dropped) -> Dict[str, Any]:
        return {"task": self.name, "dims_dropped": dims_dropped,
                **{k: float(v) for k, v in best_metrics.items() if k.startswith("val_ccc_")}}

    def test_metrics(self, cfg, preds, test_rows):
        """:func:`test_metrics`: the predictions with the true ratings beside them, and their metrics."""
        return test_metrics(cfg, preds, test_rows)

    def run_record(self, cfg) -> Dict[str, Any]:
        return {"task": self.name}

    def title_suffix(self, cfg) -> str:
        return f", task={self.name}"

    def write_results(self, cfg, folds, out_dir, extra, folds_dir=None) -> Dict[str, Any]:
        return write_dimensional_results(folds, out_dir, extra, list(cfg.finetune.dimensions), self.multitask,
                                         folds_dir=folds_dir, classes=classes_of(cfg) if self.multitask else LABELS)

    def loso_table(self, cfg, summary, title: str = "") -> str:
        return markdown_table(summary, list(cfg.finetune.dimensions), self.multitask, title)

    def prediction_columns(self, cfg) -> List[str]:
        return [c for d in cfg.finetune.dimensions for c in (d, f"pred_{d}")]

    def run_scores(self, preds) -> Dict[str, float]:
        """CCC / r / MAE per dimension (``<dim>``, ``pred_<dim>``) of one run's predictions."""
        dims = [c[len("pred_"):] for c in preds.columns if c.startswith("pred_")]
        return dimensional_metrics(preds[dims].to_numpy(float), preds[[f"pred_{d}" for d in dims]].to_numpy(float), dims)

    def build_ablation(self, cells, protocol, folds, seeds, metric, names, n_boot=2000, boot_seed=0, arm_val=None,
                       classes=None):
        return build_dim_ablation(cells, protocol, folds, seeds, metric, names, n_boot=n_boot, boot_seed=boot_seed,
                                  arm_val=arm_val)

    def ablation_record(self, cfg) -> Dict[str, Any]:
        return {"task": str(cfg.finetune.task)}

    def write_ablation(self, ablation, out_dir):
        return write_dim_ablation(ablation, out_dir)
