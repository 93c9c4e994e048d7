"""``serray export --format onnx`` and ``serray predict --onnx``: torch / onnxruntime parity on random
clips of several lengths, a run without torch or Ray, int8 (checked against torch, refused beyond its
tolerance), the graph without its encoder, the encoder that cannot be exported, dimensional and
multitask entries, an entry id that would lead out of ``export.dir``, no path of the exporting machine
in the file, and every bad input of ``predict --onnx`` answered by a serray error.

The checkpoints are random-weight classifiers written with the same ``save_checkpoint`` as training
(no Ray, a few seconds per export).
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

#: max |probability difference| torch vs onnxruntime the tests accept (serray.export.PARITY_TOLERANCE).
TOLERANCE = 1e-4
#: Clip lengths (s) of the parity test: shorter and longer than the 1 s example the graph is traced on.
LENGTHS = (0.26, 0.9, 2.5, 7.3)
#: The dimensions of the dimensional / multitask checkpoints and their rating scale.
DIMENSIONS, SCALE = ("valence", "arousal", "dominance"), (1.0, 5.0)
EGEMAPS = {"encoder": "egemaps", "layers": [], "dim": 25, "num_layers": 1, "frame_rate": 100.0, "sample_rate": 16000}


def _checkpoint(path: Path, features: dict, seed: int = 0, num_input_layers: int = 1, task: str = "categorical") -> Path:
    """A random-weight model checkpoint for ``finetune.task`` = ``task`` (dimensional / multitask: three
    dimensions rated 1-5, as the built-in corpus's)."""
    import torch

    from serray.data.corpora.base import LABELS
    from serray.models.dimensional import build_model
    from serray.train.checkpoint import MODEL_KEY, save_checkpoint

    torch.manual_seed(seed)
    d = int(features["dim"])
    body = dict(input_dim=d, d_model=32, num_layers=2, num_heads=4, ff_dim=64, dropout=0.1,
                num_input_layers=num_input_layers, pos_conv_kernel=9, pos_conv_groups=16)
    kwargs = dict(input_dim=d, num_classes=len(LABELS), num_input_layers=num_input_layers, body=body, attention_dim=16,
                  hidden_dim=16)
    if task != "categorical":
        kwargs.update(task=task, num_dims=len(DIMENSIONS))
    clf = build_model(kwargs).eval()
    rng = np.random.default_rng(seed)
    clf.body.input_norm.set_stats(rng.normal(10.0, 1.0, (num_input_layers, d)), rng.uniform(2.0, 4.0, (num_input_layers, d)))
    meta = {"kind": "classifier", "model": clf.config, "features": features, "labels": list(LABELS), "mode": "finetune",
            "fold": 1}
    if task != "categorical":
        meta.update(task=task, dimensions={"names": list(DIMENSIONS), "scale": list(SCALE)})
    return save_checkpoint(path, {MODEL_KEY: clf.state_dict()}, meta, "seed: 0\n")


def _fbank_identity() -> dict:
    from serray.data.features.encoders import FbankEncoder

    return FbankEncoder(80, 16000).identity()


def _run(args) -> tuple[int, str, str]:
    from serray.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(args)
    return rc, out.getvalue(), err.getvalue()


def _clip(seconds: float, rng: np.random.Generator, sr: int = 16000) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    f0 = rng.uniform(90, 300)
    return (rng.uniform(0.05, 0.5) * np.sin(2 * np.pi * f0 * t * (1 + 0.2 * np.sin(3 * t)))
            + rng.uniform(0.001, 0.05) * rng.normal(size=len(t))).astype(np.float32)


@pytest.fixture(scope="module")
def fbank_export(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    ckpt = _checkpoint(base / "model", _fbank_identity())
    out = base / "fbank.onnx"
    rc, stdout, err = _run(["export", "--format", "onnx", f"serve.checkpoint={ckpt}", f"output_dir={base}",
                            "--out", str(out), "--int8"])
    assert rc == 0, err
    return ckpt, out, stdout


def test_parity_torch_vs_onnxruntime_on_clips_of_several_lengths(fbank_export):
    """The registry path (Kaldi fbank via torchaudio -> classifier) against the graph (its fbank as a
    convolution -> classifier) on random clips of 0.26 to 7.3 s: max |dp| below the tolerance."""
    from serray.predict import Predictor
    from serray.predict_onnx import OnnxPredictor

    ckpt, path, stdout = fbank_export
    torch_p, onnx_p = Predictor.from_checkpoint(ckpt), OnnxPredictor(path)
    rng = np.random.default_rng(7)
    deltas = {}
    for s in LENGTHS:
        for _ in range(2):
            w = _clip(s, rng)
            ref = torch_p.predict_waveforms([w])[0]
            got = onnx_p.predict_input(w)
            deltas[s] = max(deltas.get(s, 0.0), float(np.abs(ref - got).max()))
    assert max(deltas.values()) < TOLERANCE, deltas
    assert "max |dp|" in stdout and onnx_p.labels == torch_p.labels and onnx_p.sample_rate == 16000


def test_metadata_holds_labels_rate_and_feature_settings(fbank_export):
    import onnx

    _, path, _ = fbank_export
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["serray.labels"]) == ["neu", "hap", "sad", "ang"]
    assert meta["serray.sample_rate"] == "16000" and meta["serray.input"] == "audio"
    front = json.loads(meta["serray.front_end"])
    assert front["kind"] == "fbank" and front["num_mel_bins"] == 80 and front["frame_shift"] == 160
    assert json.loads(meta["serray.features"])["encoder"] == "fbank"
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 1 and dims[1].dim_param and not dims[1].dim_value  # a dynamic time axis


def test_predict_onnx_runs_without_torch_or_ray(fbank_export, tmp_path):
    """`serray predict --onnx` in a fresh interpreter: the same labels as the torch path, and neither
    torch nor Ray (nor torchaudio / transformers) is ever imported."""
    from serray.predict import Predictor

    ckpt, path, _ = fbank_export
    rng = np.random.default_rng(3)
    files = []
    for i, (seconds, sr) in enumerate([(1.2, 16000), (3.1, 16000), (0.8, 16000)]):
        f = tmp_path / f"clip{i}.wav"
        sf.write(f, _clip(seconds, rng, sr), sr)
        files.append(str(f))
    code = ("import sys, json; from serray.cli import main; rc = main(['predict', '--onnx', %r, '--json', *%r]); "
            "print('MODULES', json.dumps(sorted(m for m in ('torch', 'ray', 'torchaudio', 'transformers') if m in sys.modules))); "
            "sys.exit(rc)") % (str(path), files)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert res.returncode == 0, res.stderr
    body, modules = res.stdout.rsplit("MODULES", 1)
    assert json.loads(modules) == []
    rows = json.loads(body)
    ref = Predictor.from_checkpoint(ckpt).predict_files(files)
    assert [r["label"] for r in rows] == list(ref["label"])
    assert np.abs(np.array([r["p_neu"] for r in rows]) - ref["p_neu"].to_numpy()).max() < TOLERANCE


def test_int8_graph_is_smaller_and_close(fbank_export):
    from serray.predict_onnx import OnnxPredictor

    _, path, stdout = fbank_export
    q = path.with_name("fbank.int8.onnx")
    assert q.is_file() and "int8:" in stdout
    fp, i8 = OnnxPredictor(path), OnnxPredictor(q)
    assert i8.meta["serray.int8"] == "dynamic" and i8.labels == fp.labels
    rng = np.random.default_rng(5)
    diffs = [np.abs(fp.predict_input(w) - i8.predict_input(w)).max() for w in (_clip(s, rng) for s in LENGTHS)]
    assert max(diffs) < 0.05, diffs  # weights rounded to 8 bits: close, not equal
    assert max(diffs) > 0


def test_an_opensmile_encoder_is_named_with_the_alternative_and_no_encoder_works(tmp_path):
    """egemaps cannot be exported: the error names the front end and --no-encoder; with --no-encoder the
    graph takes the features, and predict --onnx reads them from .npy files."""
    from serray.predict import Predictor

    identity = {"encoder": "egemaps", "layers": [], "dim": 25, "num_layers": 1, "frame_rate": 100.0, "sample_rate": 16000}
    ckpt = _checkpoint(tmp_path / "model", identity)
    rc, out, err = _run(["export", "--format", "onnx", f"serve.checkpoint={ckpt}", f"output_dir={tmp_path}"])
    assert rc == 2 and "'egemaps'" in err and "--no-encoder" in err and "featurize outside" in err
    assert "Traceback" not in err and not list(tmp_path.glob("export/*.onnx"))
    rc, out, err = _run(["export", "--format", "onnx", f"serve.checkpoint={ckpt}", f"output_dir={tmp_path}", "--no-encoder"])
    assert rc == 0, err
    path = tmp_path / "export" / "model.onnx"
    feats = np.random.default_rng(0).normal(size=(137, 25)).astype(np.float32)
    np.save(tmp_path / "f.npy", feats)
    rc, out, err = _run(["predict", "--onnx", str(path), "--json", str(tmp_path / "f.npy")])
    assert rc == 0, err
    got = json.loads(out)[0]
    ref = Predictor.from_checkpoint(ckpt).predict_arrays([feats])[0]
    assert abs(got["p_neu"] - ref[0]) < TOLERANCE
    rc, _, err = _run(["predict", "--onnx", str(path), str(tmp_path / "f.wav")])
    assert rc == 2 and "without its encoder" in err


@pytest.mark.slow
def test_a_hugging_face_encoder_exports_with_several_layers(tiny_hubert, tmp_path):
    """A tiny HuBERT (two stored layers) inside the graph: parity with the torch path on 3 lengths."""
    from serray.data.features.encoders import describe_encoder
    from serray.predict import Predictor
    from serray.predict_onnx import OnnxPredictor
    from omegaconf import OmegaConf

    ident = describe_encoder(OmegaConf.create({"name": str(tiny_hubert), "layers": [1, 2], "sample_rate": 16000,
                                               "num_mel_bins": 80, "local_files_only": True}))
    ckpt = _checkpoint(tmp_path / "model", ident, num_input_layers=2)
    out = tmp_path / "hubert.onnx"
    rc, _, err = _run(["export", "--format", "onnx", f"serve.checkpoint={ckpt}", f"output_dir={tmp_path}", "--out", str(out)])
    assert rc == 0, err
    torch_p, onnx_p = Predictor.from_checkpoint(ckpt), OnnxPredictor(out)
    rng = np.random.default_rng(11)
    for s in (0.3, 1.1, 3.4):
        w = _clip(s, rng)
        assert np.abs(torch_p.predict_waveforms([w])[0] - onnx_p.predict_input(w)).max() < TOLERANCE
    assert _machine_strings(out, tiny_hubert, tmp_path, ckpt) == []  # not the encoder's directory either
    assert json.loads(onnx_p.meta["serray.features"])["encoder"] == f".../{tiny_hubert.name}"


def test_predict_onnx_refuses_a_graph_serray_did_not_write(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(tmp_path / "other.onnx"))
    f = tmp_path / "a.wav"
    sf.write(f, np.zeros(16000, np.float32), 16000)
    rc, _, err = _run(["predict", "--onnx", str(tmp_path / "other.onnx"), str(f)])
    assert rc == 2 and "not written by `serray export`" in err


def test_metadata_carries_the_entrys_provenance_without_config_or_paths():
    from types import SimpleNamespace

    from serray.export import metadata

    predictor = SimpleNamespace(features=_fbank_identity(), labels=["neu", "hap", "sad", "ang"], meta={"model": {}})
    prov = {"git": {"commit": "abc", "dirty": False}, "config": {"output_dir": "/home/me/run"}, "argv": ["serray"],
            "manifest": {"path": "/home/me/run/manifest.parquet", "sha256": "m" * 64}, "seed": 0, "folds": [1]}
    meta = metadata(predictor, {"id": "x", "metrics": {"ua": 0.7}, "provenance": prov}, None, "features")
    card = json.loads(meta["serray.entry"])
    assert card["provenance"] == {"git": {"commit": "abc", "dirty": False}, "manifest": {"sha256": "m" * 64},
                                  "seed": 0, "folds": [1]}
    assert "/home/me" not in json.dumps(meta) and json.loads(meta["serray.front_end"]) == {"kind": "none"}


# --- dimensional and multitask entries --------------------------------------------------------------

@pytest.mark.parametrize("task", ["dimensional", "multitask"])
def test_dimensional_and_multitask_entries_export_and_predict_onnx_answers_like_predict(task, tmp_path):
    """A dimensional / multitask checkpoint exports (it failed, blaming the encoder): its outputs are
    named, the metadata says what they mean, the graph agrees with torch within the tolerance, the
    int8 graph within its own, and `serray predict --onnx` answers with the columns and values of
    `serray predict`."""
    import onnx

    from serray.export import INT8_TOLERANCE
    from serray.predict import Predictor
    from serray.predict_onnx import OnnxPredictor

    ckpt = _checkpoint(tmp_path / "model", _fbank_identity(), seed=3, task=task)
    rc, out, err = _run(["export", "--format", "onnx", f"serve.checkpoint={ckpt}", f"output_dir={tmp_path}", "--int8"])
    assert rc == 0, err
    path = tmp_path / "export" / "model.onnx"
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    want = ["dimensions"] if task == "dimensional" else ["logits", "probabilities", "dimensions"]
    assert [o.name for o in model.graph.output] == want and json.loads(meta["serray.outputs"]) == want
    assert meta["serray.task"] == task
    assert json.loads(meta["serray.dimensions"]) == {"names": list(DIMENSIONS), "scale": list(SCALE)}
    assert json.loads(meta["serray.labels"]) == ([] if task == "dimensional" else ["neu", "hap", "sad", "ang"])

    torch_p, onnx_p, int8_p = Predictor.from_checkpoint(ckpt), OnnxPredictor(path), OnnxPredictor(path.with_name("model.int8.onnx"))
    rng = np.random.default_rng(2)
    for s in (0.3, 1.4, 3.7):
        w = _clip(s, rng)
        ref = torch_p.predict_waveform_outputs([w])
        for pred, tol in ((onnx_p, TOLERANCE), (int8_p, INT8_TOLERANCE)):
            got = pred.predict_outputs(w)
            assert np.abs(ref["dims"][0] - got["dims"]).max() / (SCALE[1] - SCALE[0]) < tol
            if task == "multitask":
                assert np.abs(ref["probs"][0] - got["probs"]).max() < tol
            else:
                assert got["probs"] is None and ref["probs"] is None

    files = []
    for i, s in enumerate((0.8, 2.2)):
        files.append(str(tmp_path / f"c{i}.wav"))
        sf.write(files[-1], _clip(s, rng), 16000)
    rc, out, err = _run(["predict", "--onnx", str(path), "--json", *files])
    assert rc == 0, err
    got = json.loads(out)
    rc, out, err = _run(["predict", "--json", f"serve.checkpoint={ckpt}", *files])
    assert rc == 0, err
    ref = json.loads(out)
    assert [list(r) for r in got] == [list(r) for r in ref]  # the same columns, in the same order
    for g, r in zip(got, ref):
        assert g["scale"] == r["scale"] == "1-5" and g.get("label") == r.get("label")
        assert all(abs(g[k] - r[k]) < TOLERANCE * (SCALE[1] - SCALE[0]) for k in r if isinstance(r[k], float))


def test_a_head_that_cannot_be_exported_is_not_blamed_on_the_encoder(tmp_path, monkeypatch):
    """When the exporter fails on the adapter + head, the message says so and does not send the user
    to --no-encoder (which would fail the same way)."""
    from serray.models.classifier import EmotionClassifier

    def broken(self, x, padding_mask=None):
        raise RuntimeError("no ONNX for this head")

    monkeypatch.setattr(EmotionClassifier, "forward", broken)
    ckpt = _checkpoint(tmp_path / "model", _fbank_identity())
    rc, _, err = _run(["export", "--format", "onnx", f"serve.checkpoint={ckpt}", f"output_dir={tmp_path}"])
    assert rc == 2 and "adapter branch + categorical head" in err and "--no-encoder would not help" in err, err
    assert "could not be exported" in err and "featurize outside" not in err


# --- int8 is checked ---------------------------------------------------------------------------------

def test_the_int8_graph_is_checked_against_torch(tmp_path, monkeypatch):
    """The int8 graph is compared with torch like the float one (within INT8_TOLERANCE); beyond it the
    export fails with an error naming the int8 graph, and only the checked float graph is kept."""
    import serray.export as ex

    ckpt = _checkpoint(tmp_path / "model", EGEMAPS, seed=4)
    s = ex.export_onnx(ckpt, {"id": "m"}, tmp_path / "ok" / "m.onnx", include_encoder=False, int8=True)
    check = s["int8_parity"]
    assert 0 < check["max_abs_diff"] <= ex.INT8_TOLERANCE and check["labels_agree"] == f"{check['clips']}/{check['clips']}"

    monkeypatch.setattr(ex, "INT8_TOLERANCE", 1e-9)  # no int8 graph is that close: the refusal path
    rc, _, err = _run(["export", "--format", "onnx", f"serve.checkpoint={ckpt}", f"output_dir={tmp_path}",
                       "--no-encoder", "--int8"])
    assert rc == 2 and "int8 graph" in err and "not written" in err and "Traceback" not in err, err
    assert (tmp_path / "export" / "model.onnx").is_file()
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["model.onnx"]  # no int8, no temporaries


# --- the output path stays in export.dir ----------------------------------------------------------

@pytest.mark.parametrize("bad_id", ["../../evil", "/tmp/serray-evil-export", "a/../../evil", ".."])
def test_a_crafted_entry_id_cannot_write_outside_export_dir(bad_id, tmp_path):
    """A registry entry whose entry.json says id '../../evil' (edited, or not serray's): `serray
    export ID` refuses with a clear error and writes nothing, inside export.dir or out of it."""
    from serray.train.registry import register

    ckpt = _checkpoint(tmp_path / "model", EGEMAPS)
    run = tmp_path / "a" / "run"
    rec = register(run / "registry", ckpt, metrics={"val_ua": 0.5}, config_yaml="seed: 0\n", source="finetune")
    entry_json = run / "registry" / rec["id"] / "entry.json"
    entry_json.write_text(json.dumps({**json.loads(entry_json.read_text()), "id": bad_id}))
    before = set(Path("/tmp").glob("serray-evil-export*"))
    rc, _, err = _run(["export", "--format", "onnx", bad_id, f"output_dir={run}", "--no-encoder"])
    assert rc == 2 and "not a plain file name" in err and "Traceback" not in err, err
    assert not [p for p in tmp_path.rglob("*.onnx")] and set(Path("/tmp").glob("serray-evil-export*")) == before


def test_the_default_export_path_is_checked():
    from serray.errors import DataError
    from serray.export import check_entry_id, default_path

    for ok in ("20261203-101500-ab12cd", "model", "fold_1.best", ".hidden", "a b"):
        assert check_entry_id(ok) == ok
    assert default_path("/x/export", {"id": "20261203-101500-ab12cd"}) == Path("/x/export/20261203-101500-ab12cd.onnx")
    for bad in ("../evil", "a/b", "a\\b", "/abs", "..", ".", "C:evil", "", "x\n", " x", None, 7, "a" * 201):
        with pytest.raises(DataError, match="not a plain file name"):
            default_path("/x/export", {"id": bad})


# --- nothing of this machine in the file ---------------------------------------------------------

def _machine_strings(path: Path, *local: Path) -> list:
    """Every text of the ONNX file (names, doc strings, metadata, annotations, attribute strings) that
    names the home directory, /work, a site-packages directory, serray's checkout or one of ``local``."""
    import onnx
    from google.protobuf.message import Message

    import serray

    forbidden = {str(Path.home()), "/work", "site-packages", "dist-packages", str(Path(serray.__file__).parents[1]),
                 *(str(p) for p in local), *(str(Path(p).resolve()) for p in local)}
    forbidden = {f for f in forbidden if len(f) > 1}
    hits = []

    def walk(msg, where):
        for fd, val in msg.ListFields():
            for v in (val if fd.is_repeated else [val]):
                if isinstance(v, Message):
                    walk(v, f"{where}.{fd.name}")
                elif fd.name != "raw_data" and isinstance(v, (str, bytes)):
                    text = v if isinstance(v, str) else v.decode("utf-8", "replace")
                    hits.extend((f"{where}.{fd.name}", f, text[:120]) for f in forbidden if f in text)

    walk(onnx.load(str(path)), "model")
    return hits


def test_exported_graphs_name_no_path_of_this_machine(fbank_export, tmp_path):
    """The float and int8 graphs (and a graph without its encoder) hold no string naming the home
    directory, /work, site-packages, serray's checkout, the output directory or the checkpoint: the
    exporter's stack traces and doc strings are stripped."""
    ckpt, path, _ = fbank_export
    assert _machine_strings(path, path.parent, ckpt) == []
    assert _machine_strings(path.with_name("fbank.int8.onnx"), path.parent, ckpt) == []
    ckpt2 = _checkpoint(tmp_path / "model", EGEMAPS)
    rc, _, err = _run(["export", "--format", "onnx", f"serve.checkpoint={ckpt2}", f"output_dir={tmp_path}", "--no-encoder"])
    assert rc == 0, err
    assert _machine_strings(tmp_path / "export" / "model.onnx", tmp_path, ckpt2) == []


def test_scrub_and_machine_strings_on_a_small_graph(tmp_path):
    """scrub drops doc strings and every annotation but the module scopes; machine_strings finds a
    directory of this machine by whole name (a '/app' directory is not in '.../apple')."""
    import onnx
    from onnx import TensorProto, helper

    from serray.export import machine_strings, scrub

    home = str(Path.home())
    node = helper.make_node("Identity", ["x"], ["y"], name="n", doc_string=f'File "{home}/x.py", line 1')
    helper.set_metadata_props(node, {"pkg.torch.onnx.stack_trace": f"{tmp_path}/a.py", "pkg.torch.onnx.name_scopes": "['', 'head']"})
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], doc_string="/opt/x/site-packages")
    model = helper.make_model(graph)
    helper.set_metadata_props(model, {"serray.features": '{"encoder": ".../apple"}'})
    assert {w for w, _ in machine_strings(model, [tmp_path])} >= {"model.graph[g].node[n].doc_string",
                                                                  "model.graph[g].doc_string"}
    scrub(model)
    assert machine_strings(model, [tmp_path, "/app"]) == []
    assert [(p.key, p.value) for p in model.graph.node[0].metadata_props] == [("pkg.torch.onnx.name_scopes", "['', 'head']")]
    onnx.checker.check_model(model)


