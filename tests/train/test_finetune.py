"""Leave-one-session-out fine-tuning, the leak-free protocol, results files and ``serray ablate``.

One module fixture runs ``run_ablation`` on the shared synthetic features: arms none, random_init,
no_local and full, 2 seeds, label fractions 0.5 and 1, folds 1-3, short schedules. Its outputs serve
every test below (the full arm of the configured seed at fraction 1 is the main fine-tuning run).
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
from serray.train.registry import list_entries

#: Mean LOSO UA (folds 1-3, two seeds) the trained arms must reach on the test corpus (chance = 0.25);
#: this fixture's short schedule gives 0.45-0.65 depending on arm and seed.
UA_FLOOR = 0.30

SHORT = ["pretrain.epochs=3", "finetune.epochs=4", "adapter.d_model=32", "adapter.ff_dim=64",
         "adapter.num_layers=1", "adapter.num_clusters=8", "finetune.attention_dim=32", "finetune.hidden_dim=32",
         "finetune.folds=[1,2,3]", "ablate.seeds=2", "ablate.label_fractions=[0.5,1.0]", "ablate.bootstrap=200"]


def _cfg(featurized, out, *overrides):
    return load_config(None, [f"output_dir={out}", f"data.root={featurized.data.root}", "encoder.name=fbank", "ray.progress_bars=false",
                              f"features.dir={featurized.features.dir}", f"data.manifest={featurized.data.manifest}",
                              *SHORT, *overrides])


@pytest.fixture(scope="module")
def ablation(featurized, tmp_path_factory, mlflow_server):
    from serray.train.ablation import run_ablation

    cfg = _cfg(featurized, tmp_path_factory.mktemp("ablation"), f"tracking.uri={mlflow_server}",
               "tracking.experiment=ablation-test")
    lines = []
    return cfg, run_ablation(cfg, echo=lines.append), lines


def _arm(summary, arm, fraction=1.0, mode="finetune"):
    return next(a for a in summary["arms"] if (a["arm"], a["mode"], a["label_fraction"]) == (arm, mode, fraction))


@pytest.mark.slow
@pytest.mark.ray
def test_ablation_files_arms_seeds_and_progress(ablation):
    cfg, summary, lines = ablation
    out = Path(cfg.output_dir) / "ablation"
    data = json.loads((out / "ablation.json").read_text())
    assert data["protocol"] == "inductive" and data["folds"] == [1, 2, 3] and data["seeds"] == [0, 1]
    cells = {(a["arm"], a["mode"], a["label_fraction"]) for a in data["arms"]}
    assert cells == {(arm, "finetune", f) for arm in ("none", "random_init", "no_local", "full") for f in (0.5, 1.0)}
    for a in data["arms"]:
        assert {(r["seed"], r["fold"]) for r in a["runs"]} == {(s, f) for s in (0, 1) for f in (1, 2, 3)}
        assert set(a["ua"]) == {"mean", "sd", "ci95"}
    pairs = {(c["a"], c["b"], c["label_fraction"]) for c in data["comparisons"]}
    assert pairs == {(a, b, f) for a, b in [("full", "random_init"), ("full", "no_local"), ("random_init", "none"),
                                            ("full", "none")] for f in (0.5, 1.0)}
    md = (out / "ablation.md").read_text()
    assert "random_init" in md and "±" in md
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sum("[ablate] unit" in line and "min left" in line for line in lines) == 6  # progress per unit


@pytest.mark.slow
@pytest.mark.ray
def test_paired_comparison_equals_a_direct_computation(ablation):
    """The delta of every comparison equals the difference of the arms' run means, and every run's UA
    equals sklearn on that run's own predictions file."""
    from serray.train.ablation import arm_config

    cfg, summary, _ = ablation
    for c in summary["comparisons"]:
        a, b = _arm(summary, c["a"], c["label_fraction"]), _arm(summary, c["b"], c["label_fraction"])
        assert c["delta"] == pytest.approx(np.mean([r["ua"] for r in a["runs"]]) - np.mean([r["ua"] for r in b["runs"]]))
        assert c["ci95"][0] <= c["delta"] <= c["ci95"][1] and 0 < c["p_value"] <= 1
    for arm in ("none", "full"):
        a = _arm(summary, arm)
        for r in a["runs"]:
            acfg = arm_config(cfg, arm, "finetune", 1.0, r["seed"])
            p = pd.read_csv(Path(acfg.finetune.dir) / f"fold{r['fold']}" / "predictions.csv")
            assert r["n_test"] == len(p)
            assert r["ua"] == pytest.approx(balanced_accuracy_score(p["label"], p["pred"]))


@pytest.mark.slow
@pytest.mark.ray
def test_arms_learn_the_synthetic_emotions(ablation):
    _, summary, _ = ablation
    for arm in ("none", "random_init", "no_local", "full"):
        assert _arm(summary, arm)["ua"]["mean"] >= UA_FLOOR, arm


