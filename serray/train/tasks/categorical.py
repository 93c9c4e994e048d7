"""The categorical task (``finetune.task: categorical``, over the classes of ``data.classes``: the four by
default): :class:`Categorical` (UA / WA / macro-F1, the
LOSO results: metrics.json, results.md, predictions.csv and plots, the run-level statistics of :mod:`serray.train.stats` and
:mod:`serray.train.ablation_report`) and the loop task every fine-tuning run plugs into the shared loop
(:mod:`serray.train.loop`): the model, the parameter groups, the batches, the loss, the validation
scores and the checkpoint's metadata.

:class:`FinetuneTask` is the categorical loop task; :class:`serray.train.tasks.dimensional.DimensionalTask`
extends it for ``finetune.task: dimensional | multitask``. The fold runner (:mod:`serray.train.finetune`)
asks :func:`serray.train.tasks.task_of` for one, so the imports run one way: ``finetune`` -> ``tasks``
-> ``tasks.dimensional`` -> ``tasks.categorical``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from serray import storage
from serray.data.corpora import classes_of
from serray.data.features.training import PadCollate
from serray.data.corpora.base import LABELS
from serray.models.adapter import param_groups
from serray.models.classifier import EmotionClassifier, body_state_from_adapter
from serray.models.dimensional import build_model
from serray.train.checkpoint import MODEL_KEY, load_checkpoint
from serray.train.loop import eval_batches
from serray.train.metrics import class_index, classification_metrics, confusion
from serray.train.results import FOLD_KEYS, SD_CONVENTION, _plot_confusion, _sample_sd, plot_curves, read_fold_predictions
from serray.train.tasks import Task

#: checkpoint score: the selection metric (validation UA, or ``finetune.select_metric``), averaged over the
#: last ``finetune.select_smooth`` epochs; ties go to the later epoch (1e-7 x epoch is far below one utterance)
SELECTION_KEY = "val_selection"
TIE_TO_LATER = 1e-7


def class_balanced_nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The mean over the classes present of each class's mean negative log-likelihood: a proper score
    that weighs the classes as UA does (the unweighted mean lets the largest class decide)."""
    nll = F.cross_entropy(logits.float(), labels, reduction="none")
    per_class = [float(nll[labels == c].mean()) for c in torch.unique(labels)]
    return float(np.mean(per_class)) if per_class else float("nan")


