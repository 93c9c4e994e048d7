"""``serray export --format onnx``: a registry entry as one ONNX graph (front end, adapter branch, SAP head).

The graph takes one mono waveform ``audio`` ``[1, samples]`` at the model's sample rate (any length:
the time axis is dynamic) and returns what the entry's task predicts (:func:`output_names`):
``logits`` and ``probabilities`` ``[1, classes]`` (categorical), ``dimensions`` ``[1, K]`` on the
corpus's rating scale (dimensional), or all three (multitask). Its ``metadata_props`` say how to feed
it and read it (``serray.task``, ``serray.outputs``, ``serray.labels``, ``serray.dimensions``,
``serray.sample_rate``, ``serray.features``, ``serray.front_end``, ...), so :mod:`serray.predict_onnx`
runs it with onnxruntime alone. Exported without the encoder (``--no-encoder`` / ``export.include_encoder=false``),
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
lengths and must agree within :data:`PARITY_TOLERANCE` (the int8 graph within
:data:`INT8_TOLERANCE`). Nothing of the exporting machine is kept in the file: the exporter's stack
traces and doc strings are stripped, local paths in the metadata are cut to their last component,
and a file that would still name one of this machine's directories is not written
(:func:`machine_strings`).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from serray.errors import DataError

log = logging.getLogger(__name__)

#: Largest |probability difference| between torch and onnxruntime accepted when exporting (and in
#: the parity test); dimensions are compared on [0, 1] (their rating scale divided by its range).
#: Measured: below 1e-6 for fbank models, 3e-6 for a tiny HuBERT (docs/export.md).
PARITY_TOLERANCE = 1e-4
#: The same for the dynamically int8-quantised graph (``export.int8``) against torch: its weights are
#: rounded to 8 bits, so it is close, not equal. Measured (docs/export.md): at most 0.0017 on the test
#: suite's tiny random models (probabilities, and dimensions on [0, 1]), 0.017 on a trained eGeMAPS demo
#: model fed random features, 0.0039 on a trained fbank demo model over 60 corpus clips; every label
#: agreed. A graph beyond this is not written.
INT8_TOLERANCE = 0.05
#: Clip lengths (seconds) of the parity check run on every export.
CHECK_SECONDS = (0.5, 1.7, 4.1)
#: What the ONNX metadata is called and how a reader recognises a serray export.
FORMAT = "serray-onnx/1"
AUDIO_INPUT, FEATURES_INPUT = "audio", "features"
OUTPUTS = ("logits", "probabilities")
DIMENSIONS_OUTPUT = "dimensions"
TASKS = ("categorical", "dimensional", "multitask")
#: Exporter annotations of nodes / values kept in the file (module scopes: no machine paths; the int8
#: quantiser reads them to leave the fbank front end in float). Every other one is dropped.
KEPT_ANNOTATIONS = ("pkg.torch.onnx.name_scopes", "pkg.torch.onnx.class_hierarchy", "namespace")


class NotExportable(DataError):
    """A part of a model cannot be written as ONNX (the message names the part and the alternative)."""


def output_names(task: str) -> Tuple[str, ...]:
    """The graph's outputs for a model trained for ``finetune.task`` = ``task``, in order."""
    if task not in TASKS:
        raise DataError(f"unknown model task {task!r} (one of {', '.join(TASKS)})")
    return {"categorical": OUTPUTS, "dimensional": (DIMENSIONS_OUTPUT,), "multitask": (*OUTPUTS, DIMENSIONS_OUTPUT)}[task]


