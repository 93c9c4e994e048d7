"""The main job end to end through the CLI (``serray pipeline``) on a tiny corpus, and its rerun.

One module fixture runs the command once (inductive protocol, two folds, extra unlabelled audio in
the pre-training pool), then again: the rerun trains nothing and prints the same table.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

TINY = ["synthetic.utterances_per_dialog=4", "synthetic.dialogs_per_session=2", "pretrain.epochs=2",
        "finetune.epochs=2", "finetune.folds=[1,2]", "adapter.d_model=32", "adapter.ff_dim=64",
        "adapter.num_layers=1", "adapter.num_clusters=4", "finetune.attention_dim=16", "finetune.hidden_dim=16",
        "adapter.ema_decay=0.5", "adapter.ema_decay_end=0.9",  # ~6 steps: a teacher that follows within the run
        "ray.progress_bars=false"]


def _extra_audio(root: Path) -> Path:
    """A LibriSpeech-like tree of unlabelled speech from two outside speakers."""
    rng = np.random.default_rng(0)
    for spk in ("100", "200"):
        d = root / spk / "1"
        d.mkdir(parents=True)
        for i in range(3):
            t = np.arange(int(16000 * 1.2)) / 16000
            sf.write(d / f"{spk}-1-{i:04d}.flac", 0.1 * np.sin(2 * np.pi * (120 + 40 * i) * t)
                     + 0.01 * rng.normal(size=len(t)), 16000)
    return root


@pytest.fixture(scope="module")
def pipeline(ray_session, tmp_path_factory):
    from serray.cli import main

    out = tmp_path_factory.mktemp("pipeline")
    extra = _extra_audio(out / "librispeech")
    args = ["pipeline", f"output_dir={out / 'run'}", *TINY, f"pretrain.extra_audio=[{extra}]"]
    runs = []
    for _ in range(2):
        t0 = time.monotonic()
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = main(args)
        runs.append({"rc": rc, "seconds": time.monotonic() - t0, "stdout": buf.getvalue()})
    return out / "run", runs


def test_pipeline_runs_end_to_end(pipeline, capsys):
    run, runs = pipeline
    assert [r["rc"] for r in runs] == [0, 0]
    metrics = json.loads((run / "finetune" / "metrics.json").read_text())
    assert metrics["protocol"] == "inductive" and [f["fold"] for f in metrics["folds"]] == [1, 2]
    for f in metrics["folds"]:
        assert f["test_evaluations"] == 1 and f["fold"] not in f["pretrain_sessions"]
        assert 0 in f["pretrain_sessions"]  # the extra audio is in every fold's pre-training pool
    for fold in (1, 2):
        pool = json.loads((run / "pretrain" / f"fold{fold}" / "adapter" / "meta.json").read_text())["pool"]
        assert {"extra:100", "extra:200"} <= set(pool["speakers"])
        assert not [s for s in pool["speakers"] if s.startswith(f"Ses0{fold}")]
        history = json.loads((run / "pretrain" / f"fold{fold}" / "history.json").read_text())
        assert history[-1]["teacher_drift"] >= 0.5 * history[-1]["student_drift"] > 0
    entries = [json.loads(p.read_text()) for p in (run / "registry").glob("*/entry.json")]
    assert len(entries) == 1 and entries[0]["protocol"] == "inductive" and entries[0]["folds"] == [1, 2]


def test_rerun_skips_every_stage(pipeline):
    run, runs = pipeline
    assert runs[1]["seconds"] < runs[0]["seconds"] / 2
    assert len(list((run / "registry").glob("*/entry.json"))) == 1  # the same result is not registered twice


def test_the_pipeline_is_tracked_in_the_embedded_store_and_its_rerun_continues_it(pipeline, capsys):
    """With no setup: output_dir/mlflow.db holds one LOSO run (the resolved config as params, the fold
    means and files) with a child run per fold (every epoch, the fold's test scores) and per
    pre-training (every epoch, curves.png, the adapter); the rerun reopened these runs (no new ones),
    and the registry entry names the LOSO run (``serray models show`` prints it)."""
    from mlflow import MlflowClient

    from serray.cli import main

    run, _ = pipeline
    assert (run / "mlflow.db").is_file() and (run / "mlartifacts").is_dir()
    client = MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("serray-pipeline").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert len(runs) == 5 and all(r.info.status == "FINISHED" for r in runs), [r.info.run_name for r in runs]
    loso = next(r for r in runs if r.data.tags["stage"] == "loso")
    metrics = json.loads((run / "finetune" / "metrics.json").read_text())
    assert loso.data.metrics["test_ua"] == pytest.approx(metrics["mean"]["ua"])
    assert loso.data.metrics["test_ua_std"] == pytest.approx(metrics["std"]["ua"])
    assert loso.data.params["finetune.epochs"] == "2" and loso.data.params["output_dir"] == str(run)
    assert {a.path for a in client.list_artifacts(loso.info.run_id)} >= {
        "metrics.json", "results.md", "confusion_matrix.png", "learning_curves.png", "config.yaml"}
    for fold in (1, 2):
        f, p = by_name[f"fold {fold}"], by_name[f"pretrain fold {fold}"]
        assert f.data.tags["mlflow.parentRunId"] == p.data.tags["mlflow.parentRunId"] == loso.info.run_id
        result = next(x for x in metrics["folds"] if x["fold"] == fold)
        assert f.data.metrics["test_ua"] == pytest.approx(result["ua"])
        assert [m.step for m in client.get_metric_history(f.info.run_id, "val_ua")] == [0, 1]
        history = json.loads((run / "pretrain" / f"fold{fold}" / "history.json").read_text())
        logged = client.get_metric_history(p.info.run_id, "teacher_drift")
        assert [(m.step, m.value) for m in logged] == [(h["epoch"], pytest.approx(h["teacher_drift"])) for h in history]
        assert p.data.params["adapter.d_model"] == "32" and p.data.tags["adapter"].endswith(f"fold{fold}/adapter")
        assert {a.path for a in client.list_artifacts(p.info.run_id)} == {"curves.png", "history.csv"}
    (entry,) = [json.loads(p.read_text()) for p in (run / "registry").glob("*/entry.json")]
    assert entry["mlflow_run_id"] == loso.info.run_id
    capsys.readouterr()
    assert main(["models", "show", entry["id"], f"output_dir={run}"]) == 0
    assert f'"mlflow_run_id": "{loso.info.run_id}"' in capsys.readouterr().out


def test_terminal_shows_compact_progress_and_ray_lines_go_to_the_log(pipeline):
    """The terminal shows the stages, one line per epoch (fold, stage, k/n, metrics, time left) and the
    table; Ray's own lines (Tune's experiment boxes, dataset plans) are in output_dir/logs/ray.log."""
    run, runs = pipeline
    out = runs[0]["stdout"]
    assert "[1/3] corpus and manifest" in out and "[3/3] leave-one-session-out, folds [1, 2]" in out
    for fold in (1, 2):
        assert f"[fold {fold}] pre-train epoch 2/2: loss" in out
        assert f"[fold {fold}] fine-tune epoch 2/2: loss" in out and "val UA" in out
    assert "left)" in out and "| **mean ± sd** |" in out
    for noise in ("Configuration for experiment", "View detailed results here", "Reporting training result"):
        assert noise not in out
    log = (run / "logs" / "ray.log").read_text()
    assert "Configuration for experiment" in log  # Tune's box went to the log file


def test_cross_corpus_evaluation_scores_a_registered_model_on_another_layout(pipeline, tmp_path):
    """The IEMOCAP-layout model of the pipeline, scored on a synthetic corpus of other voices
    (``synthetic.seed=1``) written as CREMA-D: the target is featurized with the model's encoder, every
    group is tested (no official split), and the eGeMAPS reference is scored on the same utterances."""
    from serray.cli import main

    run, _ = pipeline
    out = tmp_path / "on-cremad"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["evaluate", f"registry.dir={run / 'registry'}", "data.corpus=crema-d", f"output_dir={out}",
                   "synthetic.seed=1", "synthetic.utterances_per_dialog=4", "synthetic.dialogs_per_session=2",
                   "ray.progress_bars=false"])
    assert rc == 0
    entry = json.loads(next((run / "registry").glob("*/entry.json")).read_text())
    res = out / "evaluate" / entry["id"]
    metrics = json.loads((res / "metrics.json").read_text())
    preds = pd.read_csv(res / "predictions.csv")
    assert metrics["source"]["corpus"] == "iemocap" and metrics["target"]["corpus"] == "crema-d"
    assert metrics["target"]["evaluation"] == "speaker-grouped 5-fold" and metrics["target"]["test_groups"] == [1, 2, 3, 4, 5]
    assert metrics["provenance"]["folds"] == [1, 2, 3, 4, 5] and metrics["provenance"]["manifest"]["sha256"]
    (manifest_path,) = (out / "evaluate").glob("crema-d-*/manifest.parquet")  # the target's own run directory
    manifest = pd.read_parquet(manifest_path)
    assert len(preds) == manifest["label"].isin(["neu", "hap", "sad", "ang"]).sum() == metrics["pooled"]["n_test"]
    recall = preds.assign(ok=preds["label"] == preds["pred"]).groupby("label")["ok"].mean()
    assert metrics["pooled"]["ua"] == pytest.approx(recall.mean())
    assert sum(g["n_test"] for g in metrics["groups"]) == len(preds)
    assert (res / "confusion_matrix.png").stat().st_size > 0 and "confusion" in buf.getvalue()
    ref = metrics["reference"]
    assert ref["features"] == "egemaps" and ref["pooled"]["n_test"] == len(preds) and 0 <= ref["pooled"]["ua"] <= 1


@pytest.mark.slow
def test_official_split_pipeline_on_the_msp_podcast_layout(ray_session, tmp_path):
    """configs/msp-podcast.yaml end to end on the synthetic corpus in the MSP-Podcast layout, with the
    documented Test2 route (``data.sessions=[1,2,3,4]``): epochs chosen on Development (group 2), Test1
    (group 1) and Test2 (group 4) each tested once, and neither test set trained, validated or
    pre-trained on by the other's fold (Test1 was training data for the Test2 fold before)."""
    from serray.cli import main

    out = tmp_path / "msp"
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(["pipeline", "--config", "configs/msp-podcast.yaml", f"output_dir={out}", *TINY[:2],
                   "finetune.epochs=2", "pretrain.epochs=1", "data.sessions=[1,2,3,4]", "finetune.folds=[1,4]",
                   "finetune.attention_dim=16", "finetune.hidden_dim=16", "adapter.d_model=32", "adapter.ff_dim=64",
                   "adapter.num_layers=1", "adapter.num_clusters=4", "ray.progress_bars=false", "tracking.enabled=false"])
    assert rc == 0
    metrics = json.loads((out / "finetune" / "metrics.json").read_text())
    assert metrics["corpus"] == "msp-podcast" and metrics["evaluation"] == "official split"
    assert [f["fold"] for f in metrics["folds"]] == [1, 4]
    manifest = pd.read_parquet(out / "manifest.parquet")
    four = manifest[manifest["label"].isin(["neu", "hap", "sad", "ang"])]
    for fold, other in ((1, 4), (4, 1)):
        selection = json.loads((out / "finetune" / f"fold{fold}" / "selection.json").read_text())
        assert selection["val_sessions"] == [2]
        assert selection["n_train"] == int((four["session"] == 3).sum())  # Train only
        assert selection["pretrain_sessions"] == selection["stats_sessions"] == [2, 3]
        result = next(f for f in metrics["folds"] if f["fold"] == fold)
        assert result["n_test"] == int((four["session"] == fold).sum())
        test = manifest[manifest["session"] == fold]
        assert not set(test["speaker"]) & set(manifest.loc[~manifest["session"].isin([fold, other]), "speaker"])