class FinetuneTask:
    """The fine-tuning task plugged into the shared loop."""

    stage_id = 1  # progress lines: "fine-tune"

    def __init__(self, config: Dict[str, Any]):
        self.config = config
        self.weight = torch.tensor(config["class_weights"], dtype=torch.float32) if config["class_weights"] else None
        self.classes = tuple(config.get("labels") or LABELS)  # data.classes, in index order
        self._val_rows = None  # compact float16 rows, decoded one batch at a time

    def build_model(self) -> EmotionClassifier:
        model = build_model(self.config["model"])  # EmotionClassifier, or the dimensional heads (finetune.task)
        model.set_feature_stats(*self.config["feature_stats"])  # the no-adapter baseline
        if self.config["init_from"]:
            state, _ = load_checkpoint(self.config["init_from"])
            model.body.load_state_dict(body_state_from_adapter(state[MODEL_KEY], self.config["branch"]))
        elif model.body is not None:  # random init (the control): same statistics as every other arm
            model.body.input_norm.set_stats(*self.config["feature_stats"])
        return model

    def param_groups(self, model: EmotionClassifier, weight_decay: float) -> list:
        """The pre-trained body learns at ``lr x body_lr_scale``, the new head (and the baseline's
        layer weights) at ``lr``; no weight decay on norms, biases and logits."""
        body = [(f"body.{n}", p) for n, p in model.body.named_parameters()] if model.body is not None else []
        head = [(n, p) for n, p in model.named_parameters() if not n.startswith("body.")]
        return (param_groups(body, weight_decay, self.config["body_lr_scale"], "body_")
                + param_groups(head, weight_decay, 1.0, "head_"))

    def lr_scale(self, group: dict, epoch: int) -> float:
        if group.get("name", "").startswith("body_") and self._body_frozen(epoch):
            return 0.0  # (logged as the body's rate; the body gets no gradient at all, see before_epoch)
        return group.get("lr_scale", 1.0)

    def _body_frozen(self, epoch: int) -> bool:
        return epoch < self.config.get("freeze_epochs", 0)

    def before_epoch(self, core: EmotionClassifier, epoch: int) -> None:
        """``finetune.freeze_epochs``: during the warm-up the body takes no gradient (so it has no
        optimizer state and stays outside the clipping norm) and runs in eval mode, as in ``frozen``."""
        if core.body is None or core.freeze_body:
            return
        frozen = self._body_frozen(epoch)
        core.body.requires_grad_(not frozen)
        if frozen:
            core.body.eval()

    def collate(self, train: bool, epoch: int = 0) -> PadCollate:
        return PadCollate(self.config["max_frames"] if train else None, random_crop=train,
                          seed=self.config.get("run_seed", self.config["seed"]) * 1000 + epoch, classes=self.classes)

    def step(self, model, batch, step: int, rank: int = 0):
        logits = model(batch["x"], batch["padding_mask"])
        weight = None if self.weight is None else self.weight.to(logits.device)
        loss = F.cross_entropy(logits.float(), batch["labels"], weight=weight)
        return loss, {"loss": float(loss.detach())}

    def after_step(self, core, step: int, total_steps: int) -> Dict[str, float]:
        return {}

    @torch.no_grad()
    def evaluate(self, model, core, rt, epoch: int) -> Dict[str, float]:
        """UA / WA / macro-F1, the loss and the class-balanced loss on the validation part (every worker
        sees all of it); under ``finetune.epoch_selection: inner_cv`` (no validation part: the model trains
        on every training speaker), the inner cross-validation's estimate for this many epochs."""
        if self.config.get("cv_curve"):
            return cv_estimate(self.config["cv_curve"], epoch)
        core.eval()
        if self._val_rows is None:
            self._val_rows = rt.rows("val")
        ys, preds, logit_parts = [], [], []
        for batch in eval_batches(self._val_rows, self.config["batch_size"], self.collate(train=False)):
            logits = core(batch["x"].to(rt.device), batch["padding_mask"].to(rt.device)).float()
            ys.append(batch["labels"].numpy())
            preds.append(logits.argmax(-1).cpu().numpy())
            logit_parts.append(logits.cpu())
        y, p = np.concatenate(ys), np.concatenate(preds)
        logits, labels = torch.cat(logit_parts), torch.from_numpy(y)
        m = classification_metrics(y, p)
        return {"val_loss": float(F.cross_entropy(logits, labels)), "val_bal_loss": class_balanced_nll(logits, labels),
                "val_ua": m["ua"], "val_wa": m["wa"], "val_macro_f1": m["macro_f1"]}

    def score_epoch(self, history: list) -> Dict[str, float]:
        """The selection score of the latest epoch (:data:`SELECTION_KEY`): its selection metric averaged
        over the last ``select_smooth`` epochs (a one-speaker validation set moves UA in steps of several
        points from one epoch to the next), plus a tie-break towards the later epoch."""
        key = self.config.get("select_metric") or "val_ua"
        window = history[-max(1, int(self.config.get("select_smooth") or 1)):]
        values = [h.get(key, float("nan")) for h in window]
        score = float(np.mean([v if np.isfinite(v) else -1.0 for v in values]))
        return {SELECTION_KEY: score + TIE_TO_LATER * int(history[-1]["epoch"]), "val_smoothed": score}

    def should_stop(self, history: list) -> bool:
        """Early stopping: ``patience`` epochs without a better validation selection score; under inner
        cross-validation, the epoch count the inner folds chose (``stop_epoch``)."""
        if self.config.get("stop_epoch") is not None and history:
            return int(history[-1]["epoch"]) >= int(self.config["stop_epoch"])
        patience = self.config.get("patience")
        if not patience or not history:
            return False
        best = max(range(len(history)), key=lambda i: history[i][SELECTION_KEY])
        return len(history) - 1 - best >= patience

    def extra_state(self) -> Dict[str, Any]:
        return {}

    def load_extra_state(self, state: Dict[str, Any]) -> None:
        pass

    def checkpoint_meta(self, core: EmotionClassifier, step: int, epoch: int) -> Dict[str, Any]:
        return {"kind": "classifier", "model": core.config, "features": self.config["features"],
                "labels": list(self.classes), "fold": self.config["fold"], "test_session": self.config["fold"],
                "mode": self.config["mode"], "init": self.config["init"], "config_hash": self.config["config_hash"],
                "step": step, "epoch": epoch, "audit": self.config["audit"]}


def cv_estimate(curve: Dict[str, List[float]], epoch: int) -> Dict[str, float]:
    """The validation metrics of ``epoch`` from an inner cross-validation's mean curves."""
    return {k: float(v[min(epoch, len(v) - 1)]) for k, v in curve.items()}