class HFFrontEnd(nn.Module):
    """A Hugging Face speech encoder as :class:`serray.data.features.encoders.HFEncoder` runs it on one clip:
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
    """Front end (or none) -> the model -> its outputs (:func:`output_names`): ``logits`` and their
    softmax for a class head, ``dimensions`` on the corpus's rating scale ``scale`` (``lo + (hi - lo) x``
    the head's sigmoid, as :meth:`serray.predict.Predictor.predict_outputs` reports them) for a
    dimensional head."""

    def __init__(self, front_end: Optional[nn.Module], classifier: nn.Module,
                 scale: Sequence[float] = (0.0, 1.0)) -> None:
        super().__init__()
        self.front_end, self.classifier = front_end, classifier
        self.lo, self.hi = float(scale[0]), float(scale[1])

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        feats = self.front_end(x) if self.front_end is not None else x
        out = self.classifier(feats)
        if not isinstance(out, dict):  # EmotionClassifier: logits
            return out, torch.softmax(out.float(), dim=-1)
        res: Tuple[Tensor, ...] = ()
        if out.get("logits") is not None:  # multitask
            res = (out["logits"], torch.softmax(out["logits"].float(), dim=-1))
        return (*res, self.lo + (self.hi - self.lo) * out["dims"].float())


def _no_encoder_hint(features: Dict[str, Any]) -> str:
    shape = "[1, T, {d}]".format(d=features["dim"]) if int(features.get("num_layers", 1)) == 1 else \
        "[1, {l}, T, {d}]".format(l=features["num_layers"], d=features["dim"])
    return (f"export the adapter and head alone with `serray export --format onnx --no-encoder` "
            f"(export.include_encoder=false) and featurize outside: the graph then takes the features of "
            f"'{_public(features['encoder'])}' as input '{FEATURES_INPUT}' {shape}, {features['frame_rate']:g} frames/s")


def build_front_end(predictor) -> tuple[nn.Module, Dict[str, Any]]:
    """The exportable front end of a :class:`~serray.predict.Predictor`'s encoder and its settings
    (for the metadata); :class:`NotExportable` for the openSMILE encoders."""
    from serray.data.features.encoders import NEEDS_OPENSMILE
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


def _export(graph: nn.Module, example: Tensor, input_name: str, time_axis: int, outputs: Sequence[str] = OUTPUTS):
    """The ONNX ModelProto of ``graph`` with a dynamic time axis (dynamo exporter)."""
    import warnings

    from serray.models.wap import regular_path_on_cpu

    samples = torch.export.Dim("time", min=1 if input_name == FEATURES_INPUT else 400)
    chatty = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [lg.level for lg in chatty]
    with torch.no_grad(), regular_path_on_cpu(torch.device("cpu")), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in chatty:  # a line per rewrite rule / deduplicated initializer at INFO
            lg.setLevel(logging.WARNING)
        try:
            program = torch.onnx.export(graph, (example,), dynamo=True, input_names=[input_name],
                                        output_names=list(outputs), dynamic_shapes={"x": {time_axis: samples}},
                                        verbose=False)
        finally:
            for lg, level in zip(chatty, levels):
                lg.setLevel(level)
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


def compare(graph: ExportGraph, session, input_name: str, predictor, seconds=CHECK_SECONDS, seed: int = 0,
            clips: int = 1) -> List[Dict[str, Any]]:
    """torch (``graph``) against an onnxruntime ``session`` on ``clips`` random clips per length in
    ``seconds``: per clip its length, max |probability difference| (``dp``, None without a class head),
    max |dimension difference| on [0, 1] (``ddim``, None without a dimensional head), whether the
    labels agree (``same_label``) and torch's margin between its two most probable classes."""
    from serray.models.wap import regular_path_on_cpu

    names = [o.name for o in session.get_outputs()]
    span = (graph.hi - graph.lo) or 1.0
    rng = np.random.default_rng(seed)
    rows = []
    for s in seconds:
        for _ in range(clips):
            x = _random_input(input_name, predictor, s, rng)
            with torch.no_grad(), regular_path_on_cpu(torch.device("cpu")):
                ref = dict(zip(names, (t.numpy() for t in graph(torch.from_numpy(x)))))
            got = dict(zip(names, session.run(names, {input_name: x})))
            row: Dict[str, Any] = {"seconds": s, "dp": None, "ddim": None, "same_label": None, "margin": None}
            if OUTPUTS[1] in names:
                p, q = ref[OUTPUTS[1]][0], got[OUTPUTS[1]][0]
                top = np.sort(p)[::-1]
                row.update(dp=float(np.abs(p - q).max()) if np.isfinite(q).all() else float("inf"),
                           same_label=bool(np.argmax(p) == np.argmax(q)), margin=float(top[0] - top[1]) if len(top) > 1 else 1.0)
            if DIMENSIONS_OUTPUT in names:
                d, e = ref[DIMENSIONS_OUTPUT], got[DIMENSIONS_OUTPUT]
                row["ddim"] = float(np.abs(d - e).max() / span) if np.isfinite(e).all() else float("inf")
            rows.append(row)
    return rows


