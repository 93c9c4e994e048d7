"""Long recordings: time-stamped predictions over a recording of any length, at bounded memory.

``serray predict --segments FILE`` and ``POST /segments`` run the same :func:`segment_stream`: the
recording is decoded block by block (:mod:`serray.data.audio_stream`), cut into segments by a voice
activity detector or a sliding window (:mod:`serray.data.vad`, ``segment.*`` keys), and every segment is
classified by the same :class:`~serray.predict.Predictor` as ``serray predict`` (batches of
``segment.batch_size``). The answer holds one record per segment (``start``, ``end`` in seconds,
``label``, ``probabilities``, and whatever else the model predicts, e.g. ``dimensions``) and an
aggregate over the recording (duration-weighted class distribution, dominant label, seconds per label).

Memory follows ``segment.window_s`` and the decode block, not the recording: a 30-minute file is never
held whole (``bench/segments.py`` measures the peak).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from serray.data.audio_stream import AudioStream, open_stream
from serray.data.vad import Segmenter, build_vad
from serray.errors import DataError

#: Keys of a segment record that are not aggregated as model outputs.
_META = ("start", "end", "label", "probabilities")


def _records(predictor, wavs: Sequence[np.ndarray]) -> List[Dict[str, Any]]:
    """One prediction dict per waveform: ``label``, ``probabilities`` and anything else the model gives.

    A predictor with a ``predict_records(wavs)`` method (e.g. one that also predicts dimensions) supplies
    the dicts itself; otherwise they are built from :meth:`Predictor.predict_waveforms`.
    """
    own = getattr(predictor, "predict_records", None)
    if callable(own):
        return [dict(r) for r in own(list(wavs))]
    labels = predictor.labels
    probs = predictor.predict_waveforms(list(wavs))
    return [{"label": labels[int(np.argmax(p))], "probabilities": {k: float(v) for k, v in zip(labels, p)}}
            for p in probs]


def _finite(record: Dict[str, Any]) -> bool:
    values = list(record.get("probabilities", {}).values())
    for v in record.values():
        if isinstance(v, dict) and v is not record.get("probabilities"):
            values += [x for x in v.values() if isinstance(x, (int, float))]
    return bool(np.isfinite(np.asarray(values, dtype=np.float64)).all()) if values else True


class _Aggregate:
    """Duration-weighted sums over the segments."""

    def __init__(self, labels: Sequence[str]):
        self.labels = list(labels)
        self.seconds = 0.0
        self.classified_s = 0.0  # seconds of segments that carry class probabilities (a dimensional-only model: 0)
        self.prob = {k: 0.0 for k in self.labels}
        self.label_s = {k: 0.0 for k in self.labels}
        self.other: Dict[str, Dict[str, float]] = {}  # e.g. dimensions: key -> name -> weighted sum

    def add(self, rec: Dict[str, Any]) -> None:
        d = rec["end"] - rec["start"]
        self.seconds += d
        if rec.get("probabilities"):
            self.classified_s += d
        for k, v in (rec.get("probabilities") or {}).items():
            self.prob[k] = self.prob.get(k, 0.0) + d * float(v)
        if rec.get("label") is not None:  # a dimensional-only model has no label
            self.label_s[rec["label"]] = self.label_s.get(rec["label"], 0.0) + d
        for key, value in rec.items():
            if key not in _META and isinstance(value, dict):
                acc = self.other.setdefault(key, {})
                for name, x in value.items():
                    if isinstance(x, (int, float)):
                        acc[name] = acc.get(name, 0.0) + d * float(x)

    def result(self, n: int) -> Dict[str, Any]:
        if not self.seconds:
            return {"num_segments": 0, "segment_s": 0.0, "distribution": {}, "dominant": None, "label_s": {}}
        # no class probabilities (a dimensional-only model): no distribution and no dominant class, rather
        # than an all-zero distribution whose first class would be reported as dominant
        dist = {k: round(v / self.seconds, 6) for k, v in self.prob.items()} if self.classified_s else {}
        out = {"num_segments": n, "segment_s": round(self.seconds, 3), "distribution": dist,
               "dominant": max(dist, key=dist.get) if dist else None, "label_s": {k: round(v, 3) for k, v in self.label_s.items()} if self.classified_s else {}}
        for key, acc in self.other.items():
            out[key] = {name: round(v / self.seconds, 6) for name, v in acc.items()}
        return out


def settings_of(cfg) -> Dict[str, Any]:
    """The ``segment`` section as a plain dict."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg.segment, resolve=True)