@pytest.mark.slow
@pytest.mark.ray
def test_no_test_session_reaches_any_stage_of_its_fold(ablation):
    """Every fold of every arm: pre-training pool, normalisation statistics, validation and training
    are free of the test session; its test split was scored exactly once."""
    from serray.train.ablation import arm_config

    cfg, summary, _ = ablation
    for arm in ("none", "random_init", "no_local", "full"):
        for fraction in (0.5, 1.0):
            for seed in (0, 1):
                acfg = arm_config(cfg, arm, "finetune", fraction, seed)
                for fold in (1, 2, 3):
                    res = json.loads((Path(acfg.finetune.dir) / f"fold{fold}" / "fold_result.json").read_text())
                    assert res["protocol"] == "inductive" and res["test_evaluations"] == 1
                    assert fold not in res["stats_sessions"]
                    assert not [s for s in res["val_speakers"] if s.startswith(f"Ses0{fold}")]
                    if arm in ("no_local", "full"):
                        assert res["pretrain_sessions"] == [s for s in (1, 2, 3, 4, 5) if s != fold]
                        adapter = Path(acfg.pretrain.dir) / f"fold{fold}" / "adapter" / "meta.json"
                        pool = json.loads(adapter.read_text())["pool"]
                        assert fold not in pool["sessions"]
                        assert not [s for s in pool["speakers"] if s.startswith(f"Ses0{fold}")]


@pytest.mark.slow
@pytest.mark.ray
def test_shared_work_is_done_once(ablation):
    """One per-fold pre-training per (arm, seed) serves both label fractions; the no-local adapter was
    pre-trained without the cluster loss; the full arm of the configured seed uses pretrain.dir."""
    cfg, _, _ = ablation
    out = Path(cfg.output_dir)
    full0 = sorted(p.parent.parent.name for p in Path(cfg.pretrain.dir).glob("fold*/adapter/meta.json"))
    assert full0 == ["fold1", "fold2", "fold3"]
    for arm in ("full", "no_local"):
        for seed in (0, 1):
            if (arm, seed) == ("full", 0):
                continue
            metas = list((out / "ablation" / "pretrain" / arm / f"seed{seed}").glob("fold*/adapter/meta.json"))
            assert len(metas) == 3, (arm, seed)
            for m in metas:
                meta = json.loads(m.read_text())
                assert meta["model"]["w_cluster"] == (0.0 if arm == "no_local" else 1.0)
    assert not (out / "ablation" / "pretrain" / "random_init").exists()  # the control is never pre-trained


@pytest.mark.slow
@pytest.mark.ray
def test_label_fraction_subsamples_training_labels_keeping_every_class(ablation):
    from serray.train.ablation import arm_config
    from serray.train.finetune import fold_split

    cfg, _, _ = ablation
    half, full = arm_config(cfg, "none", "finetune", 0.5, 0), arm_config(cfg, "none", "finetune", 1.0, 0)
    for fold in (1, 2, 3):
        a, b = fold_split(half, fold), fold_split(full, fold)
        assert set(a["train"]["label"]) == set(b["train"]["label"]) == {"neu", "hap", "sad", "ang"}
        assert len(a["train"]) < 0.6 * len(b["train"])
        assert a["test"]["utt_id"].tolist() == b["test"]["utt_id"].tolist()  # the same test utterances
        res = json.loads((Path(half.finetune.dir) / f"fold{fold}" / "fold_result.json").read_text())
        assert res["n_train"] == len(a["train"])


@pytest.mark.slow
@pytest.mark.ray
def test_results_files_and_metrics_equal_sklearn(ablation):
    cfg, _, _ = ablation
    from serray.train.finetune import run_finetune

    summary = run_finetune(cfg)  # the full arm of seed 0 at fraction 1: every fold is finished, nothing trains
    out = Path(cfg.finetune.dir)
    m = json.loads((out / "metrics.json").read_text())
    assert m["protocol"] == "inductive" and summary["mean"] == m["mean"]
    for f in m["folds"]:
        assert {"fold", "test_session", "ua", "wa", "macro_f1", "n_test", "pretrain_sessions",
                "test_evaluations"} <= set(f)
        assert f["test_evaluations"] == 1 and f["fold"] not in f["pretrain_sessions"]
    preds = pd.read_csv(out / "predictions.csv")
    rows = pd.read_parquet(cfg.data.manifest)
    rows = rows[rows["session"].isin(list(cfg.finetune.folds)) & rows["label"].isin(["neu", "hap", "sad", "ang"])]
    # every four-class utterance of the tested sessions is a test utterance exactly once, in its session's fold
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
    assert "mean ± sd" in (out / "results.md").read_text()
    for f in m["folds"]:  # each fold selected its epoch on validation data and kept that model
        assert 0 <= f["best_epoch"] < cfg.finetune.epochs
        assert f["epochs_run"] == cfg.finetune.epochs  # the history of the whole run, not up to the selected epoch
        assert (out / f"fold{f['fold']}" / "model" / "state.pt").is_file()