def _worst(row: Dict[str, Any]) -> float:
    return max(v for v in (row["dp"], row["ddim"]) if v is not None)


def parity(graph: ExportGraph, session, input_name: str, predictor, seconds=CHECK_SECONDS, seed: int = 0) -> Dict[str, float]:
    """max |difference| between torch (``graph``) and an onnxruntime ``session`` on one random clip per
    length in ``seconds``, over the probabilities and the dimensions (on [0, 1]): ``{"<s>": delta}``."""
    out: Dict[str, float] = {}
    for row in compare(graph, session, input_name, predictor, seconds, seed):
        key = f"{row['seconds']:g}"
        out[key] = max(out.get(key, 0.0), _worst(row))
    return out


# --- nothing of this machine in the file ---------------------------------------------------------

#: An absolute local path inside a text (POSIX, ``~/``, or a Windows drive), not preceded by a word
#: character (``UA/WA``, ``frames/s`` are no paths) nor part of a URI (``s3://...``).
_PATH_IN_TEXT = re.compile(r"(?<![\w.:/~\\-])(?:~?/|[A-Za-z]:[\\/])[^\s'\"(),;\[\]{}<>]+")
_INSTALL_DIR = re.compile(r"(?:\.\.\./)?[\w.-]*(?:site|dist)-packages")


def _public(value: Any) -> Any:
    """A JSON-able copy for the file: a local path cut to its last component (``.../hubert-large``,
    :func:`serray.storage.public_name`), a path inside a text likewise; URIs without credentials."""
    from serray import storage

    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_public(v) for v in value]
    if isinstance(value, str):
        whole = storage.public_name(value)
        text = whole if whole != value else storage.redact_text(
            _PATH_IN_TEXT.sub(lambda m: storage.public_name(m.group(0)), value))
        return _INSTALL_DIR.sub("...", text)  # ".../site-packages" says where Python lives: no
    return value


def _messages(msg, where: str) -> Iterator[Tuple[str, Any]]:
    """Every protobuf message under ``msg`` (itself included) with a dotted location."""
    from google.protobuf.message import Message

    yield where, msg
    for fd, val in msg.ListFields():
        if fd.message_type is None:
            continue
        items = val if fd.is_repeated else [val]
        for i, v in enumerate(items):
            if isinstance(v, Message):
                name = getattr(v, "name", "") if fd.name in ("node", "functions", "input", "output", "value_info",
                                                             "initializer", "graph", "g", "graphs") else ""
                yield from _messages(v, f"{where}.{fd.name}[{name or i}]")


def strings(model) -> Iterator[Tuple[str, str]]:
    """Every text of an ONNX ``ModelProto`` (names, doc strings, metadata keys and values, attribute
    and tensor strings; not the weights' bytes) with its location."""
    for where, msg in _messages(model, "model"):
        for fd, val in msg.ListFields():
            if fd.message_type is not None or fd.name == "raw_data":
                continue
            for v in (val if fd.is_repeated else [val]):
                if isinstance(v, str):
                    yield f"{where}.{fd.name}", v
                elif isinstance(v, bytes):
                    yield f"{where}.{fd.name}", v.decode("utf-8", "replace")


def scrub(model) -> None:
    """Strip what the exporter records of this machine, in place: every doc string, and every node /
    value annotation but the module scopes (:data:`KEPT_ANNOTATIONS`: stack traces with the install
    path, FX node dumps and graph signatures go); ``serray.*`` metadata is written path-free by
    :func:`metadata`."""
    for _, msg in _messages(model, "model"):
        fields = msg.DESCRIPTOR.fields_by_name
        if "doc_string" in fields and msg.doc_string:
            msg.ClearField("doc_string")
        if "metadata_props" in fields and msg is not model:
            keep = [(p.key, p.value) for p in msg.metadata_props
                    if p.key in KEPT_ANNOTATIONS and not _PATH_IN_TEXT.search(p.value)]
            if len(keep) != len(msg.metadata_props):
                del msg.metadata_props[:]
                for k, v in keep:
                    msg.metadata_props.add(key=k, value=v)