class Categorical(Task):
    """The run's classes (``data.classes``): UA / WA / macro-F1 per fold, the epoch selected on validation UA."""

    name = "categorical"
    has_classes, has_dimensions = True, False

    @property
    def loop_task(self) -> type:
        return FinetuneTask

    def metric_keys(self, cfg) -> List[str]:
        return list(METRICS)

    def select_metric(self, cfg) -> str:
        return "val_ua"

    def test_metrics(self, cfg, preds, test_rows):
        index = class_index(classes_of(cfg))
        return preds, classification_metrics([index[l] for l in preds["label"]], [index[l] for l in preds["pred"]])

    def write_results(self, cfg, folds, out_dir, extra, folds_dir=None) -> Dict[str, Any]:
        return write_results(folds, out_dir, extra, folds_dir=folds_dir, classes=classes_of(cfg))

    def loso_table(self, cfg, summary, title: str = "") -> str:
        return markdown_table(summary, title)

    def prediction_columns(self, cfg) -> List[str]:
        return ["label", "pred"]

    def run_scores(self, preds) -> Dict[str, float]:
        return classification_metrics(preds["label"], preds["pred"])

    def build_ablation(self, cells, protocol, folds, seeds, metric, names, n_boot=2000, boot_seed=0, arm_val=None,
                       classes=None):
        """:func:`serray.train.ablation_report.build_ablation` (on UA: ``metric`` is ``ua``; no dimensions)."""
        from serray.train.ablation_report import build_ablation

        return build_ablation(cells, protocol=protocol, folds=folds, seeds=seeds, n_boot=n_boot, boot_seed=boot_seed,
                              arm_val=arm_val, labels=tuple(classes or LABELS))

    def write_ablation(self, ablation, out_dir):
        from serray.train.ablation_report import write_ablation

        return write_ablation(ablation, out_dir)


# ------------------------------------------------------------------ LOSO results (metrics.json, results.md, plots)

METRICS = ("ua", "wa", "macro_f1")


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
    names = summary.get("group_labels") or {}
    for f in summary["folds"]:
        fold = f"{f['fold']} ({names[str(f['fold'])]})" if str(f["fold"]) in names else f["fold"]
        lines.append(f"| {fold} | {f['n_test']} | {100 * f['ua']:.2f} | {100 * f['wa']:.2f} | {100 * f['macro_f1']:.2f} |")
    m, s = summary["mean"], summary["std"]
    lines.append("| **mean ± sd** | {} | {:.2f} ± {:.2f} | {:.2f} ± {:.2f} | {:.2f} ± {:.2f} |".format(
        sum(f["n_test"] for f in summary["folds"]), 100 * m["ua"], 100 * s["ua"], 100 * m["wa"], 100 * s["wa"],
        100 * m["macro_f1"], 100 * s["macro_f1"]))
    lines += ["", "sd: sample standard deviation over folds (n − 1)."]
    return "\n".join(lines) + "\n"


def per_class(cm: np.ndarray, classes: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """Recall and count of each class over every fold's test predictions (the confusion's rows)."""
    n = cm.sum(axis=1)
    return {c: {"recall": float(cm[i, i] / n[i]) if n[i] else float("nan"), "n": int(n[i])} for i, c in enumerate(classes)}


def per_class_table(rows: Dict[str, Dict[str, float]]) -> str:
    """Recall per class (percent) over all folds' test utterances."""
    lines = ["| class | n | recall % |", "|---|---:|---:|"]
    lines += [f"| {c} | {r['n']} | {100 * r['recall']:.2f} |" for c, r in rows.items()]
    return "\n".join(lines + ["", "recall over every fold's test utterances (the confusion matrix's rows)."]) + "\n"


def write_results(folds: List[Dict[str, Any]], out_dir: str | Path, extra: Dict[str, Any],
                  folds_dir: Optional[str] = None, classes: Sequence[str] = LABELS) -> Dict[str, Any]:
    """Write metrics.json, results.md, predictions.csv, confusion_matrix.png and learning_curves.png.

    The folds' ``fold<k>/predictions.csv`` are read from ``folds_dir`` (default ``out_dir``; a local
    path or a storage URI)."""

    out = Path(out_dir)
    src = folds_dir or str(out)
    out.mkdir(parents=True, exist_ok=True)
    preds = read_fold_predictions(src, folds)
    index = class_index(classes)
    cm = confusion([index[l] for l in preds["label"]], [index[l] for l in preds["pred"]], len(classes))
    summary = {**summarise(folds), **extra, "classes": list(classes), "per_class": per_class(cm, classes)}
    storage.write_text(out / "metrics.json", json.dumps(summary, indent=2))
    table = markdown_table(summary, extra.get("title", ""))
    if tuple(classes) != LABELS:  # another class set: which classes the UA is made of
        table += "\n" + per_class_table(summary["per_class"])
    storage.write_text(out / "results.md", table)
    preds.to_csv(out / "predictions.csv", index=False)
    _plot_confusion(cm, out / "confusion_matrix.png", summary, classes)
    plot_curves(folds, out / "learning_curves.png", "val_ua", "validation UA")
    return summary
