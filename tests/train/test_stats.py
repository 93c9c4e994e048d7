"""Tests of serray.train.stats: per-run metrics, summaries, paired bootstrap, Wilcoxon, label subsampling."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from serray.data.corpora.base import LABELS
from serray.train import stats
from serray.train.metrics import classification_metrics


def make_preds(acc, seeds=(0, 1, 2), folds=(1, 2, 3, 4, 5), n=40, seed=0, truth_seed=123):
    """A predictions frame: fixed true labels per fold (from truth_seed), per-utterance accuracy ``acc``."""
    rng = np.random.default_rng(seed)
    truth = np.random.default_rng(truth_seed)
    rows = []
    for f in folds:
        y = truth.integers(0, 4, n)
        y[:4] = np.arange(4)  # every class present
        for s in seeds:
            ok = rng.random(n) < acc
            p = np.where(ok, y, (y + rng.integers(1, 4, n)) % 4)
            rows += [(s, f, f"f{f}_u{i:03d}", LABELS[y[i]], LABELS[p[i]]) for i in range(n)]
    return pd.DataFrame(rows, columns=["seed", "fold", "utt_id", "label", "pred"])


def direct_mean(preds, metric):
    """The mean over (seed, fold) of sklearn's metric, straight from the predictions frame."""
    idx = {c: i for i, c in enumerate(LABELS)}
    vals = [classification_metrics(g["label"].map(idx).to_numpy(), g["pred"].map(idx).to_numpy())[metric]
            for _, g in preds.groupby(["seed", "fold"])]
    return float(np.mean(vals))


# ------------------------------------------------------------------------------------ run_metrics


def test_run_metrics_hand_computed_values():
    df = pd.DataFrame({
        "seed": [1, 1, 1, 1, 0, 0, 0],
        "fold": [2, 2, 2, 2, 2, 2, 2],
        "utt_id": ["a", "b", "c", "d", "a", "b", "c"],
        "label": ["neu", "neu", "hap", "sad", "neu", "neu", "hap"],
        "pred": ["neu", "hap", "hap", "sad", "ang", "neu", "neu"],
    })
    runs = stats.run_metrics(df)
    assert [(r["seed"], r["fold"], r["n_test"]) for r in runs] == [(0, 2, 3), (1, 2, 4)]
    r0, r1 = runs
    # seed 0: neu recall 1/2, hap recall 0/1 -> UA 0.25; WA 1/3;
    # F1 neu = 2 TP / (n_true + n_pred) = 2/(2+2) = 1/2, hap 0 -> macro 1/4 (ang, absent from y_true, left out)
    assert r0["ua"] == pytest.approx(0.25)
    assert r0["wa"] == pytest.approx(1 / 3)
    assert r0["macro_f1"] == pytest.approx(0.25)
    # seed 1: recalls neu 1/2, hap 1, sad 1 -> UA 5/6; WA 3/4
    assert r1["ua"] == pytest.approx(5 / 6)
    assert r1["wa"] == pytest.approx(0.75)
    # F1: neu 2*1/(2+1)=2/3, hap 2*1/(1+2)=2/3, sad 1 -> 7/9
    assert r1["macro_f1"] == pytest.approx(7 / 9)
    assert all(type(r["seed"]) is int and type(r["fold"]) is int and type(r["ua"]) is float for r in runs)
    json.dumps(runs, allow_nan=False)


def test_run_metrics_sorted_by_seed_then_fold():
    df = make_preds(0.7, seeds=(2, 0, 1), folds=(3, 1, 2), n=12)
    keys = [(r["seed"], r["fold"]) for r in stats.run_metrics(df)]
    assert keys == sorted(keys) and len(keys) == 9


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.drop(columns=["pred"]), "missing column"),
    (lambda d: d.assign(pred=d["pred"].where(d.index != 3, "exc")), "unknown class"),
    (lambda d: pd.concat([d, d.iloc[[0]]]), "duplicate"),
    (lambda d: d.iloc[:0], "no rows"),
])
def test_run_metrics_rejects_malformed_frames(mutate, match):
    with pytest.raises(ValueError, match=match):
        stats.run_metrics(mutate(make_preds(0.7, n=8)))