def machine_paths(extra: Sequence[str | Path] = ()) -> List[str]:
    """Directories of this machine no exported file may name: the home directory, the working
    directory, the Python installation and its ``site-packages``, serray's own checkout, and
    ``extra`` (the output file's directory, the checkpoint, a local encoder), as given and resolved;
    the root itself left out. Longest first."""
    import site

    import serray

    cands = [Path.home(), Path.cwd(), sys.prefix, sys.base_prefix, sys.exec_prefix, Path(serray.__file__).parents[1],
             *site.getsitepackages(), site.getusersitepackages(), *extra]
    out = set()
    for c in cands:
        given = Path(str(c)).expanduser()
        for p in {str(given) if given.is_absolute() else "", str(given.resolve())}:  # "export" alone is no path
            p = p.rstrip("/\\")
            if len(p) > 1 and not (len(p) == 2 and p[1] == ":"):
                out.add(p)
    return sorted(out, key=len, reverse=True)


def machine_strings(model, extra: Sequence[str | Path] = ()) -> List[Tuple[str, str]]:
    """``(location, the path it names)`` for every text of ``model`` naming a directory of this machine
    (:func:`machine_paths`) or a ``site-packages`` / ``dist-packages`` directory; empty: the file is
    portable."""
    paths = machine_paths(extra)
    # a whole directory name: "/app" is not in ".../apple" nor in ".../app" (a path's last component)
    pattern = re.compile("|".join([rf"(?<![\w.~-]){re.escape(p)}(?![\w.-])" for p in paths]
                                  + ["site-packages", "dist-packages"]))
    hits = []
    for where, text in strings(model):
        m = pattern.search(text)
        if m:
            hits.append((where, m.group(0)))
    return hits


def _check_portable(model, extra: Sequence[str | Path], what: str) -> None:
    hits = machine_strings(model, extra)
    if hits:
        where, path = hits[0]
        raise DataError(f"the {what} would carry a path of this machine ({path!r} in {where}, {len(hits)} place(s)); "
                        "not written (a serray bug: please report it)")


