"""Scoring with a trained classifier checkpoint: the model rebuilt from its ``meta.json``, applied to
feature arrays and to stored feature rows.

A fold's test split is scored here (:func:`serray.train.finetune.run_fold`), and
:class:`serray.predict.Predictor` adds the audio front end on top of the same class, so the model,
the padding and the label order are identical wherever a checkpoint is scored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from serray.data.corpora.base import LABELS
from serray.data.features.stored import decode_feature
from serray.data.features.training import pad_features, session_paths
from serray.errors import DataError
from serray.models.classifier import EmotionClassifier
from serray.models.dimensional import build_model
from serray.train.checkpoint import MODEL_KEY, load_checkpoint


class Scorer:
    """A trained :class:`EmotionClassifier` plus its label set and feature identity, scoring feature
    arrays and stored feature rows (a fold's test split)."""

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
    def from_checkpoint(cls, directory: str | Path, device: str | torch.device = "cpu") -> "Scorer":
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

    def predict_stored(self, features_dir: str | Path, sessions: Sequence[int],
                       utt_ids: Optional[Sequence[str]] = None) -> pd.DataFrame:
        """:meth:`predict_parquet` over the feature store's files of ``sessions`` (a fold's test group)."""
        return self.predict_parquet(session_paths(features_dir, sessions), utt_ids=utt_ids)

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

    def scale_name(self) -> str:
        """The dimensions' scale in words, e.g. ``1-5``."""
        lo, hi = self.dimension_scale
        return f"{lo:g}-{hi:g}"