@pytest.mark.slow
def test_evaluate_refuses_a_target_holding_the_models_training_audio(pipeline, tmp_path):
    """The pipeline's own corpus re-filed as EmoDB (the same audio under other names): the model
    trained on most of it, so a cross-corpus score would be a training score. Refused, one line."""
    from serray.cli import main
    from serray.data.synthetic.layouts import make_layout

    run, _ = pipeline
    root = make_layout(tmp_path / "emodb", "emodb", seed=0, utterances_per_dialog=4, dialogs_per_session=2)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["evaluate", f"registry.dir={run / 'registry'}", "data.corpus=emodb", f"data.root={root}",
                   f"output_dir={tmp_path / 'out'}", "--reference", "none", "ray.progress_bars=false"])
    assert rc == 2
    assert "test files hold audio the model trained or pre-trained on" in err.getvalue() and "Traceback" not in err.getvalue()


def _reencode(src: Path, dst: Path, subtype: str, fmt: str, metadata: bool = False) -> None:
    x, sr = sf.read(src, dtype="float32")
    with sf.SoundFile(dst, "w", sr, 1, subtype=subtype, format=fmt) as f:
        if metadata:
            f.title, f.comment = "a re-tagged copy", "same samples"
        f.write(x)


@pytest.mark.slow
def test_evaluate_compares_decoded_audio_and_never_touches_the_source_run(pipeline, tmp_path, capsys):
    """The unseen-audio check decodes: a FLAC, a float WAV and a re-tagged WAV of training files are
    caught (a size + first-64-KiB hash let them through), while different clips that start with the same
    two seconds of silence pass (that hash refused them). And ``evaluate`` pointed at the source run writes
    only under its evaluate/ folder: the run's manifest and features are as they were."""
    from serray.cli import main

    run, _ = pipeline
    manifest = pd.read_parquet(run / "manifest.parquet")
    trained = manifest[(manifest["session"] == 3) & (manifest["label"] != "")].head(3)  # session 3 trained both folds' models
    tree = tmp_path / "csv"
    tree.mkdir()
    rows = []
    for (i, r), (subtype, fmt, meta) in zip(trained.iterrows(), (("PCM_16", "FLAC", False), ("FLOAT", "WAV", False),
                                                                ("PCM_16", "WAV", True))):
        dst = tree / f"copy{i}.{fmt.lower()}"
        _reencode(Path(r["path"]), dst, subtype, fmt, meta)
        rows.append({"path": dst.name, "label": r["label"], "speaker": f"x{len(rows)}"})
    pd.DataFrame(rows).to_csv(tree / "labels.csv", index=False)
    before = {p: p.read_bytes() for p in [run / "manifest.parquet", *sorted((run / "features").rglob("*.parquet"))]}
    args = ["evaluate", f"output_dir={run}", f"registry.dir={run / 'registry'}", "data.corpus=csv",
            f"data.root={tree / 'labels.csv'}", "data.num_folds=2", "--reference", "none", "ray.progress_bars=false"]
    capsys.readouterr()
    assert main(args) == 2
    assert "3 of the target's 3 test files hold audio the model trained or pre-trained on" in capsys.readouterr().err
    # other clips that start with 2 s of digital silence, of equal size: unseen
    rng = np.random.default_rng(0)
    quiet = tmp_path / "quiet"
    quiet.mkdir()
    rows = []
    for i in range(6):
        x = np.concatenate([np.zeros(32000), 0.1 * rng.normal(size=16000)]).astype(np.float32)
        sf.write(quiet / f"q{i}.wav", x, 16000, subtype="PCM_16")
        rows.append({"path": f"q{i}.wav", "label": ["neu", "hap", "sad"][i % 3], "speaker": f"s{i % 2}"})
    pd.DataFrame(rows).to_csv(quiet / "labels.csv", index=False)
    args[4] = f"data.root={quiet / 'labels.csv'}"
    assert main(args) == 0, capsys.readouterr().err
    assert "no overlap" in capsys.readouterr().out
    after = {p: p.read_bytes() for p in before}
    assert after == before and sorted((run / "features").rglob("*.parquet")) == sorted(p for p in before if p.suffix == ".parquet" and "features" in p.parts)