# --------------------------------------------------------------------------------- summarise_runs


def test_summarise_runs_known_values():
    runs = [{"ua": 0.5}, {"ua": 0.6}, {"ua": 0.7}]
    s = stats.summarise_runs(runs, "ua")
    assert s["mean"] == pytest.approx(0.6)
    assert s["sd"] == pytest.approx(0.1)
    half = 4.302652729749464 * 0.1 / math.sqrt(3)  # t(0.975, df=2)
    assert s["ci95"] == pytest.approx([0.6 - half, 0.6 + half])
    json.dumps(s, allow_nan=False)


def test_summarise_runs_one_and_zero_runs():
    assert stats.summarise_runs([{"wa": 0.4}], "wa") == {"mean": 0.4, "sd": 0.0, "ci95": [None, None]}
    assert stats.summarise_runs([], "wa") == {"mean": None, "sd": None, "ci95": [None, None]}
    with pytest.raises(ValueError, match="unknown metric"):
        stats.summarise_runs([{"ua": 0.4}], "acc")


# ------------------------------------------------------------------------------------ fast metric


@pytest.mark.filterwarnings("ignore::UserWarning")  # sklearn: y_pred has classes absent from y_true
@pytest.mark.parametrize("seed", range(60))
def test_fast_metrics_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    n_cls = int(rng.integers(1, 5))  # classes present in y_true may be fewer than 4
    y = rng.choice(rng.permutation(4)[:n_cls], size=n)
    p = rng.integers(0, 4, size=(3, n))
    fast = stats.fast_metrics(y, p)
    for s in range(3):
        ref = classification_metrics(y, p[s])
        for m in stats.METRICS:
            assert fast[m][0, s] == pytest.approx(ref[m], abs=1e-12), (m, s)
    # weighted (bootstrap counts) == sklearn on the explicitly repeated utterances
    w = rng.integers(0, 3, size=(4, n)).astype(float)
    w[:, 0] += 1  # never empty
    fast_w = stats.fast_metrics(y, p, weights=w)
    for b in range(4):
        idx = np.repeat(np.arange(n), w[b].astype(int))
        for s in range(3):
            ref = classification_metrics(y[idx], p[s][idx])
            for m in stats.METRICS:
                assert fast_w[m][b, s] == pytest.approx(ref[m], abs=1e-12), (m, b, s)


def test_stratified_weights_keep_class_sizes():
    y = np.array([0, 0, 0, 1, 2, 2, 3, 3, 3, 3])
    w = stats._stratified_weights(y, 500, np.random.default_rng(0))
    for c in range(4):
        assert np.all(w[:, y == c].sum(axis=1) == (y == c).sum())
    assert np.all(w[:, 3] == 1)  # a single-utterance class is always drawn once
    assert w[:, 0].std() > 0  # and the others really are resampled


# ----------------------------------------------------------------------------- paired bootstrap


@pytest.mark.parametrize("metric", stats.METRICS)
def test_bootstrap_delta_is_the_exact_difference(metric):
    a, b = make_preds(0.7, seed=1), make_preds(0.6, seed=2)
    res = stats.paired_bootstrap(a, b, metric=metric, n_boot=200)
    runs_a, runs_b = stats.run_metrics(a), stats.run_metrics(b)
    assert res["delta"] == np.mean([r[metric] for r in runs_a]) - np.mean([r[metric] for r in runs_b])
    assert res["delta"] == pytest.approx(direct_mean(a, metric) - direct_mean(b, metric), abs=1e-12)
    assert res["n_runs"] == 15 and res["n_boot"] == 200
    assert res["test"] == "paired bootstrap over test utterances"
    assert res["ci95"][0] <= res["ci95"][1]
    json.dumps(res, allow_nan=False)


def test_bootstrap_identical_arms():
    a = make_preds(0.6, seed=3)
    res = stats.paired_bootstrap(a, a.sample(frac=1.0, random_state=0), n_boot=300)  # row order is irrelevant
    assert res["delta"] == 0.0
    assert res["ci95"] == [0.0, 0.0]
    assert res["p_value"] == 1.0


