"""``serray predict --onnx MODEL.onnx FILE...``: a graph written by ``serray export`` run with
onnxruntime alone: no torch, no Ray (``tests/test_export.py`` checks ``sys.modules``).

Audio is decoded and checked by :func:`serray.data.audio.load_audio` (the same container, header and
length checks as everywhere); a file at another sample rate is resampled with scipy's polyphase
filter (torch's sinc resampler is what the torch path uses: the two differ by float rounding and
filter shape, not by anything the model hears). A graph exported without its encoder takes feature
files (``.npy``, ``[T, D]`` or ``[L, T, D]``) instead of audio.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from serray.errors import DataError

#: The metadata a graph must carry to be read here (see :func:`serray.export.metadata`).
REQUIRED = ("serray.format", "serray.input", "serray.labels", "serray.sample_rate", "serray.features")


class OnnxPredictor:
    """An exported graph, its labels and what it takes (``audio`` or ``features``)."""

    def __init__(self, path: str | Path, threads: Optional[int] = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise DataError("serray predict --onnx needs onnxruntime: pip install -e '.[export]'") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"no ONNX model at {self.path}")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own types for a file that is not a model
            raise DataError(f"{self.path} is not a readable ONNX model ({str(e).splitlines()[0][:200]})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        missing = [k for k in REQUIRED if k not in meta]
        if missing:
            raise DataError(f"{self.path} was not written by `serray export` (its metadata lacks {', '.join(missing)})")
        self.meta: Dict[str, str] = dict(meta)
        self.input = meta["serray.input"]
        self.labels: List[str] = json.loads(meta["serray.labels"])
        self.sample_rate = int(meta["serray.sample_rate"])
        self.features: Dict[str, Any] = json.loads(meta["serray.features"])

    def predict_input(self, x: np.ndarray) -> np.ndarray:
        """Probabilities [C] for one waveform [S] (``audio`` graphs) or feature array (``features``)."""
        return self.session.run(["probabilities"], {self.input: np.asarray(x, dtype=np.float32)[None]})[0][0]

    def load(self, path: str | Path, min_seconds: float = 0.1, max_seconds: Optional[float] = None) -> np.ndarray:
        """What the graph takes for one file: the mono waveform at the model's rate, or a feature array."""
        if self.input == "features":
            if Path(path).suffix != ".npy":
                raise DataError(f"{self.path} was exported without its encoder (--no-encoder): it takes features of "
                                f"'{self.features['encoder']}' as .npy files ([T, {self.features['dim']}]), not {path}")
            x = np.load(path, allow_pickle=False)
            want = 2 if int(self.features.get("num_layers", 1)) == 1 else 3
            if x.ndim != want or x.shape[-1] != int(self.features["dim"]):
                raise DataError(f"{path}: features of shape {x.shape}, the model takes "
                                f"{'[T, D]' if want == 2 else '[L, T, D]'} with D = {self.features['dim']}")
            return x
        from scipy.signal import resample_poly

        from serray.data.audio import audio_header, load_audio, polyphase_ratio

        sr = audio_header(path)[0]
        wav = load_audio(path, sr, min_seconds, max_seconds)  # at its own rate: decoding and checks only
        if sr != self.sample_rate:
            up, down = polyphase_ratio(sr, self.sample_rate)
            wav = resample_poly(wav, up, down).astype(np.float32)
        return wav

    def predict_files(self, paths: Sequence[str | Path], min_seconds: float = 0.1,
                      max_seconds: Optional[float] = None) -> List[Dict[str, Any]]:
        """One record per file: path, label and ``p_<label>`` probabilities."""
        rows = []
        for p in paths:
            probs = self.predict_input(self.load(p, min_seconds, max_seconds))
            if not np.isfinite(probs).all():
                raise DataError(f"the model produced non-finite probabilities for {p}")
            rows.append({"path": str(p), "label": self.labels[int(np.argmax(probs))],
                         **{f"p_{name}": float(v) for name, v in zip(self.labels, probs)}})
        return rows


__all__ = ["OnnxPredictor"]
