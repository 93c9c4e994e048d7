"""Weighted-average-pooling (WAP) Transformer used as adapter student/teacher.

The network maps frozen speech-encoder features ``[B, T, D]`` (or a stack of
``L`` encoder layers ``[B, L, T, D]``) to ``[B, T, d_model]``. Its output is a
softmax-weighted sum over the per-layer-normalised outputs of its own
Transformer layers (one ``LayerNorm`` per layer, ``out_norms[l]``).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@contextlib.contextmanager
def regular_path_on_cpu(device: torch.device):
    """Run ``nn.TransformerEncoderLayer`` inference on its regular path when on CPU.

    PyTorch's inference fast path (one fused kernel; nested tensors under a padding mask) measured
    slower on this 2-core CPU than the regular path on padded batches of whole utterances: 3.4x at the
    demo's d_model 96, 5.0x at 64, 1.2x at 1024 (``bench/wap_cpu.py``); it is left on for other devices. The
    switch is process-wide (``torch.backends.mha``): a thread that runs meanwhile may take either path,
    whose outputs agree to float rounding.
    """
    if device.type != "cpu" or not torch.backends.mha.get_fastpath_enabled():
        yield
        return
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


def _zero_padded(x: Tensor, padding_mask: Tensor | None) -> Tensor:
    """Set padded frames (``padding_mask`` True) of ``x`` [B, T, ...] to zero."""
    if padding_mask is None:
        return x
    return x.masked_fill(padding_mask[..., None], 0.0)


class FeatureNorm(nn.Module):
    """Fixed per-dimension standardisation of encoder features (global CMVN).

    ``mean``/``std`` are buffers ``[L, D]`` (one row per stacked encoder layer), set from the
    statistics of the training sessions (:meth:`set_stats`) and saved in every checkpoint, so a
    served model normalises exactly as it was trained. Unlike a per-frame LayerNorm it keeps the
    frame-level energy and spectral-level differences that carry emotion (loudness, tilt).
    Identity until statistics are set. A missing value (NaN: a descriptor an utterance does not have,
    such as F0 where nothing is voiced) becomes 0, the statistics' mean.
    """

    def __init__(self, input_dim: int, num_input_layers: int = 1) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_input_layers, input_dim))
        self.register_buffer("std", torch.ones(num_input_layers, input_dim))

    @torch.no_grad()
    def set_stats(self, mean, std) -> None:
        """Set the statistics (array-likes broadcastable to ``[L, D]``)."""
        self.mean.copy_(torch.as_tensor(mean, dtype=self.mean.dtype).reshape_as(self.mean))
        self.std.copy_(torch.as_tensor(std, dtype=self.std.dtype).reshape_as(self.std))

    def forward(self, x: Tensor) -> Tensor:
        """``(x - mean) / std`` for ``[B, T, D]`` or ``[B, L, T, D]`` features (NaN -> 0)."""
        if x.dim() == 4:
            y = (x - self.mean[None, :, None, :]) / self.std[None, :, None, :]
        else:
            y = (x - self.mean[0]) / self.std[0]
        return torch.where(torch.isnan(y), torch.zeros((), dtype=y.dtype, device=y.device), y)


def kernel_frames(ms: float, frame_rate: float) -> int:
    """An odd number of frames covering about ``ms`` milliseconds at ``frame_rate`` Hz (at least 1)."""
    k = max(1, int(round(ms * frame_rate / 1000.0)))
    return k if k % 2 else k + 1


class ConvPositionalEmbedding(nn.Module):
    """Relative positional embedding of wav2vec 2.0 / data2vec: a grouped ``Conv1d`` over time and a
    GELU, added residually to the frames.

    Self-attention alone is permutation-equivariant: without positions, every masked frame of an
    utterance (all the same mask embedding) gets the same output. The convolution gives each frame
    its neighbourhood, so frames at different places of a masked span differ. Padding is zeroed
    before the convolution (it never leaks into valid frames) and after it.

    Args:
        d_model: channels.
        kernel: odd kernel size in frames (see :func:`kernel_frames`: the width is set in
            milliseconds, so any input frame rate works).
        groups: convolution groups (16 in wav2vec 2.0); must divide ``d_model``.
    """

    def __init__(self, d_model: int, kernel: int, groups: int = 16) -> None:
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"the positional convolution needs an odd kernel >= 1, got {kernel}")
        if d_model % groups:
            raise ValueError(f"pos_conv_groups ({groups}) must divide d_model ({d_model})")
        self.conv = nn.Conv1d(d_model, d_model, kernel, padding=kernel // 2, groups=groups)
        # wav2vec 2.0's initialisation: N(0, sqrt(4 / (kernel * d_model))), zero bias
        nn.init.normal_(self.conv.weight, mean=0.0, std=math.sqrt(4.0 / (kernel * d_model)))
        nn.init.zeros_(self.conv.bias)

    def forward(self, h: Tensor, padding_mask: Tensor | None) -> Tensor:
        """``h + GELU(conv(h))`` for ``h`` [B, T, d_model]; padded frames stay zero."""
        h = _zero_padded(h, padding_mask)
        pos = F.gelu(self.conv(h.transpose(1, 2))).transpose(1, 2)
        return _zero_padded(h + pos, padding_mask)


class WAPTransformer(nn.Module):
    """Pre-LN Transformer whose output is a learned weighted sum of its layers.

    Args:
        input_dim: Feature dimension ``D`` of the frozen encoder features.
        d_model: Transformer width.
        num_layers: Number of Transformer encoder layers.
        num_heads: Attention heads per layer.
        ff_dim: Feed-forward hidden size.
        dropout: Dropout used after the input projection and inside layers.
        num_input_layers: Number ``L`` of stacked encoder layers in the input;
            when > 1 the input ``[B, L, T, D]`` is reduced with
            ``softmax(input_layer_logits)``.
        pos_conv_kernel: kernel (frames, odd) of the convolutional positional embedding applied
            before the Transformer layers (0: none; the adapter sets it from milliseconds).
        pos_conv_groups: groups of that convolution.
        attention_dropout: dropout on the attention weights (``dropout`` applies to the residual
            and feed-forward paths). 0 by default: on a CPU it costs about 40 % of a training step
            (random masks over every [T, T] attention map) for little regularisation of 3 layers.
    """

    def __init__(
        self,
        input_dim: int,
        d_model: int = 256,
        num_layers: int = 3,
        num_heads: int = 4,
        ff_dim: int = 1024,
        dropout: float = 0.1,
        num_input_layers: int = 1,
        pos_conv_kernel: int = 0,
        pos_conv_groups: int = 16,
        attention_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_layers < 1 or num_input_layers < 1:
            raise ValueError("num_layers and num_input_layers must be >= 1")
        self.input_dim = input_dim
        self.d_model = d_model
        self.num_layers = num_layers
        self.num_input_layers = num_input_layers
        # Only trainable when there is something to weight (keeps DDP free of
        # unused parameters for single-layer inputs).
        self.input_layer_logits = nn.Parameter(
            torch.zeros(num_input_layers), requires_grad=num_input_layers > 1
        )
        self.layer_logits = nn.Parameter(torch.zeros(num_layers))
        self.input_norm = FeatureNorm(input_dim, num_input_layers)
        self.input_proj = nn.Linear(input_dim, d_model)
        self.input_dropout = nn.Dropout(dropout)
        self.pos_conv = ConvPositionalEmbedding(d_model, pos_conv_kernel, pos_conv_groups) if pos_conv_kernel else None
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model,
                num_heads,
                dim_feedforward=ff_dim,
                dropout=dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(num_layers)
        )
        for layer in self.layers:  # dropout on the [B, H, T, T] attention maps: its own rate
            layer.self_attn.dropout = attention_dropout
        self.out_norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(num_layers))

    def input_layer_weights(self) -> Tensor:
        """Return the softmax weights over stacked input encoder layers.

        Returns:
            Float tensor ``[num_input_layers]`` summing to 1.
        """
        return torch.softmax(self.input_layer_logits.float(), dim=0)

    def layer_weights(self) -> Tensor:
        """Return the softmax weights over this model's Transformer layers.

        Returns:
            Float tensor ``[num_layers]`` summing to 1.
        """
        return torch.softmax(self.layer_logits.float(), dim=0)

    def _reduce_input_layers(self, x: Tensor) -> Tensor:
        """Standardise, then collapse ``[B, L, T, D]`` to ``[B, T, D]`` with the input weights."""
        if x.dim() == 3:
            return self.input_norm(x)
        if x.dim() != 4 or x.shape[1] != self.num_input_layers:
            raise ValueError(
                f"expected [B, {self.num_input_layers}, T, {self.input_dim}] input, "
                f"got {tuple(x.shape)}"
            )
        x = self.input_norm(x)
        w = self.input_layer_weights().to(x.dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return torch.einsum("l,bltd->btd", w, x)

    def embed(self, x: Tensor) -> Tensor:
        """Project encoder features to the model width.

        Args:
            x: ``[B, T, D]`` or ``[B, L, T, D]`` with ``L == num_input_layers``.

        Returns:
            ``[B, T, d_model]`` = dropout(Linear(weighted sum over L of CMVN(x))).
        """
        h = self._reduce_input_layers(x)
        return self.input_dropout(self.input_proj(h))

    def layer_outputs(self, h: Tensor, padding_mask: Tensor | None) -> list[Tensor]:
        """Run the Transformer layers one by one.

        Args:
            h: ``[B, T, d_model]`` embedded input.
            padding_mask: bool ``[B, T]``, True = padded frame, or None.

        Returns:
            List of ``num_layers`` raw layer outputs ``[B, T, d_model]``
            (before ``out_norms``; padded positions are unspecified). The positional
            convolution (if any) is applied first, so it sees the mask embeddings in place.
        """
        out = []
        h = _zero_padded(h, padding_mask)
        if self.pos_conv is not None:
            h = self.pos_conv(h, padding_mask)
        with regular_path_on_cpu(h.device):
            for layer in self.layers:
                h = layer(h, src_key_padding_mask=padding_mask)
                out.append(h)
        return out

    def combine(self, layers: list[Tensor], padding_mask: Tensor | None) -> Tensor:
        """Weighted sum of per-layer-normalised layer outputs.

        Args:
            layers: Output of :meth:`layer_outputs`.
            padding_mask: bool ``[B, T]``, True = padded frame, or None.

        Returns:
            ``[B, T, d_model]`` = sum_l w_l * out_norms[l](X_l); padded frames 0.
        """
        w = self.layer_weights()
        out = sum(w[i] * norm(x) for i, (norm, x) in enumerate(zip(self.out_norms, layers)))
        return _zero_padded(out, padding_mask)

    def encode(self, h: Tensor, padding_mask: Tensor | None) -> Tensor:
        """Encode embedded frames.

        Args:
            h: ``[B, T, d_model]`` embedded input (see :meth:`embed`).
            padding_mask: bool ``[B, T]``, True = padded frame, or None.

        Returns:
            ``[B, T, d_model]`` WAP output with padded frames set to 0.
        """
        return self.combine(self.layer_outputs(h, padding_mask), padding_mask)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Embed and encode encoder features.

        Args:
            x: ``[B, T, D]`` or ``[B, L, T, D]`` encoder features.
            padding_mask: bool ``[B, T]``, True = padded frame, or None.

        Returns:
            ``[B, T, d_model]`` features, zero at padded frames.
        """
        return self.encode(self.embed(x), padding_mask)


__all__ = ["ConvPositionalEmbedding", "FeatureNorm", "WAPTransformer", "kernel_frames"]
