"""The model registry and the commands that read it (no Ray)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from serray.cli import main
from serray.errors import DataError
from serray.train.registry import best_entry, get_entry, list_entries, model_dir, register
from serray.serve.demo import make_demo_checkpoint, synthetic_clip


FIVE = [1, 2, 3, 4, 5]
#: how the default config evaluates (what register_result records and `serray serve` asks for)
EVAL = {"protocol": "inductive", "folds": FIVE, "val_split": "speaker", "val_fraction": 0.15, "label_fraction": 1.0,
        "selection": "fixed"}


def W(**kw):
    """The evaluation a config asks "best" for: EVAL with changes, any selection."""
    return {**EVAL, "selection": None, **kw}


@pytest.fixture
def registry(tmp_path):
    """Three comparable entries (inductive, five folds); the second has the best *validation* UA."""
    reg = tmp_path / "registry"
    ids = []
    for i, (ua, val) in enumerate([(0.55, 0.50), (0.71, 0.66), (0.62, 0.60)]):
        ck = make_demo_checkpoint(tmp_path / f"ck{i}", seed=i)
        rec = register(reg, ck, metrics={"ua": ua, "wa": ua, "macro_f1": ua, "val_ua": val}, config_yaml="seed: 0\n",
                       source="test", hyperparameters={"adapter.mask_ratio": 0.1 * i},
                       extra={**EVAL, "selected_on": "val_ua (epochs)"})
        ids.append(rec["id"])
        time.sleep(0.01)
    return reg, ids


def test_best_never_uses_test_metrics_and_compares_like_with_like(registry, tmp_path):
    """A one-fold sweep entry or a transductive entry with a higher UA is not "best" for a five-fold
    inductive config, and among comparable entries the highest *validation* UA wins, not test UA."""
    reg, ids = registry
    ck = make_demo_checkpoint(tmp_path / "ck_other", seed=9)
    one_fold = register(reg, ck, metrics={"ua": 0.95, "val_ua": 0.99}, config_yaml="", source="tune",
                        extra={**EVAL, "folds": [1], "selection": "nested"})["id"]
    transd = register(reg, ck, metrics={"ua": 0.90, "val_ua": 0.98}, config_yaml="", source="finetune",
                      extra={**EVAL, "protocol": "transductive"})["id"]
    test_best = register(reg, ck, metrics={"ua": 0.99, "val_ua": 0.40}, config_yaml="", source="finetune",
                         extra=EVAL)["id"]  # best test UA, worst val UA
    assert best_entry(reg, W())["id"] == ids[1]
    assert best_entry(reg, W(folds=[1]))["id"] == one_fold
    assert best_entry(reg, W(protocol="transductive"))["id"] == transd
    assert test_best != ids[1]
    with pytest.raises(DataError, match="protocol=inductive, folds=\\[2\\]"):
        best_entry(reg, W(folds=[2]))


def test_best_compares_only_entries_evaluated_alike_and_never_a_non_nested_sweep(registry, tmp_path):
    """Entries with a higher validation UA but another validation split, another label fraction, or
    hyper-parameters chosen by a non-nested sweep are never the best of a default config."""
    reg, ids = registry
    ck = make_demo_checkpoint(tmp_path / "ck_other", seed=9)
    others = {}
    for name, change in (("dialog", {"val_split": "dialog"}), ("share", {"val_fraction": 0.3}),
                         ("labels", {"label_fraction": 0.1}), ("leaky", {"selection": "non-nested"})):
        others[name] = register(reg, ck, metrics={"ua": 0.9, "val_ua": 0.95}, config_yaml="", source="tune",
                                extra={**EVAL, **change})["id"]
    assert best_entry(reg, W())["id"] == ids[1]
    assert best_entry(reg, W(val_split="dialog"))["id"] == others["dialog"]
    assert best_entry(reg, W(label_fraction=0.1))["id"] == others["labels"]
    nested = register(reg, ck, metrics={"ua": 0.6, "val_ua": 0.9}, config_yaml="", source="tune",
                      extra={**EVAL, "selection": "nested"})["id"]
    assert best_entry(reg, W())["id"] == nested  # a nested sweep is comparable, and ranked on validation UA
    assert get_entry(reg, others["leaky"])["id"] == others["leaky"]  # reachable by id only


def test_an_entry_from_before_the_evaluation_keys_reads_them_from_its_config(registry, tmp_path):
    reg, ids = registry
    ck = make_demo_checkpoint(tmp_path / "ck_old", seed=3)
    old = register(reg, ck, metrics={"ua": 0.6, "val_ua": 0.97}, source="finetune",
                   config_yaml="finetune:\n  val_split: speaker\n  val_fraction: 0.15\n  label_fraction: 1.0\n",
                   extra={"protocol": "inductive", "folds": FIVE})["id"]
    assert best_entry(reg, W())["id"] == old
    (reg / old / "config.yaml").write_text("finetune:\n  val_split: random\n")
    assert best_entry(reg, W())["id"] == ids[1]


def test_entries_are_complete_and_best_is_highest_val_ua(registry):
    reg, ids = registry
    entries = list_entries(reg)
    assert [e["id"] for e in entries] == ids
    for e in entries:
        d = Path(e["path"])
        assert (d / "entry.json").is_file() and (d / "config.yaml").is_file()
        assert (model_dir(e) / "state.pt").is_file() and (model_dir(e) / "meta.json").is_file()
        assert e["labels"] == ["neu", "hap", "sad", "ang"] and e["encoder"]["encoder"] == "egemaps"  # make_demo_checkpoint: the default front end
        assert e["created"] and e["source"] == "test"
    assert best_entry(reg)["id"] == ids[1]
    assert get_entry(reg, ids[2][:-2])["id"] == ids[2]  # a unique prefix is enough
    assert get_entry(reg)["id"] == ids[1]


def test_unknown_entry_and_empty_registry_are_clear_errors(registry, tmp_path):
    reg, ids = registry
    with pytest.raises(DataError, match="does not exist"):
        get_entry(reg, "nope")
    with pytest.raises(DataError, match="empty"):
        best_entry(tmp_path / "none")
    with pytest.raises(DataError, match="not a serray checkpoint"):
        register(reg, tmp_path, metrics={}, config_yaml="", source="x")


def test_cli_models_list_show_and_predict(registry, tmp_path, capsys):
    reg, ids = registry
    assert main(["models", "list", f"registry.dir={reg}"]) == 0
    out = capsys.readouterr().out
    assert all(i in out for i in ids) and "71.00" in out
    assert main(["models", "show", ids[0], f"registry.dir={reg}"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["id"] == ids[0] and shown["hyperparameters"] == {"adapter.mask_ratio": 0.0}
    wav = tmp_path / "clip.wav"
    sf.write(wav, synthetic_clip(1.2, channels=2), 44100)  # stereo, 44.1 kHz: converted
    assert main(["predict", str(wav), f"registry.dir={reg}", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)[0]
    probs = np.array([rec[f"p_{k}"] for k in ("neu", "hap", "sad", "ang")])
    assert rec["label"] in ("neu", "hap", "sad", "ang") and probs.sum() == pytest.approx(1.0, abs=1e-5)
    # the same file with the model picked by id gives the same numbers (the best entry here)
    assert main(["predict", str(wav), f"registry.dir={reg}", f"serve.model={ids[1]}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["p_neu"] == pytest.approx(rec["p_neu"])
    assert main(["predict", str(tmp_path / "missing.wav"), f"registry.dir={reg}"]) == 2
    assert "audio file not found" in capsys.readouterr().err


def test_an_entry_carries_its_hugging_face_encoder(tiny_hubert, tmp_path):
    """A replica that never saw the encoder's directory (moved away, hub unreachable) loads it from the
    entry, and predicts exactly what the original encoder gives."""
    import shutil

    from serray.config import load_config
    from serray.predict import Predictor
    from serray.train.registry import encoder_files

    enc = tmp_path / "hubert"
    shutil.copytree(tiny_hubert, enc)
    cfg = load_config(None, [f"output_dir={tmp_path}", f"encoder.name={enc}", "encoder.layers=[1,2]"])
    ck = make_demo_checkpoint(tmp_path / "ck", cfg=cfg)
    clip = synthetic_clip(seed=3, seconds=1.0)
    before = Predictor.from_checkpoint(ck).predict_waveforms([clip])

    assert encoder_files("fbank") is None and encoder_files(str(enc)) == enc
    assert encoder_files("no-such-org/no-such-model") is None  # not cached here: the entry goes without
    rec = register(tmp_path / "registry", ck, metrics={"ua": 0.5, "val_ua": 0.5}, config_yaml="", source="test",
                   encoder_files=encoder_files(str(enc)))
    shutil.rmtree(enc)  # the original is gone: only the entry's copy remains
    entry = get_entry(tmp_path / "registry", rec["id"])
    p = Predictor.from_checkpoint(model_dir(entry))
    assert (model_dir(entry) / "encoder" / "config.json").is_file()
    np.testing.assert_allclose(p.predict_waveforms([clip]), before, rtol=1e-5, atol=1e-6)
    assert p.features["encoder"] == str(enc)  # the identity is unchanged


# ---------------------------------------------------------------- one bad entry does not break the registry


def _break(reg: Path, name: str, text: str) -> Path:
    d = reg / name
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        (d / "entry.json").write_bytes(text)
    else:
        (d / "entry.json").write_text(text)
    return d


@pytest.mark.parametrize("text, why", [
    ('{"id": "20990101-000000-aaaaaa", "created": "2099-01-01T00:00:00", "metr', "not valid JSON"),  # truncated
    ("[1, 2, 3]", "not a JSON object"),  # foreign
    ('{"name": "something else"}', "missing or malformed field(s) id, created, metrics, encoder"),
    ('{"id": "x", "created": "2099", "metrics": {"val_ua": 0.99}, "encoder": {}, "folds": 5}', "folds / protocol"),
    (b'{"id": "\xff\xfe"}', "not valid JSON"),  # not UTF-8
])
def test_unreadable_entry_is_reported_and_skipped(registry, tmp_path, capsys, text, why):
    reg, ids = registry
    bad = _break(reg, "20990101-000000-broken", text)
    # listing: the good entries, and a line naming the bad one
    assert [e["id"] for e in list_entries(reg)] == ids
    assert main(["models", "list", f"registry.dir={reg}"]) == 0
    out = capsys.readouterr().out
    assert all(i in out for i in ids)
    assert f"unreadable entry {bad}" in out and why in out
    # "best" (serve / predict) skips it
    assert best_entry(reg, W())["id"] == ids[1]
    assert main(["models", "show", f"registry.dir={reg}"]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == ids[1]
    # asking for it by name is a clear error, not a traceback
    assert main(["models", "show", bad.name, f"registry.dir={reg}"]) == 2
    assert "unreadable" in capsys.readouterr().err


def test_best_skips_an_entry_whose_model_is_gone(registry):
    import shutil

    reg, ids = registry
    shutil.rmtree(reg / ids[1] / "model")  # the best by validation UA
    assert best_entry(reg, W())["id"] == ids[2]  # the next best


@pytest.mark.parametrize("breakage", ["state.pt deleted", "state.pt truncated", "meta.json truncated",
                                      "unknown model kwargs", "encoder unreadable"])
def test_best_is_the_best_entry_that_loads_and_names_the_one_it_skipped(registry, breakage, caplog, capsys):
    """best_entry checked only that meta.json existed: an entry without state.pt (val UA 0.90) beat a
    good one, and serve / predict then failed. Now a broken best is skipped with a warning naming it."""
    import logging

    reg, ids = registry
    model = reg / ids[1] / "model"  # the best by validation UA
    if breakage == "state.pt deleted":
        (model / "state.pt").unlink()
    elif breakage == "state.pt truncated":
        (model / "state.pt").write_bytes((model / "state.pt").read_bytes()[:100])
    elif breakage == "meta.json truncated":
        (model / "meta.json").write_text((model / "meta.json").read_text()[:30])
    elif breakage == "unknown model kwargs":
        meta = json.loads((model / "meta.json").read_text())
        meta["model"]["num_expert_heads"] = 3
        (model / "meta.json").write_text(json.dumps(meta))
    else:
        meta = json.loads((model / "meta.json").read_text())
        meta["features"]["encoder"] = "/models/hubert"
        (model / "meta.json").write_text(json.dumps(meta))
        (model / "encoder").mkdir()
        (model / "encoder" / "config.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="serray.train.registry"):
        assert best_entry(reg, W())["id"] == ids[2]
    assert f"skipping registry entry {ids[1]}" in caplog.text
    # asked for by id, it is a one-line error, not a traceback
    if breakage != "encoder unreadable":
        clip = reg.parent / "clip.wav"
        sf.write(clip, synthetic_clip(1.0), 16000)
        assert main(["predict", str(clip), f"registry.dir={reg}", f"serve.model={ids[1]}"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and len([l for l in err.splitlines() if "error:" in l]) == 1


def test_entries_are_never_followed_outside_the_registry_and_stale_temporaries_go(registry, tmp_path):
    import os

    reg, ids = registry
    outside = tmp_path / "elsewhere"
    import shutil

    shutil.copytree(reg / ids[1], outside)
    meta = json.loads((outside / "entry.json").read_text())
    meta.update(id="20990101-000000-linked", metrics={**meta["metrics"], "val_ua": 0.99})
    (outside / "entry.json").write_text(json.dumps(meta))
    os.symlink(outside, reg / "20990101-000000-linked")
    entries, problems = __import__("serray.train.registry", fromlist=["scan_entries"]).scan_entries(reg)
    assert "20990101-000000-linked" not in [e["id"] for e in entries]
    assert any("symbolic link" in why for _, why in problems)
    assert best_entry(reg, W())["id"] == ids[1]
    stale, fresh = reg / ".20000101-000000-aaaaaa.tmp", reg / ".20000101-000000-bbbbbb.tmp"
    for d in (stale, fresh):
        d.mkdir()
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    register(reg, make_demo_checkpoint(tmp_path / "ck_new", seed=4), metrics={"val_ua": 0.1}, config_yaml="",
             source="test", extra=EVAL)
    assert not stale.exists() and fresh.exists()  # a registration in progress elsewhere is left alone


def test_entry_with_non_numeric_metric_ranks_last(registry, tmp_path):
    reg, ids = registry
    ck = make_demo_checkpoint(tmp_path / "ck_nan", seed=5)
    odd = register(reg, ck, metrics={"val_ua": "n/a"}, config_yaml="", source="x",
                   extra=EVAL)
    assert best_entry(reg, W())["id"] == ids[1]
    assert odd["id"] in [e["id"] for e in list_entries(reg)]


def test_models_show_redacts_storage_credentials(registry, capsys, monkeypatch):
    import serray.train.registry as registry_mod

    reg, ids = registry
    real = registry_mod.get_entry

    def with_uri(*a, **k):
        e = real(*a, **k)
        return {**e, "path": "s3://AKIDSERRAYTEST:SECRETSERRAYTEST@bucket/reg/" + e["id"] + "?secret_key=SECRETSERRAYTEST"}

    monkeypatch.setattr(registry_mod, "get_entry", with_uri)
    assert main(["models", "show", ids[0], f"registry.dir={reg}"]) == 0
    out = capsys.readouterr().out
    assert "SECRETSERRAYTEST" not in out and "AKIDSERRAYTEST" not in out
    assert json.loads(out)["path"] == f"s3://***@bucket/reg/{ids[0]}?secret_key=***"
