"""The exportable fbank (one strided convolution + mel matrix + log) against torchaudio's Kaldi fbank."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.mark.parametrize("num_mel_bins,sample_rate", [(80, 16000), (40, 8000)])
def test_kaldi_fbank_matches_torchaudio_on_noise_tones_and_near_silence(num_mel_bins, sample_rate):
    from serray.data.features.encoders import FbankEncoder
    from serray.models.fbank import KaldiFbank

    ref_enc, fb = FbankEncoder(num_mel_bins, sample_rate), KaldiFbank(num_mel_bins, sample_rate)
    rng = np.random.default_rng(0)
    for n in (fb.frame_length, 3 * sample_rate // 2, 5 * sample_rate):
        t = np.arange(n) / sample_rate
        for w in (0.1 * rng.normal(size=n), 0.3 * np.sin(2 * np.pi * 220 * t) + 0.01 * rng.normal(size=n),
                  1e-4 * rng.normal(size=n)):
            w = w.astype(np.float32)
            ref = ref_enc.encode([w])[0]
            got = fb(torch.from_numpy(w)[None])[0].numpy()
            assert got.shape == ref.shape == (fb.num_frames(n), num_mel_bins)
            # log-mel values of 5 to 25; float16 storage in training rounds them by ~0.01
            assert np.abs(got - ref).max() < 5e-3


def test_kaldi_fbank_counts_frames_as_snip_edges():
    from serray.models.fbank import KaldiFbank

    fb = KaldiFbank()
    assert [fb.num_frames(n) for n in (399, 400, 559, 560, 16000)] == [0, 1, 1, 2, 98]
    assert fb(torch.zeros(1, 560)).shape == (1, 2, 80)
