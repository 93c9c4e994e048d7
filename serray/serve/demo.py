"""A servable model without training, and synthetic clips: for the Serve tests, the bench and smoke tests.

:func:`make_demo_checkpoint` writes a random-init classifier checkpoint in the same format as
``serray finetune`` (``meta.json`` as :meth:`FinetuneTask.checkpoint_meta` writes it, fbank
features), optionally with a frozen WAP-Transformer adapter body of the default size. Its
predictions are meaningless; its compute and its code path are the real ones.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

import numpy as np


def make_demo_checkpoint(directory: str | Path, *, adapter: bool = False, seed: int = 0, cfg=None) -> Path:
    """Write a random-init classifier checkpoint to ``directory`` and return it.

    Args:
        adapter: include a frozen adapter body (``finetune.mode=frozen`` shape, sizes from
            ``cfg.adapter``) instead of the no-adapter baseline (``mode=none``).
        cfg: the config whose encoder / adapter / finetune sections shape the model (default: base.yaml).
    """
    import torch

    from serray.config import load_config, to_yaml
    from serray.data.features.encoders import describe_encoder
    from serray.data.corpora.base import LABELS
    from serray.models.classifier import EmotionClassifier
    from serray.train.checkpoint import MODEL_KEY, save_checkpoint

    cfg = cfg if cfg is not None else load_config()
    features = describe_encoder(cfg.encoder)
    body = None
    if adapter:
        a = cfg.adapter
        body = {"input_dim": features["dim"], "d_model": a.d_model, "num_layers": a.num_layers,
                "num_heads": a.num_heads, "ff_dim": a.ff_dim, "dropout": a.dropout,
                "num_input_layers": features["num_layers"]}
    torch.manual_seed(seed)
    ft = cfg.finetune
    model = EmotionClassifier(input_dim=features["dim"], num_classes=len(LABELS), num_input_layers=features["num_layers"],
                              body=body, freeze_body=adapter, attention_dim=ft.attention_dim, hidden_dim=ft.hidden_dim,
                              dropout=ft.head_dropout)
    meta = {"kind": "classifier", "model": model.config, "features": features, "labels": list(LABELS),
            "fold": None, "test_session": None, "mode": "frozen" if adapter else "none",
            "config_hash": "demo", "step": 0, "epoch": 0}
    return save_checkpoint(directory, {MODEL_KEY: model.state_dict(), "step": 0, "epoch": 0}, meta, to_yaml(cfg))


def synthetic_clip(seconds: float = 1.5, sample_rate: int = 16000, seed: int = 0, channels: int = 1) -> np.ndarray:
    """A voiced-sounding clip: a gliding harmonic tone with an amplitude envelope and a little noise."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    f0 = 120 + 60 * rng.random() + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    x = sum(np.sin(k * phase) / k for k in range(1, 6))
    x *= 0.5 * (1 - np.cos(2 * np.pi * np.minimum(t / max(seconds, 1e-3), 1.0))) * 0.3
    x = x + 0.01 * rng.standard_normal(n)
    x = x.astype(np.float32)
    if channels > 1:
        x = np.stack([x * (1 - 0.1 * c) for c in range(channels)], axis=1)
    return x


def encode_audio(data: np.ndarray, sample_rate: int = 16000, fmt: str = "WAV", subtype: Optional[str] = None) -> bytes:
    """Samples -> the bytes of a WAV/FLAC file (``subtype`` e.g. PCM_16, PCM_U8, PCM_32, FLOAT)."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, data, sample_rate, format=fmt, subtype=subtype or "PCM_16")
    return buf.getvalue()


def synthetic_recording(clips, gap_s: float = 1.0, noise_db: float = -60.0, sample_rate: int = 16000, seed: int = 0,
                        lead_s: Optional[float] = None):
    """Clips joined by ``gap_s`` of silence (``lead_s`` before the first, default ``gap_s``), with white
    background noise of ``noise_db`` dBFS RMS over the whole recording (None: digital silence between
    clean clips), as one long recording: ``(samples, [(start_s, end_s), ...])``, the span of every clip."""
    gap = int(round(gap_s * sample_rate))
    lead = gap if lead_s is None else int(round(lead_s * sample_rate))
    parts, spans, pos = [np.zeros(lead, np.float32)], [], lead
    for clip in clips:
        clip = np.asarray(clip, np.float32)
        parts += [clip, np.zeros(gap, np.float32)]
        spans.append((pos / sample_rate, (pos + len(clip)) / sample_rate))
        pos += len(clip) + gap
    out = np.concatenate(parts)
    if noise_db is not None:
        out += (10 ** (noise_db / 20) * np.random.default_rng(seed).standard_normal(len(out))).astype(np.float32)
    return out, spans


class LevelModel:
    """A stand-in model for tests: the label is the waveform's level (``ang`` above ``loud_db`` dBFS,
    ``hap`` above ``mid_db``, else ``sad``), so a segment's label says which audio it holds."""

    labels = ["neu", "hap", "sad", "ang"]
    features = {"sample_rate": 16000}

    def __init__(self, loud_db: float = -17.0, mid_db: float = -27.0):
        self.loud_db, self.mid_db = loud_db, mid_db

    def predict_waveforms(self, wavs):
        out = np.zeros((len(wavs), 4), np.float32)
        for i, w in enumerate(wavs):
            db = 10 * np.log10(np.mean(np.square(w)) + 1e-12)
            out[i, 3 if db > self.loud_db else 1 if db > self.mid_db else 2] = 1.0
        return out