def test_bootstrap_clearly_better_arm():
    b = make_preds(0.5, seed=4)
    a = make_preds(0.75, seed=5)
    res = stats.paired_bootstrap(a, b, n_boot=1000)
    assert res["delta"] > 0.15
    assert res["ci95"][0] > 0
    assert res["p_value"] < 0.01
    rev = stats.paired_bootstrap(b, a, n_boot=1000)
    # the same resamples with the arms swapped: every replicate delta flips sign
    assert rev["delta"] == pytest.approx(-res["delta"], abs=1e-12)
    assert rev["ci95"] == pytest.approx([-res["ci95"][1], -res["ci95"][0]], abs=1e-12)
    assert rev["p_value"] == pytest.approx(res["p_value"])


def test_bootstrap_is_paired():
    """B = A except B is wrong on a few utterances A gets right: with the same resampled ids for both
    arms (and all seeds) no replicate can favour B, so the interval never goes below 0; an unpaired
    resampling of this small difference would."""
    a = make_preds(0.6, seed=6)
    b = a.copy()
    rng = np.random.default_rng(0)
    right = np.flatnonzero((a["label"] == a["pred"]).to_numpy())
    flip = rng.choice(right, size=12, replace=False)
    lab = b.loc[b.index[flip], "label"].map(LABELS.index)
    b.loc[b.index[flip], "pred"] = [LABELS[(i + 1) % 4] for i in lab]
    res = stats.paired_bootstrap(a, b, n_boot=1000)
    assert res["delta"] > 0
    assert res["ci95"][0] >= 0.0
    assert res["p_value"] == pytest.approx(2 / 1001)  # no replicate with d <= 0: (0 + 1) / (n_boot + 1), doubled


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bootstrap_matches_a_slow_reference():
    """The vectorised replicates equal an explicit resample-and-sklearn loop over the same draws."""
    kw = dict(seeds=(0, 1), folds=(1, 2), n=25)
    a, b = make_preds(0.65, seed=7, **kw), make_preds(0.55, seed=8, **kw)
    n_boot, seed = 40, 11
    res = stats.paired_bootstrap(a, b, metric="macro_f1", n_boot=n_boot, seed=seed)
    rng = np.random.default_rng(seed)
    idx = {c: i for i, c in enumerate(LABELS)}
    d = np.zeros(n_boot)
    n_runs = 0
    for fold in sorted(a["fold"].unique()):
        fa = a[a["fold"] == fold].sort_values(["seed", "utt_id"])
        fb = b[b["fold"] == fold].sort_values(["seed", "utt_id"])
        seeds = sorted(fa["seed"].unique())
        y = fa[fa["seed"] == seeds[0]]["label"].map(idx).to_numpy()
        w = stats._stratified_weights(y, n_boot, rng)
        for s in seeds:
            pa = fa[fa["seed"] == s]["pred"].map(idx).to_numpy()
            pb = fb[fb["seed"] == s]["pred"].map(idx).to_numpy()
            n_runs += 1
            for r in range(n_boot):
                take = np.repeat(np.arange(len(y)), w[r].astype(int))
                d[r] += (classification_metrics(y[take], pa[take])["macro_f1"]
                         - classification_metrics(y[take], pb[take])["macro_f1"])
    d /= n_runs
    assert res["ci95"] == pytest.approx(list(np.percentile(d, [2.5, 97.5])), abs=1e-12)
    p = min(1.0, 2 * min((np.sum(d <= 0) + 1) / (n_boot + 1), (np.sum(d >= 0) + 1) / (n_boot + 1)))
    assert res["p_value"] == pytest.approx(p)


def test_bootstrap_deterministic_given_seed():
    a, b = make_preds(0.65, seed=9), make_preds(0.6, seed=10)
    r1 = stats.paired_bootstrap(a, b, n_boot=300, seed=3)
    r2 = stats.paired_bootstrap(a, b, n_boot=300, seed=3)
    r3 = stats.paired_bootstrap(a, b, n_boot=300, seed=4)
    assert r1 == r2
    assert r1["ci95"] != r3["ci95"] and r1["delta"] == r3["delta"]


