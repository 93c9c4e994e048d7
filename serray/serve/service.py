"""What a Serve replica holds and does, without Ray: the model of a registry entry, decoding, inference.

:class:`SERService` wraps a :class:`~serray.predict.Predictor` (frozen encoder + classifier + labels),
so an HTTP prediction runs exactly the offline code path: ``load_audio`` -> ``encoder.encode`` ->
``predict_arrays`` (``Predictor.predict_waveforms``). It also keeps the replica's counters
(requests, errors by status, batch sizes) that ``GET /stats`` and ``GET /info`` report.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from serray import storage
from serray.data.audio import MAX_CHANNELS, MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, SERVED_SUBTYPES, load_audio
from serray.errors import AudioError
from serray.serve.parsing import AUDIO_TYPES, MULTIPART


#: Version of the answer of ``POST /predict`` (docs/serving.md): 2 added ``schema`` and ``task`` to every
#: answer, and ``dimensions`` / ``scale`` for dimensional and multitask models (1: the four-class answer alone).
ANSWER_SCHEMA = 2

#: Key of an :meth:`SERService.infer` item whose probabilities are not finite (the endpoint answers 500).
NON_FINITE = "_non_finite"


def json_safe(obj: Any) -> Any:
    """A copy with every non-finite float replaced by None (JSON has no NaN / Infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    return obj


def _without_cluster_address(cfg: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The training config a client sees holds no address of the cluster (``ray.address``) nor of the
    tracking store (``tracking.uri``: a server's address, or a path on the training machine)."""
    if isinstance(cfg, dict) and isinstance(cfg.get("ray"), dict) and cfg["ray"].get("address"):
        cfg = {**cfg, "ray": {**cfg["ray"], "address": "(hidden)"}}
    if isinstance(cfg, dict) and isinstance(cfg.get("tracking"), dict) and cfg["tracking"].get("uri"):
        cfg = {**cfg, "tracking": {**cfg["tracking"], "uri": "(hidden)"}}
    return cfg


class SERService:
    """The model card, the predictor and the counters of one replica.

    Args:
        checkpoint: classifier checkpoint directory (a registry entry's ``model/``).
        card: the registry entry record (id, created, source, metrics, ...).
        settings: the ``serve`` config section as a plain dict.
        device: torch device of the classifier and encoder.
    """

    def __init__(self, checkpoint: str | Path, card: Dict[str, Any], settings: Dict[str, Any], device: str = "cpu"):
        from serray.predict import Predictor

        self.checkpoint = Path(checkpoint)
        self.card = dict(card)
        self.settings = dict(settings)
        self.predictor = Predictor.from_checkpoint(self.checkpoint, device=device)
        self.predictor.encoder()  # build the frozen encoder now, not on the first request
        self.version = str(self.card.get("id") or self.checkpoint.name)
        self.sample_rate = int(self.predictor.features.get("sample_rate", 16000))
        self.max_body_bytes = int(float(settings["max_body_mb"]) * 2**20)
        self._lock = threading.Lock()
        self.started = time.time()
        self.requests = 0
        self.predictions = 0
        self.errors: Counter = Counter()
        self.batches = 0
        self.batch_sizes: Counter = Counter()
        self.infer_s = 0.0  # time in the encoder + classifier

    # ------------------------------------------------------------------ work

    def decode(self, audio: bytes) -> np.ndarray:
        """Encoded audio bytes -> mono float32 at the model's rate (raises AudioError).

        The container must be one of ``ALLOWED_FORMATS`` and complete, and the header's rate, channel
        count and length are checked against the ``serve`` limits before any sample is decoded; at most
        ``serve.max_seconds`` is decoded (all in ``load_audio``, the same as offline).
        """
        s = self.settings
        try:
            return load_audio(audio, self.sample_rate, float(s["min_seconds"]), float(s["max_seconds"]),
                              subtypes=SERVED_SUBTYPES, max_channels=int(s.get("max_channels", MAX_CHANNELS)),
                              min_sample_rate=int(s.get("min_sample_rate", MIN_SAMPLE_RATE)),
                              max_sample_rate=int(s.get("max_sample_rate", MAX_SAMPLE_RATE)))
        except AudioError as e:  # libsndfile names the buffer object; the client knows it as its upload
            raise AudioError(re.sub(r"Error opening <_io\.BytesIO object at 0x[0-9a-fA-F]+>: ", "", str(e))) from None

    def infer(self, wavs: Sequence[np.ndarray]) -> List[Dict[str, Any]]:
        """One padded forward for a batch of waveforms -> one response dict per waveform."""
        t0 = time.perf_counter()
        if self.predictor.task != "categorical":
            res = self.predictor.predict_waveform_outputs(list(wavs))
            probs, dims = res["probs"], res["dims"]
        else:
            probs, dims = self.predictor.predict_waveforms(list(wavs)), None
        spent = time.perf_counter() - t0
        labels = self.predictor.labels
        with self._lock:
            self.infer_s += spent
            self.batches += 1
            self.batch_sizes[len(wavs)] += 1
            self.predictions += len(wavs)
        out: List[Dict[str, Any]] = []
        for i, w in enumerate(wavs):  # one bad item never spoils the others of its batch
            p = probs[i] if probs is not None else None
            d = dims[i] if dims is not None else None
            if any(v is not None and not np.isfinite(v).all() for v in (p, d)):
                out.append({NON_FINITE: "the model produced non-finite "
                                        f"{'probabilities' if d is None else 'outputs'} for this audio"})
                continue
            answer: Dict[str, Any] = {"schema": ANSWER_SCHEMA, "task": self.predictor.task}
            if p is not None:
                answer.update(label=labels[int(np.argmax(p))],
                              probabilities={name: float(v) for name, v in zip(labels, p)})
            if d is not None:  # on the corpus's rating scale, which "scale" names
                answer.update(dimensions={name: float(v) for name, v in zip(self.predictor.dimensions, d)},
                              scale=[float(v) for v in self.predictor.dimension_scale])
            answer.update(version=self.version, duration_s=round(len(w) / self.sample_rate, 4), batch_size=len(wavs))
            out.append(answer)
        return out

    # ------------------------------------------------------------------ bookkeeping

    def count_request(self) -> None:
        with self._lock:
            self.requests += 1

    def count_error(self, status: int) -> None:
        with self._lock:
            self.errors[int(status)] += 1

    def stats(self) -> Dict[str, Any]:
        """This replica's counters (one replica's view when several run)."""
        with self._lock:
            sizes = dict(sorted(self.batch_sizes.items()))
            return {"requests": self.requests, "predictions": self.predictions,
                    "errors": {str(k): v for k, v in sorted(self.errors.items())},
                    "batches": self.batches, "max_batch_size_seen": max(sizes, default=0),
                    "mean_batch_size": round(self.predictions / self.batches, 3) if self.batches else 0.0,
                    "batch_sizes": {str(k): v for k, v in sizes.items()},
                    "infer_s": round(self.infer_s, 4),
                    "infer_ms_per_prediction": round(1e3 * self.infer_s / self.predictions, 3) if self.predictions else 0.0,
                    "uptime_s": round(time.time() - self.started, 1)}

    def outputs(self) -> Dict[str, Any]:
        """What ``POST /predict`` answers for this model (answer schema :data:`ANSWER_SCHEMA`)."""
        p = self.predictor
        out: Dict[str, Any] = {"schema": ANSWER_SCHEMA}
        if p.has_classes:
            out["label"] = {"classes": list(p.labels)}
        if p.task != "categorical":
            out["dimensions"] = {"names": list(p.dimensions), "scale": [float(v) for v in p.dimension_scale]}
        return out

    def training_config(self) -> Optional[Dict[str, Any]]:
        """The resolved run config that produced the model (the checkpoint's ``config.yaml``)."""
        import yaml

        path = self.checkpoint / "config.yaml"
        try:
            cfg = yaml.safe_load(path.read_text()) if path.is_file() else None
        except yaml.YAMLError:
            return None
        return cfg if isinstance(cfg, dict) else None

    def info(self) -> Dict[str, Any]:
        """The model card: version, encoder, classifier, labels, metrics, config, serving settings.

        What a client needs and nothing of the server's storage: no registry or checkpoint path, every
        local path in the config and the encoder identity cut to its last component, storage URIs
        without credentials or query (:func:`serray.storage.public_value`), no NaN / Infinity.
        """
        meta = self.predictor.meta
        card = self.card
        s = self.settings
        from serray.config import PATH_KEYS

        path_keys = {f"config.{k}" for k in (*PATH_KEYS, "pretrain.extra_audio", "encoder.name")} | {"encoder.encoder"}
        return json_safe(storage.public_value({
            "version": self.version,
            "model": {k: card.get(k) for k in ("id", "created", "source", "selection", "epoch_selection", "selected_on",
                                               "chosen_as") if k in card},
            "labels": list(self.predictor.labels),
            "task": self.predictor.task,
            "outputs": self.outputs(),
            "metrics": card.get("metrics", {}),
            "hyperparameters": card.get("hyperparameters", {}),
            "encoder": dict(self.predictor.features),
            "classifier": meta.get("model"),
            "mode": meta.get("mode"),
            "fold": meta.get("fold"),
            "config": _without_cluster_address(self.training_config()),
            "serving": {"batching": bool(s["batching"]), "max_batch_size": int(s["max_batch_size"]),
                        "batch_wait_timeout_s": float(s["batch_wait_timeout_s"]),
                        "max_body_mb": float(s["max_body_mb"]), "min_seconds": float(s["min_seconds"]),
                        "max_seconds": float(s["max_seconds"]), "sample_rate": self.sample_rate,
                        "max_channels": int(s.get("max_channels", MAX_CHANNELS)),
                        "sample_rates": [int(s.get("min_sample_rate", MIN_SAMPLE_RATE)),
                                         int(s.get("max_sample_rate", MAX_SAMPLE_RATE))],
                        "body_timeout_s": s.get("body_timeout_s"), "request_timeout_s": s.get("request_timeout_s"),
                        "content_types": [*AUDIO_TYPES, MULTIPART],
                        "device": str(self.predictor.device),
                        "segments_max_body_mb": s.get("segments_max_body_mb"),  # POST /segments
                        "segments_max_seconds": s.get("segments_max_seconds"),
                        "segments_max_ongoing": s.get("segments_max_ongoing"),
                        "segments_body_timeout_s": s.get("segments_body_timeout_s"),
                        "segment": s.get("segment")},
            "stats": self.stats(),
        }, path_keys))