def test_metadata_cuts_local_paths_anywhere():
    """A local Hugging Face encoder's path and paths inside texts of the entry's record reach the
    metadata as their last component only."""
    from types import SimpleNamespace

    from serray.export import metadata

    feats = {"encoder": "/home/me/models/hubert-large", "layers": [1], "dim": 4, "num_layers": 1, "frame_rate": 50.0,
             "sample_rate": 16000}
    predictor = SimpleNamespace(features=feats, labels=["neu"], meta={"model": {"init_from": "/home/me/run/pretrain"}})
    prov = {"git": {"commit": None, "dirty": None, "reason": "not a git checkout (/home/me/venv/lib/site-packages)"},
            "features": {"identity": {"encoder": "/home/me/models/hubert-large"}}, "platform": "Linux-x86_64"}
    meta = metadata(predictor, {"id": "x", "metrics": {"note": "UA/WA from /home/me/run/metrics.json"}, "provenance": prov},
                    {"kind": "huggingface", "layers": [1]}, "audio")
    text = json.dumps(meta)
    assert "/home/me" not in text and "site-packages" not in text
    assert json.loads(meta["serray.features"])["encoder"] == ".../hubert-large" and "UA/WA from .../metrics.json" in text


# --- predict --onnx: every bad input is a serray error -----------------------------------------------

