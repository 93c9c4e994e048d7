"""Epoch selection that is not one speaker's noise: the smoothed, later-on-ties validation score, the
class-balanced loss, and the epoch count chosen by inner cross-validation over the training groups with
the final model trained on every training speaker."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from serray.config import load_config
from serray.train.tasks.categorical import SELECTION_KEY, FinetuneTask, class_balanced_nll

SHORT = ["finetune.epochs=3", "finetune.attention_dim=16", "finetune.hidden_dim=16", "tracking.enabled=false"]


def _task(**config):
    base = {"class_weights": None, "seed": 0, "select_metric": "val_ua"}
    return FinetuneTask({**base, **config})


def test_ties_go_to_the_later_epoch_and_the_window_smooths():
    task = _task()
    hist = [{"epoch": e, "val_ua": v} for e, v in enumerate([0.5, 0.8, 0.8, 0.6])]
    scores = [task.score_epoch(hist[: i + 1])[SELECTION_KEY] for i in range(len(hist))]
    assert max(range(4), key=lambda i: scores[i]) == 2  # epochs 1 and 2 tie on UA: the later one
    smooth = _task(select_smooth=3)
    s = [smooth.score_epoch(hist[: i + 1]) for i in range(len(hist))]
    assert [round(x["val_smoothed"], 6) for x in s] == [0.5, 0.65, 0.7, round((0.8 + 0.8 + 0.6) / 3, 6)]
    assert max(range(4), key=lambda i: s[i][SELECTION_KEY]) == 3  # (0.8, 0.8, 0.6) beats (0.5, 0.8, 0.8)


def test_class_balanced_nll_weighs_classes_equally():
    logits = torch.log(torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.5, 0.5]]))
    labels = torch.tensor([0, 0, 0, 1])
    plain = float(torch.nn.functional.cross_entropy(logits, labels))
    balanced = class_balanced_nll(logits, labels)
    assert balanced == pytest.approx((-np.log(0.9) + -np.log(0.5)) / 2)
    assert plain == pytest.approx((3 * -np.log(0.9) + -np.log(0.5)) / 4) and balanced > plain


def test_inner_cv_needs_two_training_groups_and_no_patience():
    from serray.errors import ConfigError

    with pytest.raises(ConfigError, match="exclude each other"):
        load_config(None, ["finetune.epoch_selection=inner_cv", "finetune.patience=2"])
    with pytest.raises(ConfigError, match="at least 2 training groups"):
        load_config(None, ["finetune.epoch_selection=inner_cv", "data.sessions=[1,2]", "finetune.folds=[1]",
                           "pretrain.sessions=[1,2]"])
    with pytest.raises(ConfigError, match="epoch_selection must be val or inner_cv"):
        load_config(None, ["finetune.epoch_selection=cv"])


def test_inner_cv_lrs_need_inner_cv_and_positive_rates_and_leave_other_hashes_alone():
    from serray.errors import ConfigError
    from serray.train.finetune import finetune_hash

    with pytest.raises(ConfigError, match="set finetune.epoch_selection=inner_cv"):
        load_config(None, ["finetune.inner_cv_lrs=[0.001,0.003]"])
    with pytest.raises(ConfigError, match="positive learning rates"):
        load_config(None, ["finetune.epoch_selection=inner_cv", "finetune.inner_cv_lrs=[0.001,-1]"])
    plain = load_config(None, ["output_dir=/tmp/x"])
    inner = load_config(None, ["output_dir=/tmp/x", "finetune.epoch_selection=inner_cv"])
    lrs = load_config(None, ["output_dir=/tmp/x", "finetune.epoch_selection=inner_cv", "finetune.inner_cv_lrs=[0.001,0.003]"])
    # the hashes of 212b8a8, before the key existed: runs made then are reused, not retrained
    assert (finetune_hash(plain), finetune_hash(inner)) == ("1732331238f3f07b", "89a974ab47658af2")
    assert finetune_hash(lrs) != finetune_hash(inner)


@pytest.mark.ray
def test_inner_cv_chooses_the_epoch_count_on_the_training_groups_and_trains_on_all_of_them(featurized, tmp_path):
    """Fold 1 under inner_cv: four inner fits (sessions 2-5 each held out once), the mean curve's best
    epoch (ties: later), then one model on every labelled utterance of sessions 2-5 that stops there;
    session 1 is in no inner fit; the reported validation UA is the inner estimate at that epoch."""
    from serray.train.finetune import fold_split, run_fold
    from serray.train.folds import labelled_rows

    cfg = load_config(None, [f"output_dir={tmp_path}", f"data.root={featurized.data.root}", "encoder.name=fbank", "ray.progress_bars=false",
                             f"features.dir={featurized.features.dir}", f"data.manifest={featurized.data.manifest}",
                             "finetune.mode=none", "finetune.epoch_selection=inner_cv", *SHORT])
    res = run_fold(cfg, 1)
    sel = json.loads((Path(cfg.finetune.dir) / "fold1" / "selection.json").read_text())
    inner = sel["inner_cv"]
    assert sel["epoch_selection"] == "inner_cv" and inner["groups"] == [2, 3, 4, 5]
    curve = inner["curve"]["val_ua"]
    per = np.array([inner["per_group"][str(g)] for g in (2, 3, 4, 5)])
    np.testing.assert_allclose(curve, per.mean(0), rtol=1e-9)
    best = max(range(len(curve)), key=lambda e: (curve[e], e))
    assert sel["best_epoch"] == res["best_epoch"] == best and sel["epochs_run"] == best + 1
    assert sel["val_ua"] == pytest.approx(curve[best])
    rows = labelled_rows(cfg)
    train = rows[rows["session"] != 1]
    assert sel["n_train"] == len(train) == sel["n_val"] and sel["val_sessions"] == [2, 3, 4, 5]
    split = fold_split(cfg, 1)
    assert split["val"].empty and sorted(split["train"]["utt_id"]) == sorted(train["utt_id"])
    assert 1 not in sel["val_sessions"] and res["test_evaluations"] == 1
    assert res["n_test"] == int((rows["session"] == 1).sum())


@pytest.mark.ray
def test_inner_cv_chooses_the_learning_rate_with_the_epoch_count(featurized, tmp_path):
    """With two candidate rates every inner fold trains once per rate (same splits, same seeds); the
    (rate, epoch) with the best mean curve is taken, and the final model trains at that rate."""
    from serray.train.finetune import run_fold

    lrs = [1e-4, 3e-2]
    cfg = load_config(None, [f"output_dir={tmp_path}", f"data.root={featurized.data.root}", "encoder.name=fbank", "ray.progress_bars=false",
                             f"features.dir={featurized.features.dir}", f"data.manifest={featurized.data.manifest}",
                             "finetune.mode=none", "finetune.epoch_selection=inner_cv", f"finetune.inner_cv_lrs=[{lrs[0]},{lrs[1]}]",
                             "data.sessions=[1,2,3]", "finetune.folds=[1]", "pretrain.sessions=[1,2,3]", *SHORT])
    res = run_fold(cfg, 1)
    inner = json.loads((Path(cfg.finetune.dir) / "fold1" / "selection.json").read_text())["inner_cv"]
    curves = {float(k): v for k, v in inner["lr_curves"].items()}
    assert sorted(curves) == lrs and curves[lrs[0]] != curves[lrs[1]]  # the two rates really trained apart
    best = max(((lr, e) for lr, c in curves.items() for e in range(len(c))), key=lambda p: (curves[p[0]][p[1]], p[1], -p[0]))
    assert (inner["lr"], res["best_epoch"]) == best and inner["curve"]["val_ua"] == curves[best[0]]
    # the final model trained at the chosen rate (its epochs' mean scheduled rate, 300x apart between the two)
    peak = max(h["lr"] for h in res["history"])
    assert res["lr"] == best[0] and best[0] / 10 < peak <= best[0] * (1 + 1e-9)
