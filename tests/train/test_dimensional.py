"""Dimensional emotion (``finetune.task``): CCC against direct computation, the model heads, the
config's bad inputs, and a tiny dimensional / multitask LOSO run on the synthetic corpus."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from serray.config import load_config
from serray.errors import ConfigError
from serray.train.tasks.dimensional import ccc, ccc_loss, dimensional_metrics, pearson


def _direct_ccc(y, p):
    y, p = np.asarray(y, float), np.asarray(p, float)
    sxy = sum((a - y.mean()) * (b - p.mean()) for a, b in zip(y, p)) / len(y)
    return 2 * sxy / (y.var() + p.var() + (y.mean() - p.mean()) ** 2)


def test_ccc_matches_direct_computation_and_its_edge_cases():
    rng = np.random.default_rng(0)
    y = rng.normal(3.0, 0.8, 50)
    p = 0.6 * y + rng.normal(1.0, 0.5, 50)
    assert ccc(y, p) == pytest.approx(_direct_ccc(y, p), abs=1e-12)
    assert ccc(y, p) < pearson(y, p)  # CCC also penalises the bias and the scale
    assert ccc(y, y) == pytest.approx(1.0)  # perfect agreement
    assert ccc(y, np.full_like(y, 3.0)) == 0.0  # constant predictions: no covariance
    centred = y - y.mean()
    assert ccc(centred, -centred) == pytest.approx(-1.0)  # negated (mirrored) targets
    assert ccc(y, -y) == pytest.approx(_direct_ccc(y, -y)) and -1.0 < ccc(y, -y) < 0.0  # mirrored and shifted
    assert ccc(y, y + 1.0) == pytest.approx(_direct_ccc(y, y + 1.0)) and ccc(y, y + 1.0) < 1.0  # a bias costs
    assert np.isnan(ccc([], [])) and np.isnan(ccc([2.0, 2.0], [2.0, 2.0]))
    assert np.isnan(pearson(y, np.full_like(y, 3.0)))


def test_ccc_loss_is_one_minus_ccc_per_dimension():
    rng = np.random.default_rng(1)
    t = rng.uniform(0, 1, (40, 3))
    p = np.clip(t + rng.normal(0, 0.2, t.shape), 0, 1)
    expected = np.mean([1 - _direct_ccc(t[:, j], p[:, j]) for j in range(3)])
    assert float(ccc_loss(torch.tensor(p), torch.tensor(t))) == pytest.approx(expected, abs=1e-6)
    m = dimensional_metrics(t, p, ["valence", "arousal", "dominance"])
    assert m["ccc_mean"] == pytest.approx(1 - expected, abs=1e-9)
    assert m["mae_arousal"] == pytest.approx(np.mean(np.abs(t[:, 1] - p[:, 1])))


def test_models_return_the_heads_of_their_task():
    from serray.models.dimensional import build_model

    kw = dict(input_dim=8, num_classes=4, body=None, attention_dim=8, hidden_dim=8)
    x = torch.randn(3, 20, 8)
    assert isinstance(build_model(kw)(x), torch.Tensor)  # categorical: logits, as before
    dim = build_model({**kw, "task": "dimensional", "num_dims": 3})(x)
    assert set(dim) == {"dims"} and dim["dims"].shape == (3, 3) and ((dim["dims"] >= 0) & (dim["dims"] <= 1)).all()
    both = build_model({**kw, "task": "multitask", "num_dims": 2})(x)
    assert set(both) == {"dims", "logits"} and both["logits"].shape == (3, 4) and both["dims"].shape == (3, 2)


@pytest.mark.parametrize("overrides, match", [
    (["finetune.task=dimensional", "data.corpus=emodb"], "corpus emodb .* no emotion dimensions"),
    (["finetune.task=dimensional", "finetune.dimensions=[valence,pleasure]"], "known: valence, arousal, dominance"),
    (["finetune.task=regression"], "finetune.task must be categorical, dimensional or multitask"),
    (["finetune.task=dimensional", "finetune.select_metric=val_ua"], "select_metric"),
    (["tune.metric=val_ccc_mean"], "needs finetune.task=dimensional or multitask"),
])
def test_bad_task_configs_are_one_line_errors(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [f"output_dir={tmp_path}", *overrides])


def test_synthetic_ratings_follow_the_audio(synthetic_root):
    """Arousal follows the recording's level (an audio measurement), across the corpus."""
    import soundfile as sf

    from serray.data.corpora.iemocap import build_manifest

    df = build_manifest(synthetic_root, [1, 2, 3, 4, 5], True, keep_unlabelled=True).kept
    assert df[["valence", "activation", "dominance"]].notna().all().all()
    level = [10 * np.log10(np.mean(sf.read(p)[0] ** 2)) for p in df["path"]]
    assert np.corrcoef(level, df["activation"])[0, 1] > 0.5
    assert np.corrcoef(level, df["dominance"])[0, 1] > 0.4
    by_class = df[df["label"] != ""].groupby("label")[["valence", "activation"]].mean()
    assert by_class.loc["hap", "valence"] > by_class.loc["ang", "valence"] + 1.0
    assert by_class.loc["ang", "activation"] > by_class.loc["sad", "activation"] + 1.0