@pytest.fixture(scope="module")
def feature_graph(tmp_path_factory):
    """An egemaps model exported without its encoder (takes features [T, 25])."""
    base = tmp_path_factory.mktemp("features_graph")
    ckpt = _checkpoint(base / "model", EGEMAPS)
    rc, _, err = _run(["export", "--format", "onnx", f"serve.checkpoint={ckpt}", f"output_dir={base}", "--no-encoder"])
    assert rc == 0, err
    return base / "export" / "model.onnx"


def _bad_inputs(d: Path, graph: Path) -> dict:
    """``{case: (model file, input file)}``: graphs and inputs `predict --onnx` must refuse."""
    import onnx

    rng = np.random.default_rng(0)
    wav = d / "a.wav"
    sf.write(wav, (0.1 * rng.normal(size=16000)).astype(np.float32), 16000)
    good = d / "good.npy"
    np.save(good, rng.normal(size=(50, 25)).astype(np.float32))
    files = {"wav_named_npy.npy": wav.read_bytes(), "truncated.npy": good.read_bytes()[:300]}
    for name, data in files.items():
        (d / name).write_bytes(data)
    arrays = {"zero_frames.npy": np.zeros((0, 25), np.float32), "wrong_dim.npy": np.zeros((50, 24), np.float32),
              "wrong_rank.npy": np.zeros((1, 50, 25), np.float32), "strings.npy": np.array([["a"] * 25] * 5),
              "complex.npy": np.ones((50, 25), np.complex64), "nan.npy": np.full((50, 25), np.nan, np.float32)}
    for name, a in arrays.items():
        np.save(d / name, a)
    np.save(d / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)

    def variant(name, **props):
        m = onnx.load(str(graph))
        onnx.helper.set_metadata_props(m, {**{p.key: p.value for p in m.metadata_props}, **props})
        onnx.save(m, str(d / name))
        return d / name

    (d / "empty.onnx").write_bytes(b"")
    (d / "truncated.onnx").write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    cases = {name.split(".")[0]: (graph, d / name) for name in [*files, *arrays, "objects.npy"]}
    cases.update({
        "wav_for_feature_graph": (graph, wav), "missing_npy": (graph, d / "missing.npy"),
        "empty_model": (d / "empty.onnx", good), "truncated_model": (d / "truncated.onnx", good),
        "labels_not_json": (variant("labels.onnx", **{"serray.labels": "not json"}), good),
        "input_not_in_graph": (variant("input.onnx", **{"serray.input": "audio"}), wav),
        "dim_not_the_graphs": (variant("dim.onnx", **{"serray.features": json.dumps({**EGEMAPS, "dim": 24})}), d / "wrong_dim.npy"),
        "unknown_task": (variant("task.onnx", **{"serray.task": "regression"}), good),
        "dimensions_missing": (variant("dims.onnx", **{"serray.task": "multitask"}), good),
    })
    return cases