def test_metrics_and_registry_entry_record_provenance(pipeline):
    """What the run was made from: commit, config, package versions, manifest and feature hashes, seeds, folds."""
    run, _ = pipeline
    metrics = json.loads((run / "finetune" / "metrics.json").read_text())
    entry = json.loads(next((run / "registry").glob("*/entry.json")).read_text())
    for prov in (metrics["provenance"], entry["provenance"]):
        assert {"git", "config", "packages", "manifest", "features", "seed", "folds", "fold_seeds"} <= set(prov)
        assert prov["seed"] == 0 and prov["folds"] == [1, 2] and set(prov["fold_seeds"]) == {"1", "2"}
        assert prov["fold_seeds"]["1"]["pretrain"] != prov["fold_seeds"]["2"]["pretrain"]
        assert prov["config"]["output_dir"] == str(run) and prov["config"]["adapter"]["d_model"] == 32
        assert all(prov["packages"][p] for p in ("serray", "torch", "torchaudio", "ray", "numpy", "pyarrow"))
        assert "commit" in prov["git"] and "dirty" in prov["git"]
        assert len(prov["manifest"]["sha256"]) == 64 and prov["manifest"]["rows"] == len(pd.read_parquet(run / "manifest.parquet"))
        assert prov["features"]["identity"]["encoder"] == "egemaps" and len(prov["features"]["sha256"]) == 64
        assert prov["encoder"] == {"name": "egemaps", "revision": None, "weights_sha256": None}
        # the second run reused both folds: each keeps the code that trained it (here the same)
        assert set(prov["fold_code"]) == {"1", "2"} and prov["folds_other_code"] == []
        assert all(c["git"] == prov["git"] for c in prov["fold_code"].values())