@pytest.mark.slow
@pytest.mark.ray
def test_the_ablation_is_tracked_one_run_per_arm_mode_fraction_and_seed(ablation, mlflow_server):
    """On a real MLflow server: the ablation's run (its tables as artifacts) holds one tagged child run
    per arm x mode x label fraction x seed, whose test UA is that seed's mean over the folds."""
    from mlflow import MlflowClient

    cfg, summary, _ = ablation
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("ablation-test").experiment_id], max_results=1000)
    (parent,) = [r for r in runs if r.data.tags.get("stage") == "ablation"]
    assert parent.info.status == "FINISHED" and parent.data.params["ablate.seeds"] == "2"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"ablation.json", "ablation.md", "ablation.png"}
    arms = [r for r in runs if "arm" in r.data.tags]  # (other tests of this module fine-tune with its config too)
    assert len(arms) == 4 * 2 * 2 and all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in arms)
    for r in arms:
        tags = r.data.tags
        a = _arm(summary, tags["arm"], float(tags["label_fraction"]), tags["mode"])
        uas = [x["ua"] for x in a["runs"] if x["seed"] == int(tags["seed"])]
        assert r.data.metrics["test_ua"] == pytest.approx(np.mean(uas))
        assert {m.step for m in client.get_metric_history(r.info.run_id, "fold_test_ua")} == {1, 2, 3}


@pytest.mark.slow
@pytest.mark.ray
def test_rerun_reuses_everything_and_same_seed_same_numbers(ablation, featurized, mlflow_server):
    from mlflow import MlflowClient

    from serray.train.ablation import run_ablation
    from serray.train.finetune import run_finetune

    cfg, summary, _ = ablation
    out = Path(cfg.output_dir)
    made = {p: p.stat().st_mtime_ns for pat in ("fold_result.json", "state.pt", "meta.json") for p in out.rglob(pat)}
    assert len([p for p in made if p.name == "fold_result.json"]) >= 2 * 3 * 4  # (seed, fold) x arms, at least
    again = run_ablation(cfg, echo=lambda *_: None)  # every run is finished: nothing trains
    assert [a["ua"] for a in again["arms"]] == [a["ua"] for a in summary["arms"]]
    # ... and nothing is logged twice: each arm run keeps one value per fold and one mean (a rerun used to
    # append the same values again to every arm run's history)
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("ablation-test").experiment_id], max_results=1000)
    arms = [r for r in runs if "arm" in r.data.tags]
    assert len(arms) == 4 * 2 * 2
    for r in arms:
        assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "fold_test_ua")) == [1, 2, 3]
        assert len(client.get_metric_history(r.info.run_id, "test_ua")) == 1
    # nothing was trained, pre-trained or rewritten again (a timing would depend on the machine's load)
    assert {p: p.stat().st_mtime_ns for p in made} == made
    assert {p for pat in ("fold_result.json", "state.pt", "meta.json") for p in out.rglob(pat)} == set(made)
    # a fresh directory, same config and seed: the same numbers (CPU determinism)
    base = _cfg(featurized, Path(cfg.output_dir) / "again", "finetune.mode=none", "finetune.folds=[2]",
                "finetune.register=false", "finetune.label_fraction=1.0")
    first = [r for r in _arm(summary, "none")["runs"] if (r["seed"], r["fold"]) == (0, 2)][0]
    res = run_finetune(base)
    assert res["folds"][0]["ua"] == pytest.approx(first["ua"], abs=1e-9)


@pytest.mark.slow
@pytest.mark.ray
def test_finetune_registers_with_protocol_folds_and_validation_ua(featurized, tmp_path):
    from serray.train.finetune import run_finetune

    cfg = _cfg(featurized, tmp_path, "finetune.mode=none", "finetune.folds=[2,3]", "finetune.epochs=2")
    summary = run_finetune(cfg)
    (entry,) = list_entries(cfg.registry.dir)
    assert entry["id"] == summary["registered"]
    assert entry["protocol"] == "inductive" and entry["folds"] == [2, 3]
    assert entry["selected_on"] == "val_ua (epochs)"
    assert entry["metrics"]["ua"] == pytest.approx(summary["mean"]["ua"])
    assert entry["metrics"]["val_ua"] == pytest.approx(np.mean([f["val_ua"] for f in summary["folds"]]))


@pytest.mark.ray
def test_missing_adapter_is_a_clear_error(featurized, tmp_path):
    from serray.train.finetune import run_finetune

    cfg = _cfg(featurized, tmp_path, "finetune.mode=frozen", f"finetune.init_from={tmp_path / 'nowhere'}")
    with pytest.raises(DataError, match="no pre-trained adapter"):
        run_finetune(cfg)


@pytest.mark.ray
def test_adapter_from_other_features_names_both(featurized, tmp_path):
    """An adapter pre-trained on other features (dim 40) is refused for these (dim 80)."""
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