SHORT = ["finetune.mode=none", "finetune.epochs=6", "finetune.folds=[1,2]", "finetune.attention_dim=32",
         "finetune.hidden_dim=32", "finetune.register=true"]


def _cfg(featurized, out, *overrides):
    return load_config(None, [f"output_dir={out}", f"data.root={featurized.data.root}", "encoder.name=fbank", "ray.progress_bars=false",
                              f"features.dir={featurized.features.dir}", f"data.manifest={featurized.data.manifest}",
                              *SHORT, *overrides])


@pytest.mark.ray
def test_dimensional_loso_learns_the_ratings_and_writes_its_results(featurized, tmp_path):
    from serray.predict import Predictor
    from serray.train.registry import list_entries
    from serray.train.finetune import run_finetune

    cfg = _cfg(featurized, tmp_path, "finetune.task=dimensional")
    run_finetune(cfg)
    out = Path(cfg.finetune.dir)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "dimensional" and metrics["dimensions"] == ["valence", "arousal", "dominance"]
    # above chance (CCC 0) on unseen sessions: arousal is carried by level and rate
    assert metrics["mean"]["ccc_arousal"] > 0.3, metrics["mean"]
    assert metrics["mean"]["ccc_mean"] > 0.15, metrics["mean"]
    for f in metrics["folds"]:
        assert "val_ccc_mean" in f and "ua" not in f
    preds = pd.read_csv(out / "predictions.csv")
    for n in ("valence", "arousal", "dominance"):  # true and predicted ratings on the corpus's 1-5 scale
        assert preds[n].between(1, 5).all() and preds[f"pred_{n}"].between(1, 5).all()
    fold1 = preds[preds["fold"] == 1]
    assert metrics["folds"][0]["ccc_arousal"] == pytest.approx(ccc(fold1["arousal"], fold1["pred_arousal"]), abs=1e-6)
    assert (out / "dimensions_scatter.png").stat().st_size > 0 and "CCC arousal" in (out / "results.md").read_text()
    (entry,) = list_entries(cfg.registry.dir)
    assert entry["task"] == "dimensional" and entry["selected_on"] == "val_ccc_mean (epochs)"
    best = max(metrics["folds"], key=lambda f: f["val_ccc_mean"])["fold"]
    assert entry["model_fold"] == best and entry["metrics"]["ccc_mean"] == pytest.approx(metrics["mean"]["ccc_mean"])
    model = out / f"fold{best}" / "model"
    p = Predictor.from_checkpoint(model)
    assert p.task == "dimensional" and p.scale_name() == "1-5" and not p.has_classes
    wavs = pd.read_parquet(cfg.data.manifest)["path"].iloc[:2].tolist()
    ans = p.predict_files(wavs)
    assert list(ans.columns) == ["path", "valence", "arousal", "dominance", "scale"]
    assert ans[["valence", "arousal", "dominance"]].apply(lambda c: c.between(1, 5)).all().all()
    _serve_answers_dimensions(model, wavs, ans)
    _segments_carry_dimensions(p, cfg, labelled=False)


