"""Offline prediction from a classifier checkpoint: stored features, feature arrays or audio files.

The same :class:`Predictor` scores the held-out session of every fold, runs ``serray predict`` and
backs the Serve deployment, so the preprocessing (mono mix-down, 16 kHz resampling, the frozen
encoder) and the model are identical everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from serray.data.features import pad_features
from serray.data.stored import decode_feature
from serray.data.iemocap import LABELS
from serray.errors import DataError
from serray.models.classifier import EmotionClassifier
from serray.train.checkpoint import ENCODER_DIR, MODEL_KEY, load_checkpoint


class Predictor:
    """A trained :class:`EmotionClassifier` plus its label set and feature identity."""

    def __init__(self, model: EmotionClassifier, meta: dict, device: str | torch.device = "cpu",
                 directory: Optional[str | Path] = None):
        self.device = torch.device(device)
        self.directory = Path(directory) if directory is not None else None
        self.model = model.to(self.device).eval()
        self.meta = meta
        self.labels: List[str] = list(meta.get("labels", LABELS))
        self.features = meta["features"]
        self._encoder = None

    @classmethod
    def from_checkpoint(cls, directory: str | Path, device: str | torch.device = "cpu") -> "Predictor":
        """Rebuild the classifier from a checkpoint directory (weights-only load)."""
        from serray.errors import CheckpointError

        state, meta = load_checkpoint(directory)
        if meta.get("kind") != "classifier":
            raise DataError(f"{directory} holds a '{meta.get('kind')}' checkpoint, not a classifier")
        if not isinstance(meta.get("model"), dict) or not isinstance(meta.get("features"), dict):
            raise CheckpointError(f"unreadable checkpoint {directory}: meta.json lacks the model or features record")
        try:
            model = EmotionClassifier(**meta["model"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"unreadable checkpoint {directory}: meta.json's model arguments do not build a "
                                  f"classifier ({str(e).splitlines()[0]})") from None
        try:
            model.load_state_dict(state[MODEL_KEY])
        except (KeyError, RuntimeError) as e:
            raise CheckpointError(f"unreadable checkpoint {directory}: its weights do not fit its model "
                                  f"({str(e).strip().splitlines()[0]})") from None
        return cls(model, meta, device, directory=directory)

    @torch.no_grad()
    def predict_arrays(self, feats: Sequence[np.ndarray], batch_size: int = 16) -> np.ndarray:
        """Class probabilities [N, C] for feature arrays [T, D] (or [L, T, D])."""
        probs = []
        order = np.argsort([f.shape[-2] for f in feats])  # similar lengths per batch
        for i in range(0, len(feats), batch_size):
            idx = order[i : i + batch_size]
            x, mask = pad_features([np.asarray(feats[j], dtype=np.float32) for j in idx])
            logits = self.model(x.to(self.device), mask.to(self.device))
            probs.append((idx, torch.softmax(logits.float(), dim=-1).cpu().numpy()))
        out = np.zeros((len(feats), len(self.labels)), dtype=np.float32)
        for idx, p in probs:
            out[idx] = p
        return out

    def predict_parquet(self, files: Iterable[str | Path], batch_rows: int = 64,
                        utt_ids: Optional[Sequence[str]] = None) -> pd.DataFrame:
        """Predict the rows of stored feature files (streamed in record batches); only ``utt_ids``
        when given (e.g. a fold's four-class test utterances)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        from serray import storage

        frames = []
        cols = ["utt_id", "label", "speaker", "num_frames", "dim", "num_layers", "feat"]
        keep = pa.array(list(utt_ids), pa.string()) if utt_ids is not None else None
        for f in files:
            for rb in storage.parquet_file(f).iter_batches(batch_size=batch_rows, columns=cols):
                if keep is not None:
                    rb = rb.filter(pc.is_in(rb.column("utt_id"), value_set=keep))
                    if rb.num_rows == 0:
                        continue
                d = rb.to_pydict()
                feats = [decode_feature(b, t, dm, l) for b, t, dm, l in zip(d["feat"], d["num_frames"], d["dim"], d["num_layers"])]
                p = self.predict_arrays(feats)
                df = pd.DataFrame({"utt_id": d["utt_id"], "speaker": d["speaker"], "label": d["label"],
                                   "pred": [self.labels[i] for i in p.argmax(1)]})
                for j, name in enumerate(self.labels):
                    df[f"p_{name}"] = p[:, j]
                frames.append(df)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def encoder(self):
        """The frozen encoder the features were made with (built on first use)."""
        if self._encoder is None:
            from omegaconf import OmegaConf

            from serray.data.encoders import build_encoder

            f = self.features
            bundled = self.directory / ENCODER_DIR if self.directory is not None else None
            name = str(bundled) if bundled is not None and (bundled / "config.json").is_file() else f["encoder"]
            cfg = OmegaConf.create({"name": name, "layers": list(f.get("layers") or []),
                                    "sample_rate": int(f.get("sample_rate", 16000)), "num_mel_bins": int(f["dim"]),
                                    "local_files_only": True, "device": "cpu" if self.device.type == "cpu" else "cuda"})
            self._encoder = build_encoder(cfg)
        return self._encoder

    def predict_waveforms(self, wavs: Sequence[np.ndarray]) -> np.ndarray:
        """Probabilities [N, C] for mono 16 kHz waveforms."""
        return self.predict_arrays(self.encoder().encode(list(wavs)))

    def predict_files(self, paths: Sequence[str | Path], min_seconds: float = 0.1,
                      max_seconds: Optional[float] = None) -> pd.DataFrame:
        """Label and probabilities for audio files (WAV/FLAC, any channels / sample rate)."""
        from serray.data.audio import load_audio

        sr = int(self.features.get("sample_rate", 16000))
        wavs = [load_audio(p, sr, min_seconds, max_seconds) for p in paths]
        probs = self.predict_waveforms(wavs)
        bad = [str(p) for p, row in zip(paths, probs) if not np.isfinite(row).all()]
        if bad:
            raise DataError(f"the model produced non-finite probabilities for {', '.join(bad)}")
        df = pd.DataFrame({"path": [str(p) for p in paths], "label": [self.labels[i] for i in probs.argmax(1)]})
        for j, name in enumerate(self.labels):
            df[f"p_{name}"] = probs[:, j]
        return df
