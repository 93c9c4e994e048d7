"""The ``fbank`` front end as operators every ONNX exporter knows: one strided ``Conv1d``, a square, a
matrix product and a log.

``torchaudio.compliance.kaldi.fbank`` (what :class:`serray.data.features.encoders.FbankEncoder` runs) does not
export: its ``rfft`` has no ONNX symbol in the TorchScript exporter, and the dynamo exporter fixes its
framing to the example's length (measured with torch 2.14, ``docs/export.md``). Everything it does to a
frame before the power spectrum is linear: removing the frame's mean, pre-emphasis (0.97), the povey
window and the real DFT of the frame zero-padded to 512 samples. Their product is one matrix per
output (real and imaginary parts), precomputed in float64 and applied as the kernel of a ``Conv1d``
whose stride is the frame shift; the mel filterbank is Kaldi's own (``kaldi.get_mel_banks``).
:class:`KaldiFbank` gives the same features as ``FbankEncoder`` with serray's settings (no dither, no
energy, ``snip_edges``) to float32 rounding (``tests/models/test_fbank.py``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

#: Kaldi's log floor (``torch.finfo(torch.float32).eps``).
LOG_FLOOR = float(np.finfo(np.float32).eps)


def _povey_window(n: int) -> np.ndarray:
    """Kaldi's povey window: a symmetric Hann window to the power 0.85."""
    return (0.5 - 0.5 * np.cos(2 * math.pi * np.arange(n) / (n - 1))) ** 0.85


class KaldiFbank(nn.Module):
    """Log-mel filterbank of mono waveforms ``[B, S]`` -> ``[B, T, num_mel_bins]``.

    Args:
        num_mel_bins: mel bands (``encoder.num_mel_bins``).
        sample_rate: Hz (``encoder.sample_rate``).
        scale: the waveform's factor before analysis (32768: Kaldi reads 16-bit integers).
        preemphasis: Kaldi's ``preemphasis_coefficient``.
        low_freq: lowest mel edge in Hz (Kaldi's default 20).

    ``T = 1 + (S - frame_length) // frame_shift`` (25 ms frames every 10 ms), as ``snip_edges``.
    """

    def __init__(self, num_mel_bins: int = 80, sample_rate: int = 16000, scale: float = 32768.0,
                 preemphasis: float = 0.97, low_freq: float = 20.0) -> None:
        super().__init__()
        from torchaudio.compliance.kaldi import get_mel_banks

        self.num_mel_bins, self.sample_rate = num_mel_bins, sample_rate
        self.frame_length = int(round(0.025 * sample_rate))
        self.frame_shift = int(round(0.010 * sample_rate))
        n, nfft = self.frame_length, 1 << (self.frame_length - 1).bit_length()
        bins = nfft // 2 + 1
        remove_mean = np.eye(n) - 1.0 / n
        emphasis = np.eye(n) - preemphasis * np.eye(n, k=-1)
        emphasis[0, 0] = 1.0 - preemphasis  # Kaldi repeats the first sample
        frame = np.diag(_povey_window(n)) @ emphasis @ remove_mean  # [n, n]: raw frame -> windowed frame
        angle = 2 * math.pi * np.outer(np.arange(bins), np.arange(n)) / nfft  # [bins, n]
        kernel = np.concatenate([np.cos(angle) @ frame, -np.sin(angle) @ frame]) * scale  # [2 bins, n]
        self.register_buffer("kernel", torch.from_numpy(kernel).float().unsqueeze(1), persistent=False)
        mel, _ = get_mel_banks(num_mel_bins, nfft, float(sample_rate), low_freq, 0.0, 100.0, -500.0, 1.0)
        mel = torch.nn.functional.pad(mel.double(), (0, 1))  # the Nyquist bin has no weight
        self.register_buffer("mel", mel.t().contiguous().float(), persistent=False)  # [bins, num_mel_bins]
        self.bins = bins

    def num_frames(self, num_samples: int) -> int:
        return 0 if num_samples < self.frame_length else 1 + (num_samples - self.frame_length) // self.frame_shift

    def forward(self, audio: Tensor) -> Tensor:
        spec = torch.nn.functional.conv1d(audio.unsqueeze(1), self.kernel, stride=self.frame_shift)  # [B, 2 bins, T]
        re, im = spec[:, : self.bins], spec[:, self.bins :]
        power = (re * re + im * im).transpose(1, 2)  # [B, T, bins]
        return torch.log(torch.clamp(torch.matmul(power, self.mel), min=LOG_FLOOR))


__all__ = ["KaldiFbank", "LOG_FLOOR"]
