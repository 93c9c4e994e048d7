"""Leave-one-session-out fine-tuning, results files, the ablation command and registration (Ray).

One module fixture runs ``run_ablation`` on the shared synthetic features: (a) no adapter, (b) the
adapter without local attributes, (c) the full adapter, each with a short
schedule, on folds 1-3 (to keep the suite short). Its outputs serve every test below.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score

from serray.config import load_config
from serray.errors import DataError
from serray.registry import list_entries

#: Mean LOSO UA (folds 1-3) the pipeline must reach on the test corpus (chance = 0.25). Observed with
#: this fixture's short schedule: no-adapter baseline 0.55 (folds 0.60 / 0.50 / 0.55); the default
#: corpus and schedule reach 0.62-0.69 (README). 0.4 leaves room for run-to-run spread on few folds.
UA_FLOOR = 0.4

SHORT = ["pretrain.epochs=4", "finetune.epochs=8", "adapter.d_model=48", "adapter.ff_dim=96",
         "adapter.num_layers=2", "adapter.num_clusters=16", "finetune.attention_dim=32", "finetune.hidden_dim=64",
         "finetune.max_concurrent_folds=2", "finetune.folds=[1,2,3]"]


def _cfg(featurized, out, *overrides):
    return load_config(None, [f"output_dir={out}", f"data.root={featurized.data.root}", "ray.progress_bars=false",
                              f"features.dir={featurized.features.dir}", f"data.manifest={featurized.data.manifest}",
                              *SHORT, *overrides])


@pytest.fixture(scope="module")
def ablation(featurized, tmp_path_factory):
    from serray.train.ablation import run_ablation

    cfg = _cfg(featurized, tmp_path_factory.mktemp("ablation"))
    return cfg, run_ablation(cfg, echo=lambda *_: None)


@pytest.mark.ray
@pytest.mark.slow
def test_ablation_has_three_rows_and_files(ablation):
    cfg, summary = ablation
    out = Path(cfg.output_dir) / "ablation"
    data = json.loads((out / "ablation.json").read_text())
    assert [v["variant"] for v in data["variants"]] == ["no_adapter", "no_local_attributes", "full"]
    table = (out / "ablation.md").read_text()
    assert table.count("| (") == 3
    for v in data["variants"]:
        assert set(v["mean"]) == {"ua", "wa", "macro_f1"}
        assert [f["fold"] for f in v["folds"]] == [1, 2, 3]
    # the variant without local attributes was pre-trained with the cluster loss switched off
    meta = json.loads((Path(cfg.output_dir) / "ablation/no_local_attributes/pretrain/adapter/meta.json").read_text())
    assert meta["model"]["w_cluster"] == 0.0
    full = json.loads((Path(cfg.pretrain.dir) / "adapter/meta.json").read_text())
    assert full["model"]["w_cluster"] == 1.0


@pytest.mark.ray
@pytest.mark.slow
def test_full_pipeline_learns_the_synthetic_emotions(ablation):
    cfg, summary = ablation
    full = {v["variant"]: v for v in summary["variants"]}["full"]
    assert full["mean"]["ua"] >= UA_FLOOR, full["mean"]
    baseline = {v["variant"]: v for v in summary["variants"]}["no_adapter"]
    assert baseline["mean"]["ua"] >= UA_FLOOR, baseline["mean"]


@pytest.mark.ray
@pytest.mark.slow
def test_results_files_and_metrics_equal_sklearn(ablation):
    cfg, _ = ablation
    out = Path(cfg.finetune.dir)
    m = json.loads((out / "metrics.json").read_text())
    assert {"folds", "mean", "std"} <= set(m)
    for f in m["folds"]:
        assert {"fold", "test_session", "ua", "wa", "macro_f1", "n_test"} <= set(f)
    preds = pd.read_csv(out / "predictions.csv")
    rows = pd.read_parquet(cfg.data.manifest)
    rows = rows[rows["session"].isin(list(cfg.finetune.folds))]
    # every kept utterance of the tested sessions is a test utterance exactly once, in its session's fold
    assert sorted(preds["utt_id"]) == sorted(rows["utt_id"])
    assert (preds["fold"] == preds["utt_id"].str.slice(4, 5).astype(int)).all()
    for f in m["folds"]:
        p = preds[preds["fold"] == f["fold"]]
        assert f["n_test"] == len(p)
        assert f["ua"] == pytest.approx(balanced_accuracy_score(p["label"], p["pred"]))
        assert f["wa"] == pytest.approx(float((p["label"] == p["pred"]).mean()))
    assert m["mean"]["ua"] == pytest.approx(np.mean([f["ua"] for f in m["folds"]]))
    probs = preds[[c for c in preds.columns if c.startswith("p_")]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    for png in ("confusion_matrix.png", "learning_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mean ± std" in (out / "results.md").read_text()
    # each fold selected its epoch on validation data and kept that model
    for f in m["folds"]:
        assert 0 <= f["best_epoch"] < cfg.finetune.epochs
        assert (out / f"fold{f['fold']}" / "model" / "state.pt").is_file()


@pytest.mark.ray
@pytest.mark.slow
def test_finetune_registers_its_result(ablation):
    cfg, _ = ablation
    entries = list_entries(cfg.registry.dir)
    assert len(entries) == 3  # one per variant (each has its own config hash)
    m = json.loads((Path(cfg.finetune.dir) / "metrics.json").read_text())
    full = [e for e in entries if e["finetune_dir"] == str(Path(cfg.finetune.dir).resolve())]
    assert len(full) == 1 and full[0]["metrics"]["ua"] == pytest.approx(m["mean"]["ua"])
    assert full[0]["labels"] == ["neu", "hap", "sad", "ang"]


@pytest.mark.ray
@pytest.mark.slow
def test_rerun_reuses_finished_folds_and_same_seed_same_numbers(ablation, featurized, tmp_path):
    from serray.train.finetune import run_finetune

    cfg, _ = ablation
    before = json.loads((Path(cfg.finetune.dir) / "metrics.json").read_text())
    again = run_finetune(cfg)  # every fold is finished: nothing is trained
    assert again["mean"] == before["mean"]
    # a fresh directory, same config and seed: the same numbers (CPU determinism)
    base = _cfg(featurized, Path(cfg.output_dir) / "ablation" / "no_adapter_again", "finetune.mode=none",
                "finetune.folds=[2]", "finetune.register=false")
    first = json.loads((Path(cfg.output_dir) / "ablation/no_adapter/metrics.json").read_text())
    res = run_finetune(base)
    assert res["folds"][0]["ua"] == pytest.approx([f for f in first["folds"] if f["fold"] == 2][0]["ua"], abs=1e-9)
    p1 = pd.read_csv(Path(cfg.output_dir) / "ablation/no_adapter/fold2/predictions.csv")
    p2 = pd.read_csv(Path(base.finetune.dir) / "fold2/predictions.csv")
    np.testing.assert_allclose(p1.sort_values("utt_id")["p_neu"], p2.sort_values("utt_id")["p_neu"], atol=1e-6)


@pytest.mark.ray
def test_missing_adapter_is_a_clear_error(featurized, tmp_path):
    from serray.train.finetune import run_finetune

    cfg = _cfg(featurized, tmp_path, "finetune.mode=frozen")
    with pytest.raises(DataError, match="no pre-trained adapter"):
        run_finetune(cfg)


@pytest.mark.ray
def test_adapter_from_other_features_names_both(featurized, tmp_path):
    """An adapter pre-trained on other features (dim 40) is refused for these (dim 80)."""
    import torch

    from serray.models.adapter import Adapter
    from serray.train.checkpoint import MODEL_KEY, save_checkpoint
    from serray.train.finetune import run_finetune

    ad = Adapter(input_dim=40, d_model=16, num_layers=1, num_heads=2, ff_dim=32, num_clusters=4)
    feats = {"encoder": "fbank", "layers": [], "dim": 40, "num_layers": 1, "frame_rate": 100.0, "sample_rate": 16000}
    save_checkpoint(tmp_path / "adapter", {MODEL_KEY: ad.state_dict(), "step": 0, "epoch": 0},
                    {"kind": "adapter", "model": ad.config_dict(), "features": feats}, "")
    cfg = _cfg(featurized, tmp_path, f"finetune.init_from={tmp_path / 'adapter'}")
    with pytest.raises(DataError) as e:
        run_finetune(cfg)
    assert "40" in str(e.value) and "80" in str(e.value)
    assert torch.is_tensor(ad.state_dict()["kmeans.centroids"])