def test_bootstrap_mismatches_raise():
    a = make_preds(0.6, n=10, seed=1)
    b = make_preds(0.6, n=10, seed=2)
    with pytest.raises(ValueError, match="same \\(seed, fold, utt_id\\) set"):
        stats.paired_bootstrap(a, b.iloc[1:], n_boot=10)
    with pytest.raises(ValueError, match="same \\(seed, fold, utt_id\\) set"):
        stats.paired_bootstrap(a, b.assign(utt_id=b["utt_id"].str.replace("u001", "x001")), n_boot=10)
    with pytest.raises(ValueError, match="same \\(seed, fold, utt_id\\) set"):
        stats.paired_bootstrap(a, b[b["seed"] != 2], n_boot=10)
    other = b.copy()
    other.loc[other.index[5], "label"] = "ang" if other.loc[other.index[5], "label"] != "ang" else "neu"
    with pytest.raises(ValueError, match="true labels differ"):
        stats.paired_bootstrap(a, other, n_boot=10)
    # both arms miss the same utterance of one seed: that seed was tested on other utterances
    with pytest.raises(ValueError, match="same utterances"):
        stats.paired_bootstrap(a.iloc[1:], b.iloc[1:], n_boot=10)
    # one utterance labelled differently in two seeds (in both arms)
    relabel = lambda d: d.assign(label=np.where((d["seed"] == 1) & (d["utt_id"] == "f1_u000"), "ang", d["label"]))
    with pytest.raises(ValueError, match="different true labels in different seeds"):
        stats.paired_bootstrap(relabel(a), relabel(b), n_boot=10)
    with pytest.raises(ValueError, match="n_boot"):
        stats.paired_bootstrap(a, b, n_boot=0)
    with pytest.raises(ValueError, match="unknown metric"):
        stats.paired_bootstrap(a, b, metric="auc")


def test_bootstrap_runs_fast():
    """15 runs x 130 utterances x 2000 replicates (the brief's budget: well under a few seconds)."""
    a = make_preds(0.65, n=130, seed=12)
    b = make_preds(0.6, n=130, seed=13)
    t0 = time.process_time()  # CPU time of this process: robust to other load on a shared machine
    res = stats.paired_bootstrap(a, b, n_boot=2000)
    elapsed = time.process_time() - t0
    assert res["n_runs"] == 15
    assert elapsed < 5.0, elapsed


# ------------------------------------------------------------------------------------- Wilcoxon


def _runs(values, seeds=(0, 1), folds=(1, 2, 3)):
    keys = [(s, f) for s in seeds for f in folds]
    return [{"seed": s, "fold": f, "ua": v} for (s, f), v in zip(keys, values)]


def test_wilcoxon_known_exact_value():
    b = [0.50, 0.52, 0.48, 0.55, 0.60]
    a = [x + d for x, d in zip(b, [0.01, 0.02, 0.03, 0.04, 0.05])]
    res = stats.wilcoxon_runs(_runs(a, seeds=(0,), folds=(1, 2, 3, 4, 5)), _runs(b, seeds=(0,), folds=(1, 2, 3, 4, 5)))
    assert res["p_value"] == pytest.approx(2 / 32)  # all 5 differences positive: exact two-sided p = 2 / 2^5
    assert res["delta"] == pytest.approx(0.03)
    assert res["n"] == 5 and res["test"] == "Wilcoxon signed-rank over seed x fold"


def test_wilcoxon_matches_scipy_and_pairs_by_key():
    rng = np.random.default_rng(0)
    a, b = rng.random(6), rng.random(6)
    runs_a, runs_b = _runs(a), _runs(b)
    res = stats.wilcoxon_runs(runs_a, list(reversed(runs_b)))  # pairing by (seed, fold), not by position
    assert res["p_value"] == pytest.approx(sps.wilcoxon(a, b).pvalue)
    assert res["delta"] == pytest.approx(float(np.mean(a - b)))


