"""``serray predict --onnx MODEL.onnx FILE...``: a graph written by ``serray export`` run with
onnxruntime alone: no torch, no Ray (``tests/test_export.py`` checks ``sys.modules``).

Audio is decoded and checked by :func:`serray.data.audio.load_audio` (the same container, header and
length checks as everywhere); a file at another sample rate is resampled with scipy's polyphase
filter (torch's sinc resampler is what the torch path uses: the two differ by float rounding and
filter shape, not by anything the model hears). A graph exported without its encoder takes feature
files (``.npy``, ``[T, D]`` or ``[L, T, D]``) instead of audio.

The answer has the columns of ``serray predict`` for the model's task (``serray.task`` in the
metadata; a graph without it is categorical): ``label`` and ``p_<label>`` for a class head, one
column per dimension on the corpus's rating scale plus ``scale`` for a dimensional head, both for
multitask. Everything a user can hand it (a file that is not an ONNX model, a graph serray did not
write or whose metadata does not fit its inputs and outputs, audio for a feature graph, features of
the wrong shape, type or values) is a :class:`~serray.errors.DataError`, never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from serray.errors import DataError

#: The metadata a graph must carry to be read here (see :func:`serray.export.metadata`).
REQUIRED = ("serray.format", "serray.input", "serray.labels", "serray.sample_rate", "serray.features")
#: Output names (:func:`serray.export.output_names`; repeated here so that torch is never imported).
PROBABILITIES, DIMENSIONS = "probabilities", "dimensions"
TASK_OUTPUTS = {"categorical": (PROBABILITIES,), "dimensional": (DIMENSIONS,), "multitask": (PROBABILITIES, DIMENSIONS)}


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


class OnnxPredictor:
    """An exported graph, what it takes (``audio`` or ``features``) and what it answers (its task:
    class labels, emotion dimensions or both)."""

    def __init__(self, path: str | Path, threads: Optional[int] = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise DataError("serray predict --onnx needs onnxruntime: pip install -e '.[export]'") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"no ONNX model at {self.path}")
        if self.path.stat().st_size == 0:
            raise DataError(f"{self.path} is empty (0 bytes), not an ONNX model")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        opts.log_severity_level = 3  # errors are reported below, not printed by onnxruntime too
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
            meta = self.session.get_modelmeta().custom_metadata_map
        except Exception as e:  # onnxruntime raises its own types for a file that is not a model
            raise DataError(f"{self.path} is not a readable ONNX model (truncated, or not ONNX: {_first_line(e)})") from None
        missing = [k for k in REQUIRED if k not in meta]
        if missing:
            raise DataError(f"{self.path} was not written by `serray export` (its metadata lacks {', '.join(missing)})")
        self.meta: Dict[str, str] = dict(meta)
        self._read_metadata()
        self._check_graph()

    def _bad(self, why: str) -> DataError:
        return DataError(f"{self.path}: its serray metadata does not fit the graph ({why}); export the entry again "
                         "with `serray export --format onnx`")

    def _read_metadata(self) -> None:
        meta = self.meta
        try:
            self.input = meta["serray.input"]
            self.labels: List[str] = json.loads(meta["serray.labels"])
            self.sample_rate = int(meta["serray.sample_rate"])
            self.features: Dict[str, Any] = json.loads(meta["serray.features"])
            self.task = meta.get("serray.task", "categorical")
            dims = json.loads(meta.get("serray.dimensions", "null")) or {}
            self.layers = int(self.features.get("num_layers", 1) or 1) if isinstance(self.features, dict) else 1
        except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
            raise DataError(f"{self.path}: its serray metadata is unreadable ({_first_line(e)})") from None
        if self.input not in ("audio", "features"):
            raise self._bad(f"serray.input {self.input!r} is neither 'audio' nor 'features'")
        if self.task not in TASK_OUTPUTS:
            raise self._bad(f"serray.task {self.task!r} is not one of {', '.join(TASK_OUTPUTS)}")
        if not isinstance(self.labels, list) or not all(isinstance(x, str) for x in self.labels):
            raise self._bad("serray.labels is not a list of names")
        if self.task != "dimensional" and not self.labels:
            raise self._bad("serray.labels is empty for a model with a class head")
        if not isinstance(self.features, dict) or not isinstance(self.features.get("dim"), int) or self.features["dim"] < 1:
            raise self._bad("serray.features lacks the feature dimension 'dim'")
        if self.sample_rate <= 0:
            raise self._bad(f"serray.sample_rate is {self.sample_rate}")
        self.dimensions: List[str] = []
        self.dimension_scale = (0.0, 1.0)
        if self.task != "categorical":
            names, scale = (dims.get("names"), dims.get("scale")) if isinstance(dims, dict) else (None, None)
            if not isinstance(names, list) or not names or not isinstance(scale, list) or len(scale) != 2:
                raise self._bad(f"a {self.task} model's serray.dimensions must hold 'names' and a 'scale' [lo, hi]")
            self.dimensions = [str(n) for n in names]
            try:
                self.dimension_scale = (float(scale[0]), float(scale[1]))
            except (TypeError, ValueError):
                raise self._bad(f"serray.dimensions' scale {scale!r} is not two numbers") from None

    def _check_graph(self) -> None:
        """The metadata against the graph's own inputs and outputs (names, ranks, fixed sizes)."""
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        if self.input not in inputs or len(inputs) != 1:
            raise self._bad(f"serray.input is {self.input!r}, the graph's inputs are {sorted(inputs)}")
        shape = inputs[self.input]
        rank = 2 if self.input == "audio" else (3 if self.layers == 1 else 4)
        if len(shape) != rank:
            raise self._bad(f"input '{self.input}' has rank {len(shape)}, the metadata implies {rank}")
        if self.input == "features" and isinstance(shape[-1], int) and shape[-1] != int(self.features["dim"]):
            raise self._bad(f"input 'features' takes D = {shape[-1]}, serray.features says {self.features['dim']}")
        if self.input == "features" and self.layers > 1 and isinstance(shape[1], int) and shape[1] != self.layers:
            raise self._bad(f"input 'features' takes L = {shape[1]} layers, serray.features says {self.layers}")
        for name, width in ((PROBABILITIES, len(self.labels)), (DIMENSIONS, len(self.dimensions))):
            if name not in TASK_OUTPUTS[self.task]:
                continue
            if name not in outputs:
                raise self._bad(f"a {self.task} model needs output '{name}', the graph has {sorted(outputs)}")
            if not outputs[name]:
                raise self._bad(f"output '{name}' is a scalar, not [1, {width}]")
            if isinstance(outputs[name][-1], int) and outputs[name][-1] != width:
                raise self._bad(f"output '{name}' has {outputs[name][-1]} values, the metadata names {width}")
        self.outputs = list(TASK_OUTPUTS[self.task])

    def predict_outputs(self, x: np.ndarray) -> Dict[str, Optional[np.ndarray]]:
        """``{"probs": [C] or None, "dims": [K] on the corpus's rating scale or None}`` for one waveform
        [S] (``audio`` graphs) or feature array (``features``)."""
        try:
            res = self.session.run(self.outputs, {self.input: np.asarray(x, dtype=np.float32)[None]})
        except Exception as e:  # onnxruntime's own error types: a shape or value the graph cannot take
            raise DataError(f"{self.path} cannot run on an input of shape {tuple(np.shape(x))} ({_first_line(e)})") from None
        got = dict(zip(self.outputs, (np.asarray(r)[0] for r in res)))
        return {"probs": got.get(PROBABILITIES), "dims": got.get(DIMENSIONS)}

    def predict_input(self, x: np.ndarray) -> np.ndarray:
        """Probabilities [C] for one waveform [S] (``audio`` graphs) or feature array (``features``)."""
        if PROBABILITIES not in self.outputs:
            raise DataError(f"{self.path} predicts emotion dimensions, not classes (use predict_outputs)")
        return self.predict_outputs(x)["probs"]

    def _load_features(self, path: str | Path) -> np.ndarray:
        want = 2 if self.layers == 1 else 3
        shape = "[T, D]" if want == 2 else "[L, T, D]"
        if Path(path).suffix != ".npy":
            raise DataError(f"{self.path} was exported without its encoder (--no-encoder): it takes features of "
                            f"'{self.features.get('encoder')}' as .npy files ({shape}, D = {self.features['dim']}), not {path}")
        try:
            with open(path, "rb") as fh:
                magic = fh.read(6)
        except FileNotFoundError:
            raise DataError(f"feature file not found: {path}") from None
        except OSError as e:
            raise DataError(f"cannot read {path} ({_first_line(e)})") from None
        if magic != b"\x93NUMPY":
            raise DataError(f"{path} is not a .npy file (no NumPy header: audio, or another format, named .npy?); "
                            f"this graph takes feature arrays {shape}")
        try:
            x = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:  # pickled objects, truncated
            why = "it holds pickled Python objects, not numbers" if "pickle" in str(e) else _first_line(e)
            raise DataError(f"{path} is not a readable .npy feature array ({why})") from None
        if not isinstance(x, np.ndarray) or x.dtype.kind not in "fiub":
            raise DataError(f"{path}: features of type {getattr(x, 'dtype', type(x).__name__)}, the model takes real numbers")
        if x.ndim != want or x.shape[-1] != int(self.features["dim"]) or (want == 3 and x.shape[0] != self.layers):
            layers = f"L = {self.layers}, " if want == 3 else ""
            raise DataError(f"{path}: features of shape {x.shape}, the model takes {shape} with {layers}D = {self.features['dim']}")
        if x.shape[-2] < 1:
            raise DataError(f"{path}: no frames (shape {x.shape}): the model needs at least one")
        if not np.isfinite(x).all():
            raise DataError(f"{path}: features hold NaN or infinite values")
        return x.astype(np.float32)

    def load(self, path: str | Path, min_seconds: float = 0.1, max_seconds: Optional[float] = None) -> np.ndarray:
        """What the graph takes for one file: the mono waveform at the model's rate, or a feature array."""
        if self.input == "features":
            return self._load_features(path)
        from scipy.signal import resample_poly

        from serray.data.audio import audio_header, load_audio, polyphase_ratio

        sr = audio_header(path)[0]
        wav = load_audio(path, sr, min_seconds, max_seconds)  # at its own rate: decoding and checks only
        if sr != self.sample_rate:
            up, down = polyphase_ratio(sr, self.sample_rate)
            wav = resample_poly(wav, up, down).astype(np.float32)
        if len(wav) < int(0.025 * self.sample_rate):  # one 25 ms analysis window (the graph's minimum)
            raise DataError(f"{path} is {len(wav) / self.sample_rate:.3f} s long: the model needs at least 0.025 s")
        return wav

    def scale_name(self) -> str:
        """The dimensions' scale in words, e.g. ``1-5``."""
        lo, hi = self.dimension_scale
        return f"{lo:g}-{hi:g}"

    def predict_files(self, paths: Sequence[str | Path], min_seconds: float = 0.1,
                      max_seconds: Optional[float] = None) -> List[Dict[str, Any]]:
        """One record per file, with the columns of ``serray predict``: path, then ``label`` and
        ``p_<label>`` (a class head), then one value per dimension and ``scale`` (a dimensional head)."""
        rows = []
        for p in paths:
            res = self.predict_outputs(self.load(p, min_seconds, max_seconds))
            if not all(np.isfinite(v).all() for v in res.values() if v is not None):
                raise DataError(f"the model produced non-finite outputs for {p}")
            row: Dict[str, Any] = {"path": str(p)}
            if res["probs"] is not None:
                row["label"] = self.labels[int(np.argmax(res["probs"]))]
                row.update({f"p_{name}": float(v) for name, v in zip(self.labels, res["probs"])})
            if res["dims"] is not None:
                row.update({name: float(v) for name, v in zip(self.dimensions, res["dims"])})
                row["scale"] = self.scale_name()
            rows.append(row)
        return rows


__all__ = ["OnnxPredictor"]
