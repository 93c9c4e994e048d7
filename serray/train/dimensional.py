"""Dimensional emotion fine-tuning (``finetune.task: dimensional | multitask``).

The same folds, splits, body and loop as the four-class task (:mod:`serray.train.finetune`); what
changes is the target and the head:

* the targets are the corpus's valence / arousal / dominance ratings (the manifest's ``valence``,
  ``activation``, ``dominance`` columns) mapped to [0, 1] from the scale the corpus declares
  (:attr:`serray.data.corpus.Corpus.dimension_range`: IEMOCAP 1-5, MSP-Podcast 1-7); an utterance
  whose rating is missing or outside the scale is dropped from its split and counted per group;
* the loss is ``1 - CCC`` per dimension (``finetune.dim_loss: mse`` for mean squared error), plus the
  weighted cross-entropy of the class head for ``multitask`` (``finetune.dim_loss_weight`` weighs the
  dimensional part);
* the epoch is selected on ``finetune.select_metric`` (default: ``val_ccc_mean`` for dimensional,
  ``val_ua`` for multitask), computed on the fold's validation part only;
* the test split is scored once with CCC, Pearson r and MAE per dimension over all its utterances
  (:mod:`serray.train.dim_metrics`), on the corpus's original scale.

The dimensional task uses the four-class utterances of the categorical task (the same splits), so a
multitask run's UA is comparable fold by fold with a categorical one.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from serray import storage
from serray.data.corpus import DIMENSION_COLUMNS
from serray.data.features import PadCollate
from serray.errors import DataError
from serray.train.dim_metrics import ccc_loss, dimensional_metrics
from serray.train.finetune_task import FinetuneTask, cv_estimate
from serray.train.loop import eval_batches
from serray.train.metrics import classification_metrics

log = logging.getLogger(__name__)


def task_of(cfg) -> str:
    return str(cfg.finetune.get("task", "categorical") or "categorical")


def select_metric(cfg) -> str:
    """The validation metric that picks a fold's epoch (and the registry's fold model)."""
    chosen = cfg.finetune.get("select_metric")
    if chosen:
        return str(chosen)
    return "val_ccc_mean" if task_of(cfg) == "dimensional" else "val_ua"


def dimension_range(cfg) -> Tuple[float, float]:
    """The corpus's declared rating scale (config validation guarantees one for these tasks)."""
    from serray.data import corpora

    corpus = corpora.get(str(cfg.data.corpus))
    if corpus.dimension_range is None:
        raise DataError(f"corpus {corpus.name} declares no emotion dimensions; finetune.task={task_of(cfg)} needs "
                        "them (use finetune.task=categorical)")
    return tuple(float(v) for v in corpus.dimension_range)


def read_dimensions(cfg) -> pd.DataFrame:
    """``utt_id`` + one column per ``finetune.dimensions`` (original scale) from the manifest."""
    names = list(cfg.finetune.dimensions)
    path = str(cfg.data.manifest)
    if not storage.is_file(path):
        raise DataError(f"finetune.task={task_of(cfg)} reads the V/A/D ratings from the manifest, and there is none at "
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
    return {"model": {**model_kwargs, "task": task_of(cfg), "num_dims": len(names)}, "targets": targets,
            "dimensions": names, "dim_scale": list(scale), "dim_loss": str(cfg.finetune.dim_loss),
            "dim_loss_weight": float(cfg.finetune.dim_loss_weight), "select_metric": select_metric(cfg)}


def test_metrics(cfg, preds: pd.DataFrame, test_rows: pd.DataFrame) -> Tuple[pd.DataFrame, Dict[str, float]]:
    """The test predictions with the true ratings beside the predicted ones (both on the corpus's
    scale), and their metrics over the whole split (plus UA / WA / F1 for multitask)."""
    from serray.data.features import LABEL_INDEX

    names = list(cfg.finetune.dimensions)
    preds = preds.merge(test_rows[["utt_id", *names]], on="utt_id", how="left")
    m = dimensional_metrics(preds[names].to_numpy(), preds[[f"pred_{n}" for n in names]].to_numpy(), names)
    if "pred" in preds.columns:
        m.update(classification_metrics([LABEL_INDEX[lab] for lab in preds["label"]],
                                        [LABEL_INDEX[lab] for lab in preds["pred"]]))
    return preds, m
