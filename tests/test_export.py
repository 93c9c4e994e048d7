"""``serray export --format onnx`` and ``serray predict --onnx``: torch / onnxruntime parity on random
clips of several lengths, a run without torch or Ray, int8, the graph without its encoder, and the
encoder that cannot be exported.

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


def _checkpoint(path: Path, features: dict, seed: int = 0, num_input_layers: int = 1) -> Path:
    import torch

    from serray.data.iemocap import LABELS
    from serray.models.classifier import EmotionClassifier
    from serray.train.checkpoint import MODEL_KEY, save_checkpoint

    torch.manual_seed(seed)
    d = int(features["dim"])
    body = dict(input_dim=d, d_model=32, num_layers=2, num_heads=4, ff_dim=64, dropout=0.1,
                num_input_layers=num_input_layers, pos_conv_kernel=9, pos_conv_groups=16)
    clf = EmotionClassifier(d, len(LABELS), num_input_layers=num_input_layers, body=body, attention_dim=16,
                            hidden_dim=16).eval()
    rng = np.random.default_rng(seed)
    clf.body.input_norm.set_stats(rng.normal(10.0, 1.0, (num_input_layers, d)), rng.uniform(2.0, 4.0, (num_input_layers, d)))
    meta = {"kind": "classifier", "model": clf.config, "features": features, "labels": list(LABELS), "mode": "finetune",
            "fold": 1}
    return save_checkpoint(path, {MODEL_KEY: clf.state_dict()}, meta, "seed: 0\n")


def _fbank_identity() -> dict:
    from serray.data.encoders import FbankEncoder

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
    from serray.data.encoders import describe_encoder
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
