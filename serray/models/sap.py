"""Statistical attentive pooling (SAP) and the downstream emotion classifier."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SAP(nn.Module):
    """Attention-weighted mean and standard deviation over valid frames.

    Args:
        input_size: Frame feature dimension ``D``.
        attention_dim: Hidden size of the attention scorer.
    """

    def __init__(self, input_size: int, attention_dim: int = 128) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = 2 * input_size
        self.scorer = nn.Sequential(
            nn.Linear(input_size, attention_dim), nn.Tanh(), nn.Linear(attention_dim, 1)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform weights and zero biases for the attention scorer."""
        for m in self.scorer:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _clean(xs: Tensor, padding_mask: Tensor | None) -> Tensor:
        """Zero padded frames so garbage (even inf/NaN) cannot leak."""
        if padding_mask is None:
            return xs
        return xs.masked_fill(padding_mask[..., None], 0.0)

    def attention(self, xs: Tensor, padding_mask: Tensor | None) -> Tensor:
        """Attention weights over frames.

        Args:
            xs: ``[B, T, D]`` frame features.
            padding_mask: bool ``[B, T]``, True = padded frame, or None.

        Returns:
            float32 ``[B, T]``: softmax over valid frames, exactly 0 at padding.
        """
        xs = self._clean(xs, padding_mask)
        scores = self.scorer(xs).squeeze(-1).float()
        if padding_mask is None:
            return torch.softmax(scores, dim=1)
        scores = scores.masked_fill(padding_mask, torch.finfo(scores.dtype).min)
        w = torch.softmax(scores, dim=1)
        return w.masked_fill(padding_mask, 0.0)

    def forward(self, xs: Tensor, padding_mask: Tensor | None) -> Tensor:
        """Pool frames to an utterance vector.

        Args:
            xs: ``[B, T, D]`` frame features.
            padding_mask: bool ``[B, T]``, True = padded frame, or None.

        Returns:
            float32 ``[B, 2D]``: weighted mean ‖ weighted std, where
            std = sqrt(clamp(E_w[x^2] - mu^2, min=1e-6)).
        """
        xs = self._clean(xs, padding_mask)
        w = self.attention(xs, padding_mask)
        x = xs.float()
        with torch.autocast(device_type=x.device.type, enabled=False):
            mu = torch.einsum("bt,btd->bd", w, x)
            ex2 = torch.einsum("bt,btd->bd", w, x * x)
        std = torch.sqrt(torch.clamp(ex2 - mu * mu, min=1e-6))
        return torch.cat([mu, std], dim=-1)


class SAPClassifier(nn.Module):
    """SAP pooling followed by a one-hidden-layer MLP.

    Args:
        input_size: Frame feature dimension ``D``.
        num_classes: Number of output classes.
        attention_dim: SAP attention hidden size.
        hidden_dim: MLP hidden size.
        dropout: Dropout after the hidden ReLU.
    """

    def __init__(
        self,
        input_size: int,
        num_classes: int,
        attention_dim: int = 128,
        hidden_dim: int = 256,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.num_classes = num_classes
        self.sap = SAP(input_size, attention_dim)
        self.head = nn.Sequential(
            nn.Linear(self.sap.output_size, hidden_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, num_classes),
        )

    def forward(self, xs: Tensor, padding_mask: Tensor | None) -> Tensor:
        """Classify utterances.

        Args:
            xs: ``[B, T, D]`` frame features.
            padding_mask: bool ``[B, T]``, True = padded frame, or None.

        Returns:
            Logits ``[B, num_classes]``.
        """
        return self.head(self.sap(xs, padding_mask))


__all__ = ["SAP", "SAPClassifier"]
