"""``serray export --format onnx``: a registry entry as one ONNX graph (front end, adapter branch, SAP head).

The graph takes one mono waveform ``audio`` ``[1, samples]`` at the model's sample rate (any length:
the time axis is dynamic) and returns ``logits`` and ``probabilities`` ``[1, classes]``. Its
``metadata_props`` say how to feed it and read it (``serray.labels``, ``serray.sample_rate``,
``serray.features``, ``serray.front_end``, ...), so :mod:`serray.predict_onnx` runs it with
onnxruntime alone. Exported without the encoder (``--no-encoder`` / ``export.include_encoder=false``),
the graph takes the encoder's features ``features`` ``[1, T, D]`` (``[1, L, T, D]`` for several
layers) instead and the front end runs outside.

Front ends: ``fbank`` as :class:`serray.models.fbank.KaldiFbank` (the same features as the Kaldi
code path, built from operators ONNX has); Hugging Face HuBERT / wav2vec2 / WavLM as they are; the
openSMILE encoders (``egemaps`` / ``compare``, a C++ library) cannot be exported: the error names
the part and the alternative.

The dynamo exporter (``torch.onnx.export(dynamo=True)``, which needs ``onnxscript``) is used: the
TorchScript exporter (``dynamo=False``) records the attention's reshape sizes of the example as
constants, so a graph it writes fails on any other length (measured, ``docs/export.md``). Every
export is checked before it is kept: onnxruntime and torch run the same random clips of three
lengths and must agree within :data:`PARITY_TOLERANCE`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch import Tensor, nn

from serray.errors import DataError

log = logging.getLogger(__name__)

#: Largest |probability difference| between torch and onnxruntime accepted when exporting (and in
#: the parity test). Measured: below 1e-6 for fbank models, 3e-6 for a tiny HuBERT (docs/export.md).
PARITY_TOLERANCE = 1e-4
#: Clip lengths (seconds) of the parity check run on every export.
CHECK_SECONDS = (0.5, 1.7, 4.1)
#: What the ONNX metadata is called and how a reader recognises a serray export.
FORMAT = "serray-onnx/1"
AUDIO_INPUT, FEATURES_INPUT = "audio", "features"
OUTPUTS = ("logits", "probabilities")


class NotExportable(DataError):
    """A part of a model cannot be written as ONNX (the message names the part and the alternative)."""


class HFFrontEnd(nn.Module):
    """A Hugging Face speech encoder as :class:`serray.data.encoders.HFEncoder` runs it on one clip:
    optional waveform standardisation, then the chosen hidden states ``[1, T, D]`` / ``[1, L, T, D]``."""

    def __init__(self, encoder) -> None:
        super().__init__()
        self.model, self.layers, self.normalize = encoder.model, list(encoder.layers), encoder.normalize

    def forward(self, audio: Tensor) -> Tensor:
        if self.normalize:
            audio = (audio - audio.mean(dim=-1, keepdim=True)) / torch.sqrt(
                audio.var(dim=-1, unbiased=False, keepdim=True) + 1e-7)
        hidden = self.model(audio, output_hidden_states=True).hidden_states
        if len(self.layers) == 1:
            return hidden[self.layers[0]]
        return torch.stack([hidden[layer] for layer in self.layers], dim=1)


class ExportGraph(nn.Module):
    """Front end (or none) -> :class:`~serray.models.classifier.EmotionClassifier` -> logits, softmax."""

    def __init__(self, front_end: Optional[nn.Module], classifier: nn.Module) -> None:
        super().__init__()
        self.front_end, self.classifier = front_end, classifier

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.front_end(x) if self.front_end is not None else x
        logits = self.classifier(feats)
        return logits, torch.softmax(logits.float(), dim=-1)


def _no_encoder_hint(features: Dict[str, Any]) -> str:
    shape = "[1, T, {d}]".format(d=features["dim"]) if int(features.get("num_layers", 1)) == 1 else \
        "[1, {l}, T, {d}]".format(l=features["num_layers"], d=features["dim"])
    return (f"export the adapter and head alone with `serray export --format onnx --no-encoder` "
            f"(export.include_encoder=false) and featurize outside: the graph then takes the features of "
            f"'{features['encoder']}' as input '{FEATURES_INPUT}' {shape}, {features['frame_rate']:g} frames/s")


def build_front_end(predictor) -> tuple[nn.Module, Dict[str, Any]]:
    """The exportable front end of a :class:`~serray.predict.Predictor`'s encoder and its settings
    (for the metadata); :class:`NotExportable` for the openSMILE encoders."""
    from serray.data.encoders import NEEDS_OPENSMILE
    from serray.models.fbank import KaldiFbank

    f = predictor.features
    name = f["encoder"]
    if name == "fbank":
        fb = KaldiFbank(num_mel_bins=int(f["dim"]), sample_rate=int(f["sample_rate"]))
        return fb, {"kind": "fbank", "num_mel_bins": fb.num_mel_bins, "frame_length": fb.frame_length,
                    "frame_shift": fb.frame_shift, "window": "povey", "preemphasis": 0.97, "dither": 0.0,
                    "snip_edges": True, "scale": 32768.0}
    if name in NEEDS_OPENSMILE:
        raise NotExportable(f"the encoder front end '{name}' (openSMILE {'pitch' if name == 'fbank_pitch' else 'low-level descriptors'}, "
                            f"computed by a C++ library outside PyTorch) cannot be exported to ONNX; {_no_encoder_hint(f)}")
    enc = predictor.encoder()
    return HFFrontEnd(enc).eval(), {"kind": "huggingface", "layers": list(enc.layers), "normalize": bool(enc.normalize)}


def _export(graph: nn.Module, example: Tensor, input_name: str, time_axis: int):
    """The ONNX ModelProto of ``graph`` with a dynamic time axis (dynamo exporter)."""
    import warnings

    from serray.models.wap import regular_path_on_cpu

    samples = torch.export.Dim("time", min=1 if input_name == FEATURES_INPUT else 400)
    with torch.no_grad(), regular_path_on_cpu(torch.device("cpu")), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(graph, (example,), dynamo=True, input_names=[input_name],
                                    output_names=list(OUTPUTS), dynamic_shapes={"x": {time_axis: samples}},
                                    verbose=False)
    return program.model_proto


def _random_input(graph_input: str, predictor, seconds: float, rng: np.random.Generator) -> np.ndarray:
    f = predictor.features
    if graph_input == AUDIO_INPUT:
        n = int(round(seconds * int(f["sample_rate"])))
        t = np.arange(n) / int(f["sample_rate"])
        return (0.2 * np.sin(2 * np.pi * rng.uniform(80, 400) * t) + 0.05 * rng.normal(size=n))[None].astype(np.float32)
    frames = max(1, int(round(seconds * float(f["frame_rate"]))))
    shape = (1, frames, int(f["dim"])) if int(f.get("num_layers", 1)) == 1 else (1, int(f["num_layers"]), frames, int(f["dim"]))
    return rng.normal(size=shape).astype(np.float32)


def parity(graph: nn.Module, session, input_name: str, predictor, seconds=CHECK_SECONDS, seed: int = 0) -> Dict[str, float]:
    """max |probability difference| between torch (``graph``) and an onnxruntime ``session`` on one
    random clip per length in ``seconds``: ``{"<s>": delta}``."""
    from serray.models.wap import regular_path_on_cpu

    rng = np.random.default_rng(seed)
    out = {}
    for s in seconds:
        x = _random_input(input_name, predictor, s, rng)
        with torch.no_grad(), regular_path_on_cpu(torch.device("cpu")):
            ref = graph(torch.from_numpy(x))[1].numpy()
        got = session.run([OUTPUTS[1]], {input_name: x})[0]
        out[f"{s:g}"] = float(np.abs(ref - got).max())
    return out


def metadata(predictor, entry: Dict[str, Any], front: Optional[Dict[str, Any]], input_name: str) -> Dict[str, str]:
    """The graph's ``metadata_props`` (string values; JSON where structured)."""
    f = predictor.features
    card = {k: entry.get(k) for k in ("id", "created", "source", "metrics", "protocol", "folds") if k in entry}
    prov = entry.get("provenance")
    if isinstance(prov, dict):  # what the model was made from, without the training machine's paths
        card["provenance"] = {k: ({kk: vv for kk, vv in v.items() if kk not in ("path", "dir")} if isinstance(v, dict) else v)
                              for k, v in prov.items() if k not in ("config", "argv")}
    return {"serray.format": FORMAT, "serray.input": input_name, "serray.labels": json.dumps(list(predictor.labels)),
            "serray.sample_rate": str(int(f["sample_rate"])), "serray.features": json.dumps(dict(f)),
            "serray.front_end": json.dumps(front or {"kind": "none"}), "serray.entry": json.dumps(card, default=str),
            "serray.model": json.dumps(predictor.meta.get("model")), "serray.exported": time.strftime("%Y-%m-%dT%H:%M:%S")}


