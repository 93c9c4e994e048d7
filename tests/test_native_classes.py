"""A corpus's own classes end to end, the way a user reaches them: `serray pipeline data.classes=native`
on the built-in corpus in the CREMA-D layout trains, scores, registers and predicts its six classes, and
`serray evaluate` aligns that model's classes with a target's (EmoDB) or refuses what it cannot score."""

from __future__ import annotations

import contextlib
import io
import json

import pandas as pd
import pytest

SIX = ["neu", "hap", "sad", "ang", "fea", "dis"]
SMALL = ["synthetic.dialogs_per_session=2", "synthetic.utterances_per_dialog=8", "finetune.mode=none",
         "finetune.epochs=2", "finetune.attention_dim=16", "finetune.hidden_dim=16", "ray.progress_bars=false",
         "tracking.enabled=false"]


def _run(*args):
    from serray.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = main(list(args))
    return rc, buf.getvalue()


@pytest.fixture(scope="module")
def native_run(ray_session, tmp_path_factory):
    run = tmp_path_factory.mktemp("native") / "run"
    rc, text = _run("pipeline", f"output_dir={run}", "data.corpus=crema-d", "data.classes=native", *SMALL)
    assert rc == 0, text
    return run, text


@pytest.mark.slow
@pytest.mark.ray
def test_a_native_class_run_trains_scores_and_serves_its_six_classes(native_run, tmp_path):
    run, text = native_run
    assert "fea" in text and "dis" in text  # the manifest summary counts the six classes
    manifest = pd.read_parquet(run / "manifest.parquet")
    assert set(manifest.loc[manifest["label"] != "", "label"]) == set(SIX)
    preds = pd.read_csv(run / "finetune" / "predictions.csv")
    assert set(preds["label"]) == set(SIX) and set(preds["pred"]) <= set(SIX)
    assert len(preds) == int((manifest["label"] != "").sum())  # every labelled utterance tested once
    metrics = json.loads((run / "finetune" / "metrics.json").read_text())
    recall = preds.assign(ok=preds["label"] == preds["pred"]).groupby(["fold", "label"])["ok"].mean()
    per_fold_ua = recall.groupby(level="fold").mean()
    assert metrics["mean"]["ua"] == pytest.approx(per_fold_ua.mean())  # UA over six classes, not four
    entry = json.loads(next((run / "registry").glob("*/entry.json")).read_text())
    assert entry["labels"] == SIX and entry["classes"] == "native"
    for fold in range(1, 6):
        sel = json.loads((run / "finetune" / f"fold{fold}" / "fold_result.json").read_text())
        assert set(sel["classes_in_test"]) <= set(SIX)
    # the registered model answers with its own classes
    wav = manifest.loc[manifest["label"] == "fea", "path"].iloc[0]
    rc, out = _run("predict", "--json", wav, f"registry.dir={run / 'registry'}", "data.corpus=crema-d")
    assert rc != 0 and "evaluated with corpus=crema-d" in out and "classes=four" in out  # not compared across class sets
    rc, out = _run("predict", "--json", wav, f"registry.dir={run / 'registry'}", "data.corpus=crema-d",
                   "data.classes=native")
    assert rc == 0, out
    answer = json.loads(out[out.index("["):])
    assert answer[0]["label"] in SIX and sorted(k[2:] for k in answer[0] if k.startswith("p_")) == sorted(SIX)


@pytest.mark.slow
@pytest.mark.ray
def test_evaluate_aligns_the_model_s_classes_with_the_target_s(native_run, tmp_path):
    run, _ = native_run
    target = ["data.corpus=emodb", "synthetic.seed=1", "synthetic.dialogs_per_session=2",
              "synthetic.utterances_per_dialog=8", "ray.progress_bars=false", "tracking.enabled=false"]
    # EmoDB's own classes include boredom, which the CREMA-D model does not predict: refused, with the fix
    rc, text = _run("evaluate", f"registry.dir={run / 'registry'}", f"output_dir={tmp_path / 'native'}",
                    "data.classes=native", *target)
    assert rc != 0 and "does not predict: ['bor']" in text and "data.classes=[neu,hap,sad,ang,fea,dis]" in text
    # the four classes of EmoDB: the model's fea / dis outputs take no part in the argmax
    rc, text = _run("evaluate", f"registry.dir={run / 'registry'}", f"output_dir={tmp_path / 'four'}", *target)
    assert rc == 0, text
    (res,) = (tmp_path / "four" / "evaluate").glob("*/metrics.json")
    metrics = json.loads(res.read_text())
    assert metrics["labels"] == SIX[:4] and metrics["model_labels"] == SIX
    preds = pd.read_csv(res.parent / "predictions.csv")
    assert set(preds["pred"]) <= set(SIX[:4]) and set(preds["label"]) <= set(SIX[:4])
    probs = preds[[f"p_{c}" for c in SIX[:4]]].to_numpy()
    assert (preds["pred"] == [SIX[i] for i in probs.argmax(1)]).all()
