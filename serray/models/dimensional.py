"""Dimensional emotion heads on the SER body (``finetune.task``).

* ``dimensional``: SAP + a regression head for the configured dimensions (valence, arousal,
  dominance), a sigmoid output in [0, 1] (the targets are the corpus's scale mapped to [0, 1]);
* ``multitask``: the four-class SAP head *and* the regression head on one body.

The categorical model (:class:`~serray.models.classifier.EmotionClassifier`) is unchanged; this one
extends it, and :func:`build_model` picks the class from a checkpoint's model record.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor

from serray.models.classifier import EmotionClassifier
from serray.models.sap import SAPClassifier

TASKS = ("categorical", "dimensional", "multitask")


class DimensionalModel(EmotionClassifier):
    """:class:`EmotionClassifier` plus a regression head of ``num_dims`` outputs in [0, 1].

    Args:
        num_dims: number of dimensions.
        task: ``dimensional`` (no class head) or ``multitask`` (both heads).
        **kwargs: :class:`EmotionClassifier`'s arguments.
    """

    def __init__(self, num_dims: int, task: str = "dimensional", **kwargs):
        if task not in ("dimensional", "multitask"):
            raise ValueError(f"task must be dimensional or multitask, got {task!r}")
        super().__init__(**kwargs)
        self.config.update(num_dims=num_dims, task=task)
        self.task = task
        feat_dim = self.head.sap.input_size
        if task == "dimensional":
            self.head = None
        self.dim_head = SAPClassifier(feat_dim, num_dims, attention_dim=self.config["attention_dim"],
                                      hidden_dim=self.config["hidden_dim"], dropout=self.config["dropout"])

    def outputs(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """``{"dims": [B, K] in [0, 1]}`` and, for multitask, ``"logits": [B, C]``."""
        h = self.features(x, padding_mask)
        out = {"dims": torch.sigmoid(self.dim_head(h, padding_mask).float())}
        if self.head is not None:
            out["logits"] = self.head(h, padding_mask)
        return out

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """:meth:`outputs` (a dict, so a DDP-wrapped model returns both heads)."""
        return self.outputs(x, padding_mask)


def build_model(model_kwargs: dict) -> EmotionClassifier:
    """The model a checkpoint's ``model`` record describes (a record without ``task`` is categorical)."""
    kw = dict(model_kwargs)
    task = kw.pop("task", "categorical")
    if task == "categorical":
        kw.pop("num_dims", None)
        return EmotionClassifier(**kw)
    return DimensionalModel(task=task, **kw)