def _serve_answers_dimensions(model, wavs, offline):
    """A Serve replica's answer (the service, without HTTP) and model card for a dimensional model."""
    import soundfile as sf

    from serray.serve.service import ANSWER_SCHEMA, SERService

    from serray.config import as_dict

    svc = SERService(model, {"id": "dim-test"}, as_dict(load_config(None, []).serve))
    answers = svc.infer([sf.read(w, dtype="float32")[0] for w in wavs])
    for a, (_, row) in zip(answers, offline.iterrows()):
        assert a["schema"] == ANSWER_SCHEMA and a["task"] == "dimensional" and "label" not in a
        assert a["scale"] == [1.0, 5.0] and set(a["dimensions"]) == {"valence", "arousal", "dominance"}
        for n, v in a["dimensions"].items():
            assert v == pytest.approx(row[n], abs=1e-5)
    info = svc.info()
    assert info["task"] == "dimensional"
    assert info["outputs"] == {"schema": ANSWER_SCHEMA,
                               "dimensions": {"names": ["valence", "arousal", "dominance"], "scale": [1.0, 5.0]}}


@pytest.mark.slow
@pytest.mark.ray
def test_multitask_returns_both_and_keeps_the_splits(featurized, tmp_path):
    from serray.predict import Predictor
    from serray.train.finetune import run_finetune

    cfg = _cfg(featurized, tmp_path, "finetune.task=multitask", "finetune.folds=[1]", "finetune.register=false")
    summary = run_finetune(cfg)
    f = summary["folds"][0]
    assert {"ua", "ccc_valence", "ccc_mean", "val_ua", "val_ccc_mean"} <= set(f) and f["ua"] > 0.25
    p = Predictor.from_checkpoint(Path(cfg.finetune.dir) / "fold1" / "model")
    ans = p.predict_files(pd.read_parquet(cfg.data.manifest)["path"].iloc[:2].tolist())
    assert {"label", "p_neu", "valence", "dominance", "scale"} <= set(ans.columns)
    assert ans[[f"p_{c}" for c in p.labels]].sum(axis=1).to_numpy() == pytest.approx([1.0, 1.0], abs=1e-5)
    import soundfile as sf

    from serray.serve.service import SERService

    from serray.config import as_dict

    svc = SERService(Path(cfg.finetune.dir) / "fold1" / "model", {"id": "mt"}, as_dict(cfg.serve))
    (a,) = svc.infer([sf.read(pd.read_parquet(cfg.data.manifest)["path"].iloc[0], dtype="float32")[0]])
    assert a["label"] == ans["label"].iloc[0] and a["dimensions"]["valence"] == pytest.approx(ans["valence"].iloc[0], abs=1e-5)
    assert set(svc.info()["outputs"]) == {"schema", "label", "dimensions"}
    _segments_carry_dimensions(p, cfg, labelled=True)


def _segments_carry_dimensions(predictor, cfg, labelled: bool):
    """A recording of two corpus clips: every segment has the ratings (and a label for multitask),
    the aggregate their duration-weighted mean; the table prints them."""
    import soundfile as sf

    from serray.segment import format_table, segment_file, settings_of
    from serray.serve.demo import synthetic_recording

    paths = pd.read_parquet(cfg.data.manifest)["path"].iloc[:2].tolist()
    audio, spans = synthetic_recording([sf.read(p, dtype="float32")[0] for p in paths], gap_s=1.5, noise_db=None)
    rec = Path(cfg.output_dir) / "recording.wav"
    sf.write(rec, audio, 16000)
    res = segment_file(predictor, str(rec), {**settings_of(cfg), "vad": "energy"})
    assert len(res["segments"]) == 2, res["segments"]
    for s in res["segments"]:
        assert set(s["dimensions"]) == {"valence", "arousal", "dominance"} and (s["label"] is not None) == labelled
    w = [s["end"] - s["start"] for s in res["segments"]]
    mean_v = sum(x * s["dimensions"]["valence"] for x, s in zip(w, res["segments"])) / sum(w)
    assert res["aggregate"]["dimensions"]["valence"] == pytest.approx(mean_v, abs=1e-5)
    assert "dimensions (duration-weighted): valence" in format_table(res)