@pytest.fixture(scope="module")
def reproduced(pipeline, tmp_path_factory):
    from serray.cli import main

    run, _ = pipeline
    again = tmp_path_factory.mktemp("reproduced") / "again"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["reproduce", str(run), "--out", str(again)])
    return again, rc, buf.getvalue()


@pytest.mark.slow
def test_reproduce_makes_the_run_again_with_the_same_metrics(pipeline, reproduced):
    run, _ = pipeline
    again, rc, out = reproduced
    assert rc == 0 and "reproduced: every metric agrees" in out
    assert "| fold 1 |" in out and "| fold 2 |" in out and "| mean |" in out
    old = json.loads((run / "finetune" / "metrics.json").read_text())
    new = json.loads((again / "finetune" / "metrics.json").read_text())
    assert [(f["ua"], f["val_ua"]) for f in new["folds"]] == [(f["ua"], f["val_ua"]) for f in old["folds"]]
    for part in ("manifest", "features"):
        assert new["provenance"][part]["sha256"] == old["provenance"][part]["sha256"]
    assert new["provenance"]["config"]["output_dir"] == str(again) and (again / "synthetic").is_dir()


@pytest.mark.slow
def test_reproduce_fails_on_a_metric_that_differs(pipeline, reproduced, tmp_path):
    """A recorded fold UA moved by 3 points: exit 1, that fold marked (the reproduction's stages are done)."""
    import shutil

    from serray.cli import main

    run, _ = pipeline
    again, *_ = reproduced
    copy = tmp_path / "run"
    shutil.copytree(run / "finetune", copy / "finetune")
    metrics = json.loads((copy / "finetune" / "metrics.json").read_text())
    metrics["folds"][1]["ua"] += 0.03
    (copy / "finetune" / "metrics.json").write_text(json.dumps(metrics))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["reproduce", str(copy), "--out", str(again)])
    out = buf.getvalue()
    assert rc == 1 and "NOT reproduced" in out
    assert "**" in next(line for line in out.splitlines() if line.startswith("| fold 2 |"))


def test_a_mistyped_corpus_root_is_an_error_never_a_synthetic_corpus(tmp_path, capsys):
    """A ``data.root`` that does not exist outside ``output_dir/synthetic`` is a clear error naming it; the
    synthetic corpus used to be written there and reported under the corpus's name."""
    from serray.cli import main

    root = tmp_path / "data" / "CREMA-D-typo"
    assert main(["pipeline", f"output_dir={tmp_path / 'run'}", "data.corpus=crema-d", f"data.root={root}"]) != 0
    err = capsys.readouterr().err
    assert f"CREMA-D root not found: {root} (data.root)" in err and not root.exists()