def quantize_int8(src: str | Path, dst: str | Path) -> Path:
    """Dynamic int8 quantisation (onnxruntime.quantization) of a graph's MatMul / Gemm weights; the
    ``fbank`` front end stays float (its power spectra span 12 orders of magnitude, which 8 bits of one
    scale per tensor would flatten)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    front = [n.name for n in model.graph.node
             if any(p.key == "pkg.torch.onnx.name_scopes" and "'front_end'" in p.value for p in n.metadata_props)]
    kind = json.loads(next((p.value for p in model.metadata_props if p.key == "serray.front_end"), "{}")).get("kind")
    logging.disable(logging.INFO)  # the quantiser logs a line per tensor on the root logger
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                         nodes_to_exclude=front if kind == "fbank" else [])
    finally:
        logging.disable(logging.NOTSET)
    out = onnx.load(str(dst))
    onnx.helper.set_metadata_props(out, {**{p.key: p.value for p in model.metadata_props}, "serray.int8": "dynamic"})
    onnx.save(out, str(dst))
    return Path(dst)


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise DataError(f"ONNX export needs the `export` extra ({e.name} is not installed): "
                        "pip install -e '.[export]'") from None


def export_onnx(model_dir: str | Path, entry: Dict[str, Any], out: str | Path, include_encoder: bool = True,
                int8: bool = False) -> Dict[str, Any]:
    """Write the classifier checkpoint ``model_dir`` (of registry entry ``entry``) as one ONNX graph.

    Returns a summary: the path(s), the input, the parity check (max |Δ| per clip length), sizes and
    seconds. Raises :class:`NotExportable` naming the part that cannot be exported.
    """
    _require_onnx()
    import onnx
    import onnxruntime as ort

    from serray.predict import Predictor

    t0 = time.time()
    predictor = Predictor.from_checkpoint(model_dir)
    front, settings = build_front_end(predictor) if include_encoder else (None, None)
    input_name = AUDIO_INPUT if include_encoder else FEATURES_INPUT
    graph = ExportGraph(front, predictor.model).eval()
    example = torch.from_numpy(_random_input(input_name, predictor, 1.0, np.random.default_rng(1)))
    time_axis = 1 if include_encoder or int(predictor.features.get("num_layers", 1)) == 1 else 2
    try:
        proto = _export(graph, example, input_name, time_axis)
    except NotExportable:
        raise
    except Exception as e:  # the exporter's own error: say which part, and what to do instead
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        if include_encoder:
            raise NotExportable(f"the encoder front end '{predictor.features['encoder']}' could not be exported to "
                                f"ONNX ({type(e).__name__}: {first}); {_no_encoder_hint(predictor.features)}") from None
        raise NotExportable(f"the adapter branch + SAP head could not be exported to ONNX ({type(e).__name__}: {first})") from None
    onnx.helper.set_metadata_props(proto, metadata(predictor, entry, settings, input_name))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    onnx.save(proto, str(tmp))
    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    check = parity(graph, session, input_name, predictor)
    worst = max(check.values())
    if not worst <= PARITY_TOLERANCE:
        tmp.unlink()
        raise DataError(f"the ONNX graph of {entry.get('id')} disagrees with torch by {worst:.2e} (> {PARITY_TOLERANCE:g}) "
                        f"on random clips ({check}); not written")
    tmp.replace(out)
    summary = {"path": str(out), "input": input_name, "parity_max_abs_diff": check, "bytes": out.stat().st_size,
               "labels": list(predictor.labels), "sample_rate": int(predictor.features["sample_rate"])}
    if int8:
        q = quantize_int8(out, out.with_name(out.stem + ".int8.onnx"))
        summary.update(int8_path=str(q), int8_bytes=q.stat().st_size)
    summary["seconds"] = round(time.time() - t0, 2)
    return summary


__all__ = ["ExportGraph", "HFFrontEnd", "NotExportable", "PARITY_TOLERANCE", "build_front_end", "export_onnx",
           "parity", "quantize_int8"]