def _dim_frame(seeds, folds, noise, rng):
    rows = []
    for fold in folds:
        y = rng.uniform(1, 5, (30, 2))
        for s in seeds:
            p = y + rng.normal(0, noise, y.shape)
            rows += [{"seed": s, "fold": fold, "utt_id": f"f{fold}_{i:02d}", "valence": y[i, 0], "arousal": y[i, 1],
                      "pred_valence": p[i, 0], "pred_arousal": p[i, 1]} for i in range(len(y))]
    return pd.DataFrame(rows)


def test_run_level_ccc_comparison_pairs_runs_like_ua():
    from serray.train.tasks.dimensional import _weighted_ccc, run_level_test_ccc, run_metrics_ccc

    rng = np.random.default_rng(0)
    names = ["valence", "arousal"]
    good = _dim_frame([0, 1, 2], [1, 2, 3], 0.3, np.random.default_rng(5))
    bad = _dim_frame([0, 1, 2], [1, 2, 3], 1.5, np.random.default_rng(5))  # same truths, noisier predictions
    assert np.allclose(good[names].to_numpy(), bad[names].to_numpy())
    y, p = rng.normal(size=20), rng.normal(size=20)
    assert _weighted_ccc(y, p, np.ones((1, 20)))[0] == pytest.approx(ccc(y, p))  # weights 1 = plain CCC
    runs = run_metrics_ccc(good, names)
    assert len(runs) == 9 and all(r["ccc_mean"] > 0.9 for r in runs)
    res = run_level_test_ccc(good, bad, "ccc_mean", names, n_boot=300)
    assert res["delta"] > 0.2 and res["ci95"][0] > 0 and res["wins"] == 9 and res["p_value"] == pytest.approx(2 / 2**9)
    same = run_level_test_ccc(good, good, "ccc_arousal", names, n_boot=100)
    assert same["delta"] == 0 and same["p_value"] == 1.0
    with pytest.raises(ValueError, match="unknown metric"):
        run_level_test_ccc(good, bad, "ccc_dominance", names)


@pytest.mark.slow
@pytest.mark.ray
def test_ablation_compares_arms_on_ccc(featurized, tmp_path):
    from serray.train.ablation import run_ablation

    cfg = _cfg(featurized, tmp_path, "finetune.task=dimensional", "ablate.metric=ccc_arousal",
               "ablate.arms=[none,random_init]", "ablate.seeds=2", "ablate.bootstrap=100", "finetune.epochs=3",
               "adapter.d_model=32", "adapter.ff_dim=64", "adapter.num_layers=1", "finetune.register=false",
               "tracking.experiment=dim-ablation")
    lines = []
    ab = run_ablation(cfg, echo=lines.append)
    data = json.loads((Path(cfg.output_dir) / "ablation" / "ablation.json").read_text())
    assert data["metric"] == "ccc_arousal" and data["seeds"] == [0, 1] and data["folds"] == [1, 2]
    arms = {a["arm"]: a for a in data["arms"]}
    assert set(arms) == {"none", "random_init"} and len(arms["none"]["runs"]) == 4
    assert arms["none"]["ccc_arousal"]["mean"] == pytest.approx(np.mean([r["ccc_arousal"] for r in arms["none"]["runs"]]))
    (c,) = data["comparisons"]
    assert (c["a"], c["b"], c["n_runs"]) == ("random_init", "none", 4)
    diffs = [a["ccc_arousal"] - b["ccc_arousal"] for a, b in zip(arms["random_init"]["runs"], arms["none"]["runs"])]
    assert c["delta"] == pytest.approx(np.mean(diffs))
    assert any("test ccc_arousal" in line for line in lines) and ab["metric"] == "ccc_arousal"
    from mlflow import MlflowClient  # tracked like a UA ablation: one run per arm x seed, scored on CCC

    client = MlflowClient(cfg.tracking.uri)
    runs = client.search_runs([client.get_experiment_by_name("dim-ablation").experiment_id])
    arm_runs = {(r.data.tags["arm"], int(r.data.tags["seed"])): r for r in runs if "arm" in r.data.tags}
    assert len(arm_runs) == 4
    for (arm, seed), r in arm_runs.items():
        uas = [x["ccc_arousal"] for x in arms[arm]["runs"] if x["seed"] == seed]
        assert r.data.metrics["test_ccc_arousal"] == pytest.approx(np.mean(uas))