def metadata(predictor, entry: Dict[str, Any], front: Optional[Dict[str, Any]], input_name: str) -> Dict[str, str]:
    """The graph's ``metadata_props`` (string values; JSON where structured), without local paths."""
    f = predictor.features
    task = str(getattr(predictor, "task", "categorical") or "categorical")
    card = {k: entry.get(k) for k in ("id", "created", "source", "metrics", "protocol", "folds") if k in entry}
    prov = entry.get("provenance")
    if isinstance(prov, dict):  # what the model was made from, without the training machine's paths
        card["provenance"] = {k: ({kk: vv for kk, vv in v.items() if kk not in ("path", "dir")} if isinstance(v, dict) else v)
                              for k, v in prov.items() if k not in ("config", "argv")}
    labels = list(predictor.labels) if task != "dimensional" else []
    meta = {"serray.format": FORMAT, "serray.input": input_name, "serray.task": task,
            "serray.outputs": json.dumps(list(output_names(task))), "serray.labels": json.dumps(labels),
            "serray.sample_rate": str(int(f["sample_rate"])), "serray.features": json.dumps(_public(dict(f))),
            "serray.front_end": json.dumps(_public(front or {"kind": "none"})),
            "serray.entry": json.dumps(_public(json.loads(json.dumps(card, default=str)))),
            "serray.model": json.dumps(_public(predictor.meta.get("model"))), "serray.exported": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if task != "categorical":
        lo, hi = (float(v) for v in getattr(predictor, "dimension_scale", (0.0, 1.0)))
        meta["serray.dimensions"] = json.dumps({"names": list(predictor.dimensions), "scale": [lo, hi]})
    return meta


def quantize_int8(src: str | Path, dst: str | Path) -> Path:
    """Dynamic int8 quantisation (onnxruntime.quantization) of a graph's MatMul / Gemm weights; the
    ``fbank`` front end stays float (its power spectra span 12 orders of magnitude, which 8 bits of one
    scale per tensor would flatten). The result is stripped like the float graph (:func:`scrub`); it
    is not checked here (:func:`export_onnx` checks it against torch)."""
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
    scrub(out)
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


# --- where the file goes -------------------------------------------------------------------------

def check_entry_id(entry_id: Any) -> str:
    """``entry_id`` when it can name a file (``export.dir/<id>.onnx``): one plain path component (no
    ``/`` or ``\\``, not ``.`` / ``..``, no drive ``:``, no control character, no surrounding blanks, at
    most 200 characters); :class:`DataError` otherwise (an ``entry.json`` edited by hand or not serray's)."""
    text = entry_id if isinstance(entry_id, str) else ""
    bad = (not text or len(text) > 200 or text in (".", "..") or any(c in text for c in "/\\:")
           or any(ord(c) < 32 or ord(c) == 127 for c in text) or text != text.strip())
    if bad:
        raise DataError(f"registry entry id {entry_id!r} is not a plain file name (no path separators, not '.' or "
                        "'..'): its entry.json was altered or not written by serray; not exported")
    return text


def default_path(export_dir: str | Path, entry: Dict[str, Any]) -> Path:
    """``export_dir/<id>.onnx`` for a registry entry, checked to stay inside ``export_dir``
    (:func:`check_entry_id`, then containment of the resolved path)."""
    name = check_entry_id(entry.get("id")) + ".onnx"
    base = Path(export_dir)
    out = base / name
    if out.resolve().parent != base.resolve():
        raise DataError(f"the export path of entry {entry.get('id')!r} resolves outside export.dir "
                        f"({out.resolve()} not in {base.resolve()}); not exported")
    return out


def _fresh(path: Path) -> None:
    """Remove a stale temporary (a link left there is never written through)."""
    if path.is_symlink() or path.exists():
        path.unlink()


def export_onnx(model_dir: str | Path, entry: Dict[str, Any], out: str | Path, include_encoder: bool = True,
                int8: bool = False) -> Dict[str, Any]:
    """Write the checkpoint ``model_dir`` (of registry entry ``entry``) as one ONNX graph.

    Any task (categorical, dimensional, multitask): the graph's outputs are :func:`output_names`.
    The entry's id must be a plain file name (:func:`check_entry_id`), wherever ``out`` is.
    Returns a summary: the path(s), the input, the outputs, the parity check (max |Δ| per clip
    length; for int8 also ``int8_parity``), sizes and seconds. Raises :class:`NotExportable` naming the
    part that cannot be exported, :class:`DataError` when a graph disagrees with torch (the int8 one:
    beyond :data:`INT8_TOLERANCE`; the float graph is then kept, the int8 one is not written).
    """
    check_entry_id(entry.get("id"))
    _require_onnx()
    import onnx
    import onnxruntime as ort

    from serray.predict import Predictor

    t0 = time.time()
    predictor = Predictor.from_checkpoint(model_dir)
    task = str(getattr(predictor, "task", "categorical") or "categorical")
    outputs = output_names(task)
    front, settings = build_front_end(predictor) if include_encoder else (None, None)
    input_name = AUDIO_INPUT if include_encoder else FEATURES_INPUT
    scale = tuple(predictor.dimension_scale) if task != "categorical" else (0.0, 1.0)
    graph = ExportGraph(front, predictor.model, scale).eval()
    example = torch.from_numpy(_random_input(input_name, predictor, 1.0, np.random.default_rng(1)))
    time_axis = 1 if include_encoder or int(predictor.features.get("num_layers", 1)) == 1 else 2
    try:
        proto = _export(graph, example, input_name, time_axis, outputs)
    except NotExportable:
        raise
    except Exception as e:  # the exporter's own error: say which part, and what to do instead
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        head_fails = not include_encoder
        if include_encoder:  # is it the front end? only if the adapter + head alone export
            f = predictor.features
            feats = torch.from_numpy(_random_input(FEATURES_INPUT, predictor, 1.0, np.random.default_rng(1)))
            try:
                _export(ExportGraph(None, predictor.model, scale).eval(), feats, FEATURES_INPUT,
                        1 if int(f.get("num_layers", 1)) == 1 else 2, outputs)
            except Exception:
                head_fails = True
        if not head_fails:
            raise NotExportable(f"the encoder front end '{_public(predictor.features['encoder'])}' could not be exported to "
                                f"ONNX ({type(e).__name__}: {first}); {_no_encoder_hint(predictor.features)}") from None
        raise NotExportable(f"the adapter branch + {task} head could not be exported to ONNX ({type(e).__name__}: "
                            f"{first}); --no-encoder would not help") from None
    onnx.helper.set_metadata_props(proto, metadata(predictor, entry, settings, input_name))
    scrub(proto)
    out = Path(out)
    local = [out.parent, model_dir]  # what the file must not name besides machine_paths()
    if predictor.directory is not None:
        local.append(predictor.directory / "encoder")
    if Path(str(predictor.features.get("encoder", ""))).expanduser().is_absolute():  # a local Hugging Face encoder
        local.append(str(predictor.features["encoder"]))
    _check_portable(proto, local, "ONNX graph")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    _fresh(tmp)
    try:
        onnx.save(proto, str(tmp))
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        check = parity(graph, session, input_name, predictor)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    worst = max(check.values())
    if not worst <= PARITY_TOLERANCE:
        tmp.unlink()
        raise DataError(f"the ONNX graph of {entry.get('id')} disagrees with torch by {worst:.2e} (> {PARITY_TOLERANCE:g}) "
                        f"on random clips ({check}); not written")
    tmp.replace(out)
    summary = {"path": str(out), "input": input_name, "task": task, "outputs": list(outputs),
               "parity_max_abs_diff": check, "bytes": out.stat().st_size,
               "labels": list(predictor.labels) if task != "dimensional" else [],
               "dimensions": list(predictor.dimensions) if task != "categorical" else [],
               "sample_rate": int(predictor.features["sample_rate"])}
    if int8:
        summary.update(_int8(out, graph, input_name, predictor, entry, local))
    summary["seconds"] = round(time.time() - t0, 2)
    return summary


def _int8(out: Path, graph: ExportGraph, input_name: str, predictor, entry: Dict[str, Any], local) -> Dict[str, Any]:
    """Quantise the checked float graph ``out`` to ``<stem>.int8.onnx`` and check it against torch on
    two random clips per :data:`CHECK_SECONDS` length: kept only within :data:`INT8_TOLERANCE`."""
    import onnx
    import onnxruntime as ort

    dst = out.with_name(out.stem + ".int8.onnx")
    tmp = dst.with_name(f".{dst.name}.tmp")
    _fresh(tmp)
    try:
        quantize_int8(out, tmp)
        _check_portable(onnx.load(str(tmp)), local, "int8 graph")
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        rows = compare(graph, session, input_name, predictor, seed=1, clips=2)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    worst = max(_worst(r) for r in rows)
    agree = [r["same_label"] for r in rows if r["same_label"] is not None]
    check = {"max_abs_diff": worst, "labels_agree": f"{sum(agree)}/{len(agree)}" if agree else None,
             "clips": len(rows), "tolerance": INT8_TOLERANCE}
    if not worst <= INT8_TOLERANCE:
        tmp.unlink()
        raise DataError(f"the int8 graph of {entry.get('id')} disagrees with torch by {worst:.3f} (> {INT8_TOLERANCE:g}"
                        f"{', labels agree on ' + check['labels_agree'] + ' clips' if agree else ''}) on random clips; "
                        f"{dst.name} not written (the float graph {out} is written and checked: use it, or export "
                        "without --int8 / export.int8=false)")
    tmp.replace(dst)
    return {"int8_path": str(dst), "int8_bytes": dst.stat().st_size, "int8_parity": check}


__all__ = ["DIMENSIONS_OUTPUT", "ExportGraph", "HFFrontEnd", "INT8_TOLERANCE", "NotExportable", "PARITY_TOLERANCE",
           "build_front_end", "check_entry_id", "compare", "default_path", "export_onnx", "machine_strings", "metadata",
           "output_names", "parity", "quantize_int8", "scrub", "strings"]
