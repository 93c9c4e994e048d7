"""Offline prediction from a classifier checkpoint: feature arrays, waveforms or audio files.

:class:`Predictor` is the checkpoint's :class:`~serray.train.scoring.Scorer` (which scores the
held-out session of every fold) plus the frozen encoder: it runs ``serray predict`` and backs the
Serve deployment, so the preprocessing (mono mix-down, 16 kHz resampling, the frozen encoder) and the
model are identical everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import pandas as pd

from serray.errors import DataError
from serray.train.checkpoint import ENCODER_DIR
from serray.train.scoring import Scorer

__all__ = ["Predictor"]


class Predictor(Scorer):
    """A :class:`~serray.train.scoring.Scorer` with the frozen encoder its features were made with: it
    scores waveforms and audio files as well as features."""

    def encoder(self):
        """The frozen encoder the features were made with (built on first use)."""
        if self._encoder is None:
            from omegaconf import OmegaConf

            from serray.data.features.encoders import build_encoder, encoder_section

            f = self.features
            bundled = self.directory / ENCODER_DIR if self.directory is not None else None
            name = str(bundled) if bundled is not None and (bundled / "config.json").is_file() else None
            cfg = OmegaConf.create({**encoder_section(f, name), "local_files_only": True,
                                    "device": "cpu" if self.device.type == "cpu" else "cuda"})
            self._encoder = build_encoder(cfg)
        return self._encoder

    def predict_waveforms(self, wavs: Sequence[np.ndarray]) -> np.ndarray:
        """Probabilities [N, C] for mono 16 kHz waveforms."""
        return self.predict_arrays(self.encoder().encode(list(wavs)))

    def predict_waveform_outputs(self, wavs: Sequence[np.ndarray]) -> dict:
        """:meth:`predict_outputs` for mono 16 kHz waveforms."""
        return self.predict_outputs(self.encoder().encode(list(wavs)))

    def predict_records(self, wavs: Sequence[np.ndarray]) -> List[dict]:
        """One answer dict per mono 16 kHz waveform: ``label`` and ``probabilities`` (None / empty for a
        dimensional-only model) and, for a dimensional or multitask model, ``dimensions`` on the corpus's
        rating scale (what :mod:`serray.segment` reports per segment and averages)."""
        res = self.predict_waveform_outputs(wavs)
        out = []
        for i in range(len(wavs)):
            rec: dict = {"label": None, "probabilities": {}}
            if res["probs"] is not None:
                p = res["probs"][i]
                rec.update(label=self.labels[int(np.argmax(p))], probabilities={k: float(v) for k, v in zip(self.labels, p)})
            if res["dims"] is not None:
                rec["dimensions"] = {k: float(v) for k, v in zip(self.dimensions, res["dims"][i])}
            out.append(rec)
        return out

    def predict_files(self, paths: Sequence[str | Path], min_seconds: float = 0.1,
                      max_seconds: Optional[float] = None) -> pd.DataFrame:
        """Label and probabilities for audio files (WAV/FLAC, any channels / sample rate)."""
        from serray.data.audio import load_audio

        sr = int(self.features.get("sample_rate", 16000))
        wavs = [load_audio(p, sr, min_seconds, max_seconds) for p in paths]
        if self.task != "categorical":
            return self._dimension_frame(paths, self.predict_waveform_outputs(wavs))
        probs = self.predict_waveforms(wavs)
        bad = [str(p) for p, row in zip(paths, probs) if not np.isfinite(row).all()]
        if bad:
            raise DataError(f"the model produced non-finite probabilities for {', '.join(bad)}")
        df = pd.DataFrame({"path": [str(p) for p in paths], "label": [self.labels[i] for i in probs.argmax(1)]})
        for j, name in enumerate(self.labels):
            df[f"p_{name}"] = probs[:, j]
        return df

    def _dimension_frame(self, paths, res: dict) -> pd.DataFrame:
        """A dimensional / multitask model's answer: the dimensions on the corpus's scale (``scale``
        names it) and, for multitask, the label and probabilities."""
        rows = [r for r in (res["probs"], res["dims"]) if r is not None]
        bad = [str(p) for i, p in enumerate(paths) if not all(np.isfinite(r[i]).all() for r in rows)]
        if bad:
            raise DataError(f"the model produced non-finite outputs for {', '.join(bad)}")
        df = pd.DataFrame({"path": [str(p) for p in paths]})
        if res["probs"] is not None:
            df["label"] = [self.labels[i] for i in res["probs"].argmax(1)]
            for j, name in enumerate(self.labels):
                df[f"p_{name}"] = res["probs"][:, j]
        for j, name in enumerate(self.dimensions):
            df[name] = res["dims"][:, j]
        df["scale"] = self.scale_name()
        return df
