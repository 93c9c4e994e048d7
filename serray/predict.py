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
from serray.models.dimensional import build_model
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
        self.task = str(meta.get("task", "categorical"))  # finetune.task the model was trained for
        dims = meta.get("dimensions") or {}
        self.dimensions: List[str] = list(dims.get("names", []))  # dimensional / multitask models only
        self.dimension_scale = tuple(dims.get("scale", (0.0, 1.0)))  # the corpus's rating scale
        self.has_classes = self.task != "dimensional"

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
            model = build_model(meta["model"])
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
        if not self.has_classes:
            raise DataError("this model predicts emotion dimensions, not classes (use predict_outputs)")
        return self.predict_outputs(feats, batch_size)["probs"]

    @torch.no_grad()
    def predict_outputs(self, feats: Sequence[np.ndarray], batch_size: int = 16) -> dict:
        """``{"probs": [N, C] or None, "dims": [N, K] on the corpus's rating scale or None}``."""
        probs, dims = [], []
        order = np.argsort([f.shape[-2] for f in feats])  # similar lengths per batch
        for i in range(0, len(feats), batch_size):
            idx = order[i : i + batch_size]
            x, mask = pad_features([np.asarray(feats[j], dtype=np.float32) for j in idx])
            out = self.model(x.to(self.device), mask.to(self.device))
            logits = out.get("logits") if isinstance(out, dict) else out
            if logits is not None:
                probs.append((idx, torch.softmax(logits.float(), dim=-1).cpu().numpy()))
            if isinstance(out, dict):
                lo, hi = self.dimension_scale
                dims.append((idx, lo + (hi - lo) * out["dims"].float().cpu().numpy()))
        result = {"probs": None, "dims": None}
        for key, parts, width in (("probs", probs, len(self.labels)), ("dims", dims, len(self.dimensions))):
            if parts:
                result[key] = np.zeros((len(feats), width), dtype=np.float32)
                for idx, p in parts:
                    result[key][idx] = p
        return result

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
                res = self.predict_outputs(feats)
                df = pd.DataFrame({"utt_id": d["utt_id"], "speaker": d["speaker"], "label": d["label"]})
                p = res["probs"]
                if p is not None:
                    df["pred"] = [self.labels[i] for i in p.argmax(1)]
                    for j, name in enumerate(self.labels):
                        df[f"p_{name}"] = p[:, j]
                for j, name in enumerate(self.dimensions):  # on the corpus's scale
                    df[f"pred_{name}"] = res["dims"][:, j]
                frames.append(df)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def encoder(self):
        """The frozen encoder the features were made with (built on first use)."""
        if self._encoder is None:
            from omegaconf import OmegaConf

            from serray.data.encoders import build_encoder, encoder_section

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

    def scale_name(self) -> str:
        """The dimensions' scale in words, e.g. ``1-5``."""
        lo, hi = self.dimension_scale
        return f"{lo:g}-{hi:g}"

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