def test_wilcoxon_all_zero_differences_and_mismatch():
    runs = _runs([0.5, 0.6, 0.7, 0.4, 0.3, 0.2])
    assert stats.wilcoxon_runs(runs, runs) == {"delta": 0.0, "p_value": 1.0,
                                              "test": "Wilcoxon signed-rank over seed x fold", "n": 6}
    with pytest.raises(ValueError, match="different \\(seed, fold\\) runs"):
        stats.wilcoxon_runs(runs, runs[1:])


# -------------------------------------------------------------------------------------- compare


def test_compare_is_run_level_first_with_the_utterance_bootstrap_and_wilcoxon_beside():
    a, b = make_preds(0.7, seed=14), make_preds(0.55, seed=15)
    res = stats.compare(a, b, "full", "random_init", "finetune", 0.1, n_boot=300, seed=2)
    primary = stats.run_level_test(a, b, n_boot=300, seed=2)
    boot = stats.paired_bootstrap(a, b, n_boot=300, seed=2)
    wil = stats.wilcoxon_runs(stats.run_metrics(a), stats.run_metrics(b))
    assert {k: res[k] for k in ("a", "b", "mode", "label_fraction", "metric")} == {
        "a": "full", "b": "random_init", "mode": "finetune", "label_fraction": 0.1, "metric": "ua"}
    for k in ("delta", "ci95", "p_value", "test", "n_boot", "n_runs", "wins", "losses"):
        assert res[k] == primary[k]
    assert res["test"] == stats.RUN_LEVEL_TEST
    assert (res["utterance_ci95"], res["utterance_p"]) == (boot["ci95"], boot["p_value"])
    assert res["wilcoxon_p"] == wil["p_value"] < 0.01
    assert res["verdict"] == "beats" and res["p_value"] < 0.05 and res["ci95"][0] > 0
    json.dumps(res, allow_nan=False)


def test_a_win_needs_both_the_run_level_p_and_an_interval_that_excludes_zero():
    assert stats.verdict(0.01, 0.03, [0.01, 0.05]) == "beats"
    assert stats.verdict(0.01, -0.03, [-0.05, -0.01]) == "is worse than"
    assert stats.verdict(0.043, 0.032, [-0.005, 0.07]) == "not established"  # p below 0.05, the CI holds 0
    assert stats.verdict(0.2, 0.03, [0.01, 0.05]) == "not established"
    assert stats.verdict(None, 0.03) == "not established"


def test_sign_flip_p_exact_values():
    """All 2^n sign patterns are enumerated: n equal positive differences give 2 / 2^n (both extremes)."""
    assert stats.sign_flip_p([0.1] * 5) == pytest.approx(2 / 32)
    assert stats.sign_flip_p([0.1, -0.1]) == 1.0
    assert stats.sign_flip_p([0.0, 0.0, 0.0]) == 1.0
    # [3, 1]: |mean| >= 2 for (+,+) and (-,-) only -> 2/4
    assert stats.sign_flip_p([3.0, 1.0]) == pytest.approx(0.5)
    # more runs than the exact limit: Monte Carlo, close to the exact binomial value
    p = stats.sign_flip_p([0.01] * 30 + [-0.01] * 20, n_perm=20_000, seed=1)
    assert p == pytest.approx(2 * sps.binom.sf(29, 50, 0.5), abs=0.01)  # |2K - 50| >= 10, K ~ Bin(50, 1/2)


def _runs_frame(diffs_per_run, n=80):
    """Predictions of two arms on ``n`` utterances per run: arm b right on the first half, arm a on the
    first half + k (k per run; negative: wrong on -k of b's right ones). Two folds, runs = (seed, fold)."""
    rows_a, rows_b = [], []
    for i, k in enumerate(diffs_per_run):
        seed, fold = i // 2, 1 + i % 2
        for u in range(n):
            y = LABELS[u % 4]
            wrong = LABELS[(u + 1) % 4]
            b_ok = u < n // 2
            a_ok = u < n // 2 + k
            rows_b.append((seed, fold, f"f{fold}_u{u:02d}", y, y if b_ok else wrong))
            rows_a.append((seed, fold, f"f{fold}_u{u:02d}", y, y if a_ok else wrong))
    cols = ["seed", "fold", "utt_id", "label", "pred"]
    return pd.DataFrame(rows_a, columns=cols), pd.DataFrame(rows_b, columns=cols)