BAD_CASES = ["wav_named_npy", "truncated", "zero_frames", "wrong_dim", "wrong_rank", "strings", "complex", "nan",
             "objects", "wav_for_feature_graph", "missing_npy", "empty_model", "truncated_model", "labels_not_json",
             "input_not_in_graph", "dim_not_the_graphs", "unknown_task", "dimensions_missing"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_predict_onnx_answers_a_bad_input_with_a_serray_error(case, feature_graph, tmp_path):
    """Each input `predict --onnx` cannot use (audio for a graph that takes features, wrong rank / feature
    dimension / type / values, an empty or truncated model, metadata that does not fit the graph) is
    a serray error with the data errors' exit status, never a traceback."""
    model, data = _bad_inputs(tmp_path, feature_graph)[case]
    rc, out, err = _run(["predict", "--onnx", str(model), str(data)])
    assert rc == 2 and err.startswith("serray predict: error: ") and "Traceback" not in err, (rc, err)


def test_predict_onnx_bad_inputs_through_the_serray_executable(feature_graph, tmp_path):
    """As a user runs it: a WAV renamed .npy and a zero-frame array given to a graph without its
    encoder, in a new `serray` process: exit status 2, one error line, no traceback."""
    import shutil

    exe = shutil.which("serray") or str(Path(sys.executable).with_name("serray"))
    cases = _bad_inputs(tmp_path, feature_graph)
    for case in ("wav_named_npy", "zero_frames"):
        model, data = cases[case]
        res = subprocess.run([exe, "predict", "--onnx", str(model), str(data)], capture_output=True, text=True,
                             cwd=Path(__file__).parents[1], timeout=300)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert res.stderr.strip().startswith("serray predict: error: ") and str(data) in res.stderr
