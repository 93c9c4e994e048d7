"""Fine-tuning pieces that need no Ray: metrics vs scikit-learn, LOSO folds, input statistics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, recall_score

from serray.data.features.featurize import feature_stats
from serray.models.classifier import EmotionClassifier, body_state_from_adapter
from serray.models.adapter import Adapter
from serray.models.wap import FeatureNorm
from serray.train.finetune import split_fold
from serray.train.metrics import classification_metrics
from serray.train.tasks.categorical import markdown_table, summarise


@pytest.mark.parametrize("seed", range(5))
def test_metrics_equal_sklearn_on_random_labels(seed):
    rng = np.random.default_rng(seed)
    y, p = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    m = classification_metrics(y, p)
    assert m["ua"] == pytest.approx(recall_score(y, p, average="macro"))
    assert m["wa"] == pytest.approx(accuracy_score(y, p))
    assert m["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))
    # UA is the mean per-class recall, computed by hand too
    assert m["ua"] == pytest.approx(np.mean([(p[y == c] == c).mean() for c in range(4)]))


def test_metrics_when_the_test_session_lacks_a_class():
    """Documented: UA and macro-F1 average over the classes present in the test labels."""
    y = np.array([0, 0, 1, 1, 2, 2])  # no class 3 (angry)
    p = np.array([0, 3, 1, 1, 2, 0])
    m = classification_metrics(y, p)
    assert all(np.isfinite(v) for v in m.values())
    assert m["ua"] == pytest.approx(np.mean([0.5, 1.0, 0.5]))
    assert m["macro_f1"] == pytest.approx(f1_score(y, p, labels=[0, 1, 2], average="macro"))
    assert m["wa"] == pytest.approx(4 / 6)


def _rows(n_per_speaker=12, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(1, 6):
        for g in "FM":
            for i in range(n_per_speaker):
                rows.append({"utt_id": f"Ses0{s}{g}_impro01_{g}{i:03d}", "speaker": f"Ses0{s}_{g}", "session": s,
                             "label": ["neu", "hap", "sad", "ang"][rng.integers(0, 4)]})
    return pd.DataFrame(rows)


def test_folds_have_no_speaker_leakage_and_test_every_utterance_once():
    rows = _rows()
    tested = []
    for fold in range(1, 6):
        sp = split_fold(rows, fold, 0.15, seed=0)
        assert set(sp["test"]["session"]) == {fold}
        test_speakers = set(sp["test"]["speaker"])
        assert test_speakers == {f"Ses0{fold}_F", f"Ses0{fold}_M"}
        assert not test_speakers & (set(sp["train"]["speaker"]) | set(sp["val"]["speaker"]))
        assert not set(sp["train"]["utt_id"]) & set(sp["val"]["utt_id"])
        assert len(sp["train"]) + len(sp["val"]) + len(sp["test"]) == len(rows)
        assert len(sp["val"]) == pytest.approx(0.15 * (len(rows) - len(sp["test"])), abs=1)
        tested += list(sp["test"]["utt_id"])
    assert sorted(tested) == sorted(rows["utt_id"])  # every utterance exactly once as test


def test_leaking_speaker_is_caught():
    rows = _rows()
    rows.loc[rows.index[0], "speaker"] = "Ses02_F"  # a session-1 row claims a session-2 speaker
    with pytest.raises(AssertionError, match="speaker"):
        split_fold(rows, 2, 0.15, seed=0)


def test_summary_mean_std_and_table():
    folds = [{"fold": i, "test_session": i, "ua": u, "wa": w, "macro_f1": f, "n_test": 10}
             for i, (u, w, f) in enumerate([(0.5, 0.6, 0.4), (0.7, 0.8, 0.6)], start=1)]
    s = summarise(folds)
    assert s["mean"] == pytest.approx({"ua": 0.6, "wa": 0.7, "macro_f1": 0.5})
    assert s["std"]["ua"] == pytest.approx(np.std([0.5, 0.7], ddof=1))  # sample sd, as the ablation's
    table = markdown_table(s)
    assert "60.00 ± 14.14" in table and table.count("\n") == 7 and "sample standard deviation" in table


def test_feature_stats_combine_sessions_exactly():
    rng = np.random.default_rng(0)
    frames = {s: rng.normal(s, s, size=(50 * s, 3)) for s in (1, 2, 3)}
    meta = {"stats": {str(s): {"frames": len(x), "sum": [x.sum(0).tolist()], "sumsq": [(x * x).sum(0).tolist()]}
                      for s, x in frames.items()}}
    mean, std = feature_stats(meta, [1, 3])
    both = np.concatenate([frames[1], frames[3]])
    assert mean.shape == (1, 3)
    np.testing.assert_allclose(mean[0], both.mean(0), rtol=1e-5)
    np.testing.assert_allclose(std[0], both.std(0), rtol=1e-4)
    with pytest.raises(Exception, match="statistics"):
        feature_stats(meta, [4])


def test_feature_norm_standardises_and_travels_in_the_state_dict():
    x = torch.randn(2, 7, 5) * 3 + 2
    norm = FeatureNorm(5)
    assert torch.equal(norm(x), x)  # identity until statistics are set
    norm.set_stats(x.reshape(-1, 5).mean(0), x.reshape(-1, 5).std(0, unbiased=False))
    y = norm(x).reshape(-1, 5)
    assert torch.allclose(y.mean(0), torch.zeros(5), atol=1e-5)
    assert torch.allclose(y.std(0, unbiased=False), torch.ones(5), atol=1e-4)
    # the classifier built from a pre-trained adapter branch gets the adapter's statistics
    ad = Adapter(input_dim=5, d_model=8, num_layers=1, num_heads=2, ff_dim=16, num_clusters=4)
    ad.set_feature_stats(np.full((1, 5), 2.0), np.full((1, 5), 3.0))
    clf = EmotionClassifier(5, 4, body=dict(input_dim=5, d_model=8, num_layers=1, num_heads=2, ff_dim=16),
                            attention_dim=4, hidden_dim=8)
    clf.body.load_state_dict(body_state_from_adapter(ad.state_dict(), "teacher"))
    assert torch.equal(clf.body.input_norm.mean, torch.full((1, 5), 2.0))
    assert torch.equal(clf.state_dict()["body.input_norm.std"], torch.full((1, 5), 3.0))


# ---------------------------------------------------------------- validation splits and the leakage audit


@pytest.mark.parametrize("how", ["speaker", "dialog"])
def test_grouped_validation_split_holds_out_whole_groups(how):
    rows = _rows()
    rows["dialog"] = rows["utt_id"].str.rsplit("_", n=1).str[0]
    for fold in (1, 3):
        sp = split_fold(rows, fold, 0.15, seed=0, val_split=how)
        key = "speaker" if how == "speaker" else "dialog"
        assert len(sp["val"]) > 0
        assert not set(sp["val"][key]) & set(sp["train"][key])  # a held-out group is wholly held out
        assert not set(sp["test"]["speaker"]) & (set(sp["train"]["speaker"]) | set(sp["val"]["speaker"]))
        assert len(sp["train"]) + len(sp["val"]) + len(sp["test"]) == len(rows)
    n_speakers = rows[rows["speaker"].str.slice(3, 5) != "01"]["speaker"].nunique()
    sp = split_fold(rows, 1, 0.15, seed=0, val_split="speaker")
    assert sp["val"]["speaker"].nunique() == max(1, round(0.15 * n_speakers))


def test_audit_aborts_on_test_speakers_in_pretraining_under_the_inductive_protocol():
    from serray.train.finetune import audit_fold

    rows = _rows()
    sp = split_fold(rows, 2, 0.15, seed=0, val_split="speaker")
    clean = {"sessions": [1, 3, 4, 5], "speakers": sorted(set(sp["train"]["speaker"]) | set(sp["val"]["speaker"]))}
    audit = audit_fold(2, sp, clean, [1, 3, 4, 5], "inductive")
    assert audit["pretrain_sessions"] == [1, 3, 4, 5] and audit["transductive_exposure"] == []
    leaky = {"sessions": [1, 2, 3, 4, 5], "speakers": clean["speakers"] + ["Ses02_F"]}
    with pytest.raises(AssertionError, match="leakage audit failed for fold 2.*pre-training pool"):
        audit_fold(2, sp, leaky, [1, 3, 4, 5], "inductive")
    with pytest.raises(AssertionError, match="normalisation statistics"):
        audit_fold(2, sp, clean, [1, 2, 3, 4, 5], "inductive")
    # the transductive protocol records the exposure instead of aborting ...
    audit = audit_fold(2, sp, leaky, [1, 2, 3, 4, 5], "transductive")
    assert len(audit["transductive_exposure"]) == 2
    # ... but a test speaker in fine-tuning data is fatal under any protocol
    bad = dict(sp, train=pd.concat([sp["train"], sp["test"].iloc[:1]]))
    with pytest.raises(AssertionError, match="test-session speakers/utterances in train"):
        audit_fold(2, bad, clean, [1, 3, 4, 5], "transductive")


@pytest.mark.parametrize("fraction", [0.1, 0.25, 1.0])
def test_label_fractions_keep_every_class(fraction):
    from serray.train.finetune import subsample_labels

    rows = _rows()
    sub = subsample_labels(rows, fraction, seed=3)
    assert set(sub["label"]) == set(rows["label"])
    for label, n in rows["label"].value_counts().items():
        assert (sub["label"] == label).sum() == max(1, int(np.floor(fraction * n + 0.5)))
    assert sub.equals(subsample_labels(rows, fraction, seed=3))


def test_the_ablation_main_arm_reuses_the_pipeline_folds():
    """The full arm of the configured seed at fraction 1 shares `serray pipeline`'s fold directories; it
    registers nothing, and that must not make its stored folds look like another config's (CI once
    retrained them on a rerun)."""
    from serray.config import load_config
    from serray.train.ablation import arm_config
    from serray.train.finetune import finetune_hash

    cfg = load_config(None, ["output_dir=/tmp/serray-hash"])
    main = arm_config(cfg, "full", cfg.finetune.mode, 1.0, cfg.seed)
    assert main.finetune.dir == cfg.finetune.dir and main.finetune.register is False
    assert finetune_hash(main) == finetune_hash(cfg)
    for other in (arm_config(cfg, "full", cfg.finetune.mode, 0.5, cfg.seed),
                  arm_config(cfg, "full", cfg.finetune.mode, 1.0, cfg.seed + 1),
                  arm_config(cfg, "random_init", cfg.finetune.mode, 1.0, cfg.seed)):
        assert finetune_hash(other) != finetune_hash(cfg)