def test_the_run_level_test_and_the_utterance_bootstrap_can_disagree():
    """Arm a is far ahead in 3 of 16 runs and a little behind in the other 13. The utterance bootstrap
    holds the trained models fixed and calls the difference significant; the run-level test sees 3
    lucky runs and says it is not established (the report must not write "beats")."""
    a, b = _runs_frame([30, 30, 30] + [-2] * 13)
    res = stats.compare(a, b, "full", "none", "finetune", 1.0, n_boot=1000, seed=0)
    assert res["delta"] > 0
    assert res["utterance_ci95"][0] > 0 and res["utterance_p"] < 0.05  # the old primary test: "beats"
    assert res["p_value"] > 0.1 and res["ci95"][0] < 0 < res["ci95"][1]
    assert res["verdict"] == "not established" and (res["wins"], res["losses"]) == (3, 13)


# ------------------------------------------------------------------------------- subsample_labels


def _train_frame():
    rng = np.random.default_rng(1)
    labels = ["neu"] * 37 + ["hap"] * 11 + ["sad"] * 20 + ["ang"] * 1
    labels = list(rng.permutation(labels))
    return pd.DataFrame({"utt_id": [f"u{i}" for i in range(len(labels))], "label": labels},
                        index=np.arange(100, 100 + len(labels)))


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 0.9])
def test_subsample_labels_sizes_and_classes(fraction):
    df = _train_frame()
    sub = stats.subsample_labels(df, fraction, seed=0)
    counts = df["label"].value_counts()
    got = sub["label"].value_counts()
    assert set(got.index) == set(counts.index)  # every class kept (ang has a single row)
    for c, n in counts.items():
        assert got[c] == max(1, math.floor(fraction * n + 0.5)), c
    assert sub.index.is_monotonic_increasing and set(sub.index) <= set(df.index)  # order preserved
    assert (sub["utt_id"] == df.loc[sub.index, "utt_id"]).all()


def test_subsample_labels_determinism_and_seeds():
    df = _train_frame()
    a = stats.subsample_labels(df, 0.3, seed=5)
    assert a.equals(stats.subsample_labels(df, 0.3, seed=5))
    assert not set(a.index) == set(stats.subsample_labels(df, 0.3, seed=6).index)
    full = stats.subsample_labels(df, 1.0, seed=5)
    assert full.equals(df) and full is not df


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, float("nan"), "half"])
def test_subsample_labels_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="fraction"):
        stats.subsample_labels(_train_frame(), fraction, seed=0)


def test_subsample_labels_other_column_and_missing():
    df = _train_frame().rename(columns={"label": "emotion"})
    assert len(stats.subsample_labels(df, 0.5, seed=0, label_col="emotion")) == 19 + 6 + 10 + 1
    with pytest.raises(ValueError, match="no column"):
        stats.subsample_labels(df, 0.5, seed=0)
    with pytest.raises(ValueError, match="missing"):
        holes = df.assign(emotion=df["emotion"].where(df.index != 100))
        stats.subsample_labels(holes, 0.5, seed=0, label_col="emotion")


# ---------------------------------------------------------------- scope: these test groups vs new ones


def _fold_runs(effects, seeds, noise, rng, n_boot=200):
    """per_fold input of scoped_inference: fold f's seeds differ by effects[f] + training noise; its
    utterance replicates scatter around each run's difference."""
    out = []
    for e in effects:
        d = e + noise * rng.normal(size=seeds)
        out.append((d, d[:, None] + 0.01 * rng.normal(size=(seeds, n_boot))))
    return out


