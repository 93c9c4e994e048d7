"""The four-class fine-tuning task the shared loop runs (:mod:`serray.train.loop`): the model, the
parameter groups, the batches, the loss, the validation scores and the checkpoint's metadata.

:class:`FinetuneTask` is the categorical task; :class:`serray.train.dimensional.DimensionalTask` extends it
for ``finetune.task: dimensional | multitask``. The fold runner (:mod:`serray.train.finetune`) picks
one, so the imports run one way: ``finetune`` -> ``dimensional`` -> ``finetune_task``.
"""

from __future__ import annotations

from typing import Any, Dict, List

import numpy as np
import torch
import torch.nn.functional as F

from serray.data.features import PadCollate
from serray.data.iemocap import LABELS
from serray.models.adapter import param_groups
from serray.models.classifier import EmotionClassifier, body_state_from_adapter
from serray.models.dimensional import build_model
from serray.train.checkpoint import MODEL_KEY, load_checkpoint
from serray.train.loop import eval_batches
from serray.train.metrics import classification_metrics

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
                          seed=self.config.get("run_seed", self.config["seed"]) * 1000 + epoch)

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
                "labels": list(LABELS), "fold": self.config["fold"], "test_session": self.config["fold"],
                "mode": self.config["mode"], "init": self.config["init"], "config_hash": self.config["config_hash"],
                "step": step, "epoch": epoch, "audit": self.config["audit"]}


def cv_estimate(curve: Dict[str, List[float]], epoch: int) -> Dict[str, float]:
    """The validation metrics of ``epoch`` from an inner cross-validation's mean curves."""
    return {k: float(v[min(epoch, len(v) - 1)]) for k, v in curve.items()}
