"""Span masking of valid (non-padded) frames for masked prediction."""

from __future__ import annotations

import torch
from torch import Tensor


def _num_masked(n: int, mask_ratio: float) -> int:
    """Number of frames to mask among ``n`` valid frames."""
    if mask_ratio <= 0 or n <= 0:
        return 0
    return min(n, max(1, round(mask_ratio * n)))


def _row_mask(
    n: int, m: int, span: int, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """Mask exactly ``m`` of ``n`` frames with non-overlapping spans.

    The ``s = ceil(m / span)`` spans (the last one cut to ``m - (s-1)*span``)
    and the ``n - m`` free frames form ``n - m + s`` items; the span slots are
    a uniform random subset of those items, so spans land at random positions
    and may touch.

    Returns:
        bool ``[n]`` with exactly ``m`` True entries.
    """
    s = -(-m // span)
    lengths = torch.full((s,), span, dtype=torch.long, device=device)
    lengths[-1] = m - (s - 1) * span
    slots = torch.randperm(n - m + s, generator=generator, device=device)[:s].sort().values
    order = torch.arange(s, device=device)
    # start = (free frames before this span) + (frames of previous spans)
    starts = slots - order + torch.cumsum(lengths, 0) - lengths
    idx = torch.arange(n, device=device)
    inside = (idx[None, :] >= starts[:, None]) & (idx[None, :] < (starts + lengths)[:, None])
    return inside.any(0)


def span_mask(
    padding_mask: Tensor,
    mask_ratio: float,
    span: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample a span mask over the valid frames of each utterance.

    For an utterance with ``n`` valid frames exactly ``round(mask_ratio * n)``
    frames (at least 1 if ``mask_ratio > 0`` and ``n > 0``) are masked, made of
    spans of ``span`` consecutive valid frames at random positions (the last
    span may be shorter; spans may touch but never overlap). Padding is never
    masked. Random numbers are drawn on the generator's device (CPU when no
    generator is given, using the global RNG); the result is moved to
    ``padding_mask.device``.

    Args:
        padding_mask: bool ``[B, T]``, True = padded frame.
        mask_ratio: Fraction of valid frames to mask, in ``[0, 1]``.
        span: Span length (>= 1).
        generator: Optional ``torch.Generator`` for deterministic masks.

    Returns:
        bool ``[B, T]``, True = masked, on ``padding_mask.device``.
    """
    if span < 1:
        raise ValueError(f"span must be >= 1, got {span}")
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
    out_device = padding_mask.device
    if mask_ratio == 0:
        return torch.zeros_like(padding_mask, dtype=torch.bool)
    device = generator.device if generator is not None else torch.device("cpu")
    valid = ~padding_mask.to(device=device, dtype=torch.bool)
    mask = torch.zeros_like(valid)
    counts = valid.sum(1).tolist()
    for b, n in enumerate(counts):
        m = _num_masked(n, mask_ratio)
        if m == 0:
            continue
        positions = valid[b].nonzero().squeeze(1)
        mask[b, positions] = _row_mask(n, m, span, generator, device)
    return mask.to(out_device)


__all__ = ["span_mask"]