def test_a_fold_by_arm_effect_is_significant_for_these_groups_but_not_for_new_ones():
    """Fold effects of +-4 points that cancel on average (the arms differ per test group, not overall)
    but one seed's noise small: the run-level test finds the difference on these groups (a real
    statement about them), the fold-level test does not generalise it to new groups."""
    rng = np.random.default_rng(0)
    effects = np.array([0.06, 0.05, 0.04, 0.05, -0.01, 0.06, 0.04, 0.05])  # mostly ahead, one fold behind
    res = stats.scoped_inference(_fold_runs(effects, 2, 0.005, rng), np.random.default_rng(1))
    assert res["n_folds"] == 8 and res["n_runs"] == 16
    assert res["p_value"] < 0.01 and res["ci95"][0] > 0  # these test groups
    assert res["fold_p_value"] == pytest.approx(2 * 2 / 2**8)  # 7 of 8 folds ahead: the fold with -0.01 flips
    assert res["fold_ci95"][0] < res["ci95"][0] and res["fold_ci95"][1] > res["ci95"][1]  # wider: folds resampled
    cancelling = np.array([0.04, -0.04, 0.03, -0.03, 0.04, -0.04, 0.02, -0.02])
    res = stats.scoped_inference(_fold_runs(cancelling, 2, 0.002, rng), np.random.default_rng(1))
    said = stats.scoped_verdicts(res)
    assert said["fold_verdict"] == "not established" and res["fold_p_value"] > 0.5


def test_the_fold_level_test_keeps_its_level_where_the_run_level_test_does_not():
    """Simulated null for new groups: each fold has its own arm effect drawn from N(0, 3 points), the
    population mean is 0. The run-level sign-flip (these test groups) rejects far more than 5 % of the
    time (it answers another question); the fold-level test stays near its nominal 5 %."""
    rng = np.random.default_rng(3)
    run_rej = fold_rej = 0
    sims = 300
    for _ in range(sims):
        per_fold = [(e + 0.01 * rng.normal(size=2), np.zeros((2, 1))) for e in 0.03 * rng.normal(size=8)]
        diffs = np.concatenate([d for d, _ in per_fold])
        run_rej += stats.sign_flip_p(diffs) < 0.05
        fold_rej += stats.sign_flip_p(np.array([d.mean() for d, _ in per_fold])) < 0.05
    assert run_rej / sims > 0.15
    assert fold_rej / sims < 0.08


def test_five_folds_can_never_establish_a_claim_about_new_groups_ten_can():
    rng = np.random.default_rng(4)
    five = stats.scoped_inference(_fold_runs(np.full(5, 0.08), 3, 0.002, rng), rng)
    assert five["folds_ahead"] == 5 and five["fold_p_value"] == five["fold_p_min"] == 0.0625
    assert stats.scoped_verdicts(five) == {"verdict": "beats", "fold_verdict": "not testable with 5 folds"}
    ten = stats.scoped_inference(_fold_runs(np.full(10, 0.08), 1, 0.002, rng), rng)
    assert ten["fold_p_value"] == pytest.approx(2 / 1024) and ten["fold_p_min"] == pytest.approx(2 / 1024)
    assert stats.scoped_verdicts(ten)["fold_verdict"] == "beats"


def test_compare_reports_both_scopes_from_predictions():
    """compare() on predictions frames carries the fold-level keys beside the run-level ones, and the
    run-level interval holds the folds fixed (it no longer draws runs across folds)."""
    a, b = make_preds(0.9, seeds=(0, 1), seed=7), make_preds(0.5, seeds=(0, 1), seed=8)
    c = stats.compare(a, b, "A", "B", "finetune", 1.0, n_boot=200)
    assert c["n_folds"] == 5 and c["fold_test"] == stats.FOLD_LEVEL_TEST and c["test"] == stats.RUN_LEVEL_TEST
    assert c["verdict"] == "beats" and c["fold_verdict"] == "not testable with 5 folds"
    assert c["fold_delta"] == pytest.approx(c["delta"])  # balanced: two seeds in every fold
    assert c["fold_p_value"] == pytest.approx(0.0625) and c["folds_ahead"] == 5