@pytest.mark.slow
@pytest.mark.ray
def test_a_nested_sweep_ranks_trials_on_validation_ccc_and_registers_the_task(featurized, tmp_path):
    from serray.train.registry import list_entries
    from serray.tune import run_sweep

    space = tmp_path / "space.yaml"
    space.write_text("tune:\n  search_space:\n    finetune:\n      lr: {grid: [0.001, 0.003]}\n")
    cfg = load_config(space, [f"output_dir={tmp_path}", f"data.root={featurized.data.root}", "encoder.name=fbank", "ray.progress_bars=false",
                              f"features.dir={featurized.features.dir}", f"data.manifest={featurized.data.manifest}",
                              *SHORT, "finetune.epochs=3", "finetune.task=dimensional", "tune.metric=val_ccc_arousal",
                              "tune.scheduler_metric=val_ccc_mean", "tune.folds=[1]", "tune.num_samples=1"])
    lines = []
    out = run_sweep(cfg, echo=lines.append)
    trials = pd.read_csv(Path(cfg.tune.dir) / cfg.tune.name / "fold1" / "trials.csv")
    chosen = out["choices"][1]
    assert chosen["val_ccc_arousal"] == pytest.approx(trials["val_ccc_arousal"].max())  # ranked on validation CCC
    assert "test_ccc_mean" in chosen and any("test CCC" in line for line in lines)
    (entry,) = list_entries(cfg.registry.dir)
    assert entry["task"] == "dimensional" and "ccc_mean" in entry["metrics"]


def test_the_loso_table_follows_the_task(tmp_path):
    """`serray finetune` / `pipeline` print the CCC table for dimensional runs (the four-class table
    used to raise KeyError 'ua' on them) and the four-class one, unchanged, for categorical runs."""
    from serray.train.tasks import loso_table
    from serray.train.tasks.dimensional import metric_keys, summarise

    names = ["valence", "arousal", "dominance"]
    folds = [{"fold": k, "n_test": 30, **{key: 0.1 * k for key in metric_keys(names, True)}} for k in (1, 2)]
    dim = load_config(None, [f"output_dir={tmp_path}", "finetune.task=dimensional"])
    mt = load_config(None, [f"output_dir={tmp_path}", "finetune.task=multitask"])
    cat = load_config(None, [f"output_dir={tmp_path}"])
    summary = summarise(folds, metric_keys(names, True))
    text = loso_table(dim, summary, "t")
    assert "| 2 | 30 | 0.200 | 0.200 | 0.200 | 0.200 |" in text and "UA" not in text
    assert "| **mean ± sd** | 60 | 0.150 ± 0.071" in text
    assert "| 1 | 30 | 0.100 | 0.100 | 0.100 | 0.100 | 10.00 |" in loso_table(mt, summary, "t")
    assert "| 1 | 30 | 10.00 | 10.00 | 10.00 |" in loso_table(cat, summary, "t")


@pytest.mark.slow
def test_benchmark_ratings_follow_its_events(tmp_path):
    """The benchmark preset's V/A/D come from its realised local events (oracle file), not the class."""
    from serray.data.corpora.iemocap import build_manifest
    from serray.data.synthetic import benchmark_paths, make_corpus

    root = make_corpus(tmp_path / "IEMOCAP_full_release", seed=0, preset="benchmark", scale=0.1,
                       unlabelled_factor=0.5, processes=1)
    df = build_manifest(root, [1, 2, 3, 4, 5], True).kept.merge(pd.read_csv(benchmark_paths(root).oracle), on="utt_id")
    rate = lambda *ev: sum(df[f"n_{e}"] for e in ev) / df["duration_x"]  # noqa: E731
    assert np.corrcoef(rate("laugh", "risefall") - rate("sigh", "sob"), df["valence"])[0, 1] > 0.5
    assert np.corrcoef(rate("accent", "creak"), df["activation"])[0, 1] > 0.4
    means = df.groupby("label_x")[["valence", "activation"]].mean()
    assert means.loc["hap", "valence"] > means.loc["sad", "valence"] + 1.5
    assert means.loc["ang", "activation"] > means.loc["sad", "activation"] + 1.5
