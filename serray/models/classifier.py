"""The SER model: (optional) adapter body -> SAP -> classifier head.

Three modes (``finetune.mode``):

* ``frozen``: the pre-trained adapter branch (teacher by default, as DINO evaluates the teacher)
  runs without gradients; only SAP and the head learn;
* ``finetune``: the adapter branch is trained together with SAP and the head;
* ``none``: no adapter, the encoder features go straight into SAP (the baseline); when several
  encoder layers were stored they are combined by learnable softmax weights first.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from serray.models.sap import SAPClassifier
from serray.models.wap import FeatureNorm, WAPTransformer


class EmotionClassifier(nn.Module):
    """Utterance emotion classifier over encoder frame features.

    Args:
        input_dim: encoder feature dimension D.
        num_classes: number of emotion classes.
        num_input_layers: stored encoder layers L (inputs are [B, L, T, D] when L > 1).
        body: WAPTransformer kwargs of the adapter branch, or None for the no-adapter baseline.
        freeze_body: keep the body frozen (no gradients, eval mode).
        attention_dim, hidden_dim, dropout: SAP attention size and head MLP.
    """

    def __init__(self, input_dim: int, num_classes: int, num_input_layers: int = 1, body: Optional[dict] = None,
                 freeze_body: bool = True, attention_dim: int = 128, hidden_dim: int = 256, dropout: float = 0.1):
        super().__init__()
        self.config = dict(input_dim=input_dim, num_classes=num_classes, num_input_layers=num_input_layers,
                           body=body, freeze_body=freeze_body, attention_dim=attention_dim,
                           hidden_dim=hidden_dim, dropout=dropout)
        self.freeze_body = freeze_body and body is not None
        if body is not None:
            self.body = WAPTransformer(**body)
            feat_dim = self.body.d_model
            if self.freeze_body:
                self.body.requires_grad_(False)
        else:
            self.body = None
            self.layer_logits = nn.Parameter(torch.zeros(num_input_layers), requires_grad=num_input_layers > 1)
            self.input_norm = FeatureNorm(input_dim, num_input_layers)
            feat_dim = input_dim
        self.head = SAPClassifier(feat_dim, num_classes, attention_dim=attention_dim, hidden_dim=hidden_dim,
                                  dropout=dropout)

    def train(self, mode: bool = True) -> "EmotionClassifier":
        super().train(mode)
        if self.freeze_body:
            self.body.eval()
        return self

    def features(self, x: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
        """Frame features [B, T, F] fed to SAP."""
        if self.body is not None:
            if self.freeze_body:
                with torch.no_grad():
                    return self.body(x, padding_mask)
            return self.body(x, padding_mask)
        x = self.input_norm(x)
        if x.dim() == 4:
            w = torch.softmax(self.layer_logits, dim=0).to(x.dtype)
            x = (w[None, :, None, None] * x).sum(dim=1)
        return x

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """Logits [B, num_classes] for features [B, T, D] / [B, L, T, D]."""
        return self.head(self.features(x, padding_mask), padding_mask)

    def set_feature_stats(self, mean, std) -> None:
        """Input standardisation statistics (of the no-adapter baseline; a body brings its own)."""
        if self.body is None:
            self.input_norm.set_stats(mean, std)

    def trainable_parameters(self) -> list:
        return [p for p in self.parameters() if p.requires_grad]


def body_state_from_adapter(adapter_state: dict, branch: str = "teacher") -> dict:
    """The state dict of one adapter branch (``teacher.*`` / ``student.*`` keys, prefix removed)."""
    prefix = f"{branch}."
    return {k[len(prefix):]: v for k, v in adapter_state.items() if k.startswith(prefix)}