def segment_stream(predictor, stream: AudioStream, seg: Dict[str, Any], min_seconds: float = 0.25,
                   name: Optional[str] = None) -> Dict[str, Any]:
    """Segment and classify an open recording (see the module docstring for the answer's fields)."""
    t0 = time.perf_counter()
    sr = stream.target_sr
    vad = build_vad(str(seg["vad"]), sr, seg)
    cutter = Segmenter(vad, sr, float(seg["window_s"]), float(seg["hop_s"]), float(seg["threshold"]),
                       float(seg["min_speech_s"]), float(seg["min_silence_s"]), float(seg["pad_s"]))
    batch_size = int(seg["batch_size"])
    min_samples = int(round(min_seconds * sr))
    segments: List[Dict[str, Any]] = []
    agg = _Aggregate(predictor.labels)
    batch: list = []
    too_short = [0]

    def run(pieces, final=False):
        for a, b, wav in pieces:
            if b - a < min_samples:
                too_short[0] += 1
                continue
            batch.append((a, b, wav))
        while len(batch) >= batch_size or (final and batch):
            take = batch[:batch_size]
            del batch[:batch_size]
            for (a, b, _), rec in zip(take, _records(predictor, [w for _, _, w in take])):
                if not _finite(rec):
                    raise DataError(f"the model produced non-finite output for the segment {a / sr:.2f}-{b / sr:.2f} s"
                                    f" of {name or stream.what}")
                out = {"start": round(a / sr, 3), "end": round(b / sr, 3), **rec}
                segments.append(out)
                agg.add(out)

    with stream:
        for block in stream.blocks():
            run(cutter.feed(block))
        run(cutter.finish(), final=True)
    duration = cutter.n / sr
    result: Dict[str, Any] = {
        "file": name or stream.what, "duration_s": round(duration, 3), "sample_rate": stream.sample_rate,
        "vad": str(seg["vad"]), "window_s": float(seg["window_s"]),
        "hop_s": float(seg["hop_s"]) if seg["vad"] == "none" else None,
        "segments": segments, "aggregate": agg.result(len(segments)),
        "skipped_short": too_short[0], "max_buffered_s": round(cutter.max_kept / sr, 3),
        "elapsed_s": round(time.perf_counter() - t0, 3),
    }
    if not segments:
        what = "no speech found" if vad is not None else "no audio to classify"
        why = f" ({too_short[0]} segment(s) shorter than {min_seconds:g} s skipped)" if too_short[0] else ""
        result["message"] = f"{what} in {result['file']} (segment.vad={seg['vad']}): no segments{why}"
    return result


def segment_file(predictor, source: Union[str, Path, BinaryIO], seg: Dict[str, Any], *, min_seconds: float = 0.25,
                 total: Union[int, Callable[[], int], None] = None, what: Optional[str] = None, **limits
                 ) -> Dict[str, Any]:
    """Open ``source`` (a path, or a file object of ``total`` bytes, or of the length ``total()`` gives
    once its first bytes were checked) and :func:`segment_stream` it. ``limits``: ``max_channels``,
    ``min_sample_rate``, ``max_sample_rate`` (the ``serve`` header limits), ``max_seconds`` and
    ``subtypes`` (:func:`serray.data.audio_stream.open_stream`)."""
    sr = int(predictor.features.get("sample_rate", 16000))
    stream = open_stream(source, sr, total=total, what=what, **limits)
    return segment_stream(predictor, stream, seg, min_seconds, name=what or str(source))


def format_table(result: Dict[str, Any]) -> str:
    """The human-readable ``serray predict --segments`` output."""
    lines = [f"{result['file']}: {result['duration_s']:.1f} s, segment.vad={result['vad']}"]
    if result.get("message"):
        return "\n".join(lines + [result["message"]])
    labels = list(result["aggregate"]["distribution"])
    dims = list(result["aggregate"].get("dimensions", {}))  # a dimensional / multitask model's ratings
    lines.append(f"{'start':>9} {'end':>9}  {'label':<6} " + " ".join(f"{k[:9]:>9}" for k in labels + dims))
    for s in result["segments"]:
        lines.append(f"{s['start']:9.2f} {s['end']:9.2f}  {s.get('label') or '-':<6} "
                     + " ".join(f"{s['probabilities'].get(k, float('nan')):9.3f}" for k in labels)
                     + "".join(f" {s.get('dimensions', {}).get(k, float('nan')):9.3f}" for k in dims))
    a = result["aggregate"]
    lines.append(f"{a['num_segments']} segments, {a['segment_s']:.1f} s classified; dominant: {a['dominant']}; "
                 "distribution (duration-weighted): " + ", ".join(f"{k} {v:.3f}" for k, v in a["distribution"].items()))
    if dims:
        lines.append("dimensions (duration-weighted): " + ", ".join(f"{k} {v:.3f}" for k, v in a["dimensions"].items()))
    return "\n".join(lines)


def predict_segments_cli(predictor, path: str, cfg, *, as_json: bool = False, model: str = "") -> int:
    """``serray predict --segments FILE``: print the segments (a table, or JSON with ``--json``)."""
    import json

    s = cfg.serve
    result = segment_file(predictor, path, settings_of(cfg), min_seconds=float(s.min_seconds),
                          max_channels=int(s.max_channels), min_sample_rate=int(s.min_sample_rate),
                          max_sample_rate=int(s.max_sample_rate))
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        if model:
            print(model)
        print(format_table(result))
    return 0
