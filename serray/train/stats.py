"""Statistics for ablations: per-run metrics, descriptive summaries and paired significance tests.

Everything here is pure numpy / scipy / pandas (no Ray, no torch) and works on **predictions
frames**: one pandas DataFrame per (arm, mode, label fraction) with the columns

* ``seed`` -- the training seed of the run,
* ``fold`` -- the leave-one-session-out fold (the held-out session),
* ``utt_id`` -- the test utterance,
* ``label`` -- its true class name (one of :data:`serray.data.corpora.base.LABELS`),
* ``pred`` -- the predicted class name,

one row per test utterance per seed per fold. A *run* is one (seed, fold) pair.

Test sets are small (20-160 utterances per fold) and training is noisy (another seed moves a fold's
UA by several points), so a claim that arm A beats arm B rests on a *paired* comparison over the same
seeds, folds and test utterances that accounts for **both**. Every comparison is made at two scopes
(:func:`scoped_inference`):

* **these test groups** (the primary test of :func:`run_level_test`): a sign-flip permutation test over
  the (seed, fold) runs' paired differences, with an interval from a bootstrap that holds the folds
  fixed and resamples the seeds within each fold, then the fold's test utterances. It answers "does A
  beat B on these test sessions / speakers?" and says nothing about other ones;
* **new test groups**: a sign-flip test over the folds (each fold's difference averaged over its
  seeds), with a hierarchical bootstrap interval (folds, then seeds within a fold, then utterances).
  Folds are the units that generalise: with K folds its p cannot go below ``2 / 2**K`` (0.0625 for five
  sessions), so a five-fold design can never establish a claim about new sessions; a
  leave-one-speaker-out design (ten folds on IEMOCAP) can.

The utterance-only bootstrap (:func:`paired_bootstrap`, the trained models held fixed) and a Wilcoxon
signed-rank test over runs (:func:`wilcoxon_runs`) are reported alongside as secondary columns. All metric values are fractions
in [0, 1] returned as plain Python floats (never NaN: an undefined value is ``None``), so every result
is JSON-serialisable as is.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
from scipy import stats as sps

from serray.data.corpora.base import LABELS
from serray.train.metrics import classification_metrics

PRED_COLUMNS: Tuple[str, ...] = ("seed", "fold", "utt_id", "label", "pred")
"""The columns every predictions frame must have."""

METRICS: Tuple[str, ...] = ("ua", "wa", "macro_f1")
"""The metrics these functions know (UA, WA, macro-F1; see :mod:`serray.train.metrics`)."""

BOOTSTRAP_TEST = "paired bootstrap over test utterances"
WILCOXON_TEST = "Wilcoxon signed-rank over seed x fold"
RUN_LEVEL_TEST = ("these test groups: sign-flip permutation over seed x fold runs; 95% CI: bootstrap of the seeds "
                  "within each fold, then its test utterances (folds fixed)")
FOLD_LEVEL_TEST = ("new test groups: sign-flip permutation over folds (each fold's mean over seeds); 95% CI: "
                   "hierarchical bootstrap (folds, then seeds within a fold, then test utterances)")
SCOPES = {"run": "these test groups", "fold": "new test groups"}
ALPHA = 0.05  # a comparison "beats" / "is worse than" only when the run-level p is below this
EXACT_MAX_RUNS = 20  # up to 2**20 sign patterns are enumerated; more runs: Monte Carlo

_KEY = ["seed", "fold", "utt_id"]


# --------------------------------------------------------------------------------------------- helpers


def _py(x: Any) -> Any:
    """A numpy scalar as the matching plain Python value (other values unchanged)."""
    return x.item() if isinstance(x, np.generic) else x


def _float_or_none(x: Optional[float]) -> Optional[float]:
    """``x`` as a plain float, or ``None`` when it is ``None`` or not finite."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {list(METRICS)}")


def _check_preds(preds: pd.DataFrame, labels: Sequence[str], name: str = "predictions") -> None:
    """Raise ``ValueError`` unless ``preds`` is a well-formed predictions frame."""
    if not isinstance(preds, pd.DataFrame):
        raise ValueError(f"{name}: expected a pandas DataFrame, got {type(preds).__name__}")
    missing = [c for c in PRED_COLUMNS if c not in preds.columns]
    if missing:
        raise ValueError(f"{name}: missing column(s) {missing}; a predictions frame needs {list(PRED_COLUMNS)}")
    if len(preds) == 0:
        raise ValueError(f"{name}: no rows")
    if preds[list(PRED_COLUMNS)].isna().any().any():
        raise ValueError(f"{name}: missing values in {list(PRED_COLUMNS)}")
    known = set(labels)
    for col in ("label", "pred"):
        unknown = sorted(set(map(str, preds[col].unique())) - known)
        if unknown:
            raise ValueError(f"{name}: unknown class name(s) {unknown} in column {col!r}; expected {list(labels)}")
    dup = preds.duplicated(subset=_KEY)
    if dup.any():
        first = preds.loc[dup, _KEY].iloc[0].tolist()
        raise ValueError(f"{name}: {int(dup.sum())} duplicate (seed, fold, utt_id) row(s), e.g. {first}")


def _encode(values: pd.Series, labels: Sequence[str]) -> np.ndarray:
    """Class names -> class indices in ``labels`` order."""
    index = {name: i for i, name in enumerate(labels)}
    return np.fromiter((index[str(v)] for v in values), dtype=np.int64, count=len(values))


# ----------------------------------------------------------------------------------------- per run


def run_metrics(preds: pd.DataFrame, labels: Sequence[str] = LABELS) -> List[Dict[str, Any]]:
    """UA, WA and macro-F1 of every run (seed, fold) of a predictions frame.

    The metrics are those of :func:`serray.train.metrics.classification_metrics` (UA and
    macro-F1 over the classes present in the fold's test labels).

    Args:
        preds: A predictions frame (columns ``seed, fold, utt_id, label, pred``).
        labels: The class names in class-index order.

    Returns:
        One dict ``{"seed", "fold", "ua", "wa", "macro_f1", "n_test"}`` per run, sorted by seed,
        then fold; metric values are fractions (plain floats), ``n_test`` the number of test
        utterances of the run.

    Raises:
        ValueError: If ``preds`` is not a well-formed predictions frame.
    """
    _check_preds(preds, labels)
    y = _encode(preds["label"], labels)
    p = _encode(preds["pred"], labels)
    out = []
    for (seed, fold), idx in preds.groupby(["seed", "fold"], sort=True).indices.items():
        with warnings.catch_warnings():
            # expected: a prediction of a class absent from the fold's labels (left out of UA / F1)
            warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
            m = classification_metrics(y[idx], p[idx])
        out.append({"seed": _py(seed), "fold": _py(fold), **{k: _float_or_none(m[k]) for k in METRICS},
                    "n_test": int(len(idx))})
    out.sort(key=lambda r: (r["seed"], r["fold"]))
    return out


def summarise_runs(runs: Sequence[Mapping[str, Any]], metric: str) -> Dict[str, Any]:
    """Mean, sample sd and a 95% t-interval of one metric over runs (seed x fold).

    The interval is ``mean ± t(0.975, n-1) * sd / sqrt(n)`` over the ``n`` runs. It treats the runs
    as independent draws, which they are not: runs of one seed share their initialisation, and the
    leave-one-session-out folds share most of their training data with each other and differ in
    their (small) test sets. Read the interval as a description of the spread of the runs, not as
    a test; compare arms with :func:`run_level_test` instead.

    Args:
        runs: Run dicts as returned by :func:`run_metrics` (only ``runs[i][metric]`` is read;
            ``None`` / NaN values are left out).
        metric: ``"ua"``, ``"wa"`` or ``"macro_f1"``.

    Returns:
        ``{"mean": float, "sd": float, "ci95": [lo, hi]}`` as fractions. ``sd`` is 0.0 and the
        interval ``[None, None]`` for a single run; everything is ``None`` without runs.
    """
    _check_metric(metric)
    values = np.array([float(r[metric]) for r in runs if _float_or_none(r.get(metric)) is not None], dtype=float)
    n = len(values)
    if n == 0:
        return {"mean": None, "sd": None, "ci95": [None, None]}
    mean = float(values.mean())
    if n == 1:
        return {"mean": mean, "sd": 0.0, "ci95": [None, None]}
    sd = float(values.std(ddof=1))
    half = float(sps.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "sd": sd, "ci95": [mean - half, mean + half]}


# --------------------------------------------------------------------------------- fast metrics


def fast_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int = len(LABELS),
                 weights: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """UA, WA and macro-F1 from confusion counts, batched over rows of ``weights``.

    The same definitions as :func:`serray.train.metrics.classification_metrics` (UA = mean recall
    and macro-F1 over the classes with a positive weighted count in ``y_true``, zero division -> 0),
    computed with numpy only. ``weights[b, i]`` is how often utterance ``i`` occurs in bootstrap
    replicate ``b`` (an integer count); without ``weights`` every utterance counts once (B = 1).

    Args:
        y_true: True class indices, shape (n,).
        y_pred: Predicted class indices, shape (n,) or (S, n) for S runs on the same utterances.
        num_classes: Number of classes.
        weights: Utterance counts per replicate, shape (B, n); default all ones with B = 1.

    Returns:
        ``{"ua", "wa", "macro_f1"}``, each an array of shape (B, S) (S = 1 for 1-D ``y_pred``).
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_pred.ndim == 1:
        y_pred = y_pred[None, :]
    n = y_true.shape[0]
    w = np.ones((1, n)) if weights is None else np.asarray(weights, dtype=float)
    s_runs = y_pred.shape[0]
    true_oh = np.eye(num_classes)[y_true]  # (n, C)
    pred_oh = np.eye(num_classes)[y_pred]  # (S, n, C)
    correct = y_pred == y_true[None, :]  # (S, n)
    # tp[b, s, c] = sum_i w[b, i] * [y_i = c] * [pred_si = y_i]; pred counts alike.
    tp = (w @ (correct[:, :, None] * true_oh[None]).transpose(1, 0, 2).reshape(n, -1)).reshape(-1, s_runs, num_classes)
    n_pred = (w @ pred_oh.transpose(1, 0, 2).reshape(n, -1)).reshape(-1, s_runs, num_classes)
    n_true = (w @ true_oh)[:, None, :]  # (B, 1, C)
    present = n_true > 0
    n_present = present.sum(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(present, tp / np.where(present, n_true, 1.0), 0.0)
        denom = n_true + n_pred
        f1 = np.where(present & (denom > 0), 2.0 * tp / np.where(denom > 0, denom, 1.0), 0.0)
        total = w.sum(axis=1)[:, None]
        return {
            "ua": recall.sum(axis=2) / n_present,
            "wa": tp.sum(axis=2) / total,
            "macro_f1": f1.sum(axis=2) / n_present,
        }


# ------------------------------------------------------------------------------------- pairing


def _fold_arrays(preds_a: pd.DataFrame, preds_b: pd.DataFrame, labels: Sequence[str]
                 ) -> List[Tuple[Hashable, np.ndarray, np.ndarray, np.ndarray]]:
    """Per fold: (fold, y (n,), pred_a (S, n), pred_b (S, n)), utterances and seeds in one order.

    Raises ``ValueError`` unless both frames cover the same (seed, fold, utt_id) set with the same
    true labels, every utterance of a fold has one label, and within a fold every seed has the
    same test utterances (the bootstrap resamples one set of utterance ids per fold).
    """
    _check_preds(preds_a, labels, "preds_a")
    _check_preds(preds_b, labels, "preds_b")
    a = preds_a[list(PRED_COLUMNS)].copy()
    b = preds_b[list(PRED_COLUMNS)].copy()
    for df in (a, b):
        df["label"] = df["label"].astype(str)
        df["pred"] = df["pred"].astype(str)
    merged = a.merge(b, on=_KEY, how="outer", suffixes=("_a", "_b"), indicator=True)
    only = merged["_merge"] != "both"
    if only.any():
        n_a = int((merged["_merge"] == "left_only").sum())
        n_b = int((merged["_merge"] == "right_only").sum())
        ex = merged.loc[only, _KEY].iloc[0].tolist()
        raise ValueError(
            "the two predictions frames do not cover the same (seed, fold, utt_id) set: "
            f"{n_a} row(s) only in preds_a, {n_b} only in preds_b (e.g. {ex}); a paired comparison "
            "needs the same seeds, folds and test utterances in both arms")
    differ = merged["label_a"] != merged["label_b"]
    if differ.any():
        ex = merged.loc[differ, _KEY + ["label_a", "label_b"]].iloc[0].tolist()
        raise ValueError(f"the true labels differ between the two frames in {int(differ.sum())} row(s), e.g. {ex}")
    # Per fold, rows sorted by seed then utterance: with no duplicate keys, a fold whose every seed
    # has all of the fold's utterances holds exactly n_seeds * n_utts rows and reshapes to (S, n).
    fold_codes, fold_values = pd.factorize(merged["fold"], sort=True)
    seed_codes, seed_values = pd.factorize(merged["seed"], sort=True)
    utt_codes, utt_values = pd.factorize(merged["utt_id"].astype(str), sort=True)
    y_all = _encode(merged["label_a"], labels)
    pa_all = _encode(merged["pred_a"], labels)
    pb_all = _encode(merged["pred_b"], labels)
    order = np.lexsort((utt_codes, seed_codes, fold_codes))
    bounds = np.flatnonzero(np.diff(fold_codes[order])) + 1
    out = []
    for rows in np.split(order, bounds):
        fold = _py(fold_values[fold_codes[rows[0]]])
        seeds, per_seed = np.unique(seed_codes[rows], return_counts=True)
        n_utts = len(np.unique(utt_codes[rows]))
        if (per_seed != n_utts).any():
            bad = int(np.flatnonzero(per_seed != n_utts)[0])
            raise ValueError(f"fold {fold!r}: seed {_py(seed_values[seeds[bad]])!r} has {int(per_seed[bad])} of "
                             f"the fold's {n_utts} test utterances; every seed of a fold must be tested on "
                             "the same utterances")
        shape = (len(seeds), n_utts)
        y = y_all[rows].reshape(shape)
        if (y != y[0]).any():
            col = int(np.flatnonzero((y != y[0]).any(axis=0))[0])
            raise ValueError(f"fold {fold!r}: utterance {utt_values[utt_codes[rows[col]]]!r} has different true "
                             "labels in different seeds")
        out.append((fold, y[0].copy(), pa_all[rows].reshape(shape), pb_all[rows].reshape(shape)))
    return out


def _stratified_weights(y: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Utterance counts (n_boot, n) of a stratified resample with replacement.

    Within each class present in ``y`` the class's ``m`` utterances are drawn ``m`` times with
    replacement, so every replicate keeps the class sizes of the fold (every class stays present).
    """
    n = len(y)
    w = np.zeros((n_boot, n))
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        m = len(members)
        draws = rng.integers(0, m, size=(n_boot, m))
        counts = np.bincount((draws + (np.arange(n_boot) * m)[:, None]).ravel(), minlength=n_boot * m)
        w[:, members] = counts.reshape(n_boot, m)
    return w


# -------------------------------------------------------------------------- significance tests


def paired_bootstrap(preds_a: pd.DataFrame, preds_b: pd.DataFrame, metric: str = "ua", n_boot: int = 2000,
                     seed: int = 0, labels: Sequence[str] = LABELS) -> Dict[str, Any]:
    """Paired bootstrap over test utterances of the difference of one metric between two arms.

    ``delta`` is the mean over runs (seed, fold) of ``metric(a) - metric(b)``, computed exactly
    from the predictions (it equals the difference of the :func:`run_metrics` means).

    Each bootstrap replicate resamples the test utterances of every fold with replacement,
    *stratified by true class within the fold* (each class's utterances are drawn as many times as
    the class has utterances, so every class stays present and UA / macro-F1 stay defined over the
    same classes). The same resampled utterance ids serve both arms and every seed of the fold --
    that is the pairing -- and the replicate's delta is recomputed over all runs. Seeds are not
    resampled: the interval describes the uncertainty due to the finite test sets, given these
    trained models.

    ``ci95`` is the percentile interval (2.5 %, 97.5 %) of the replicate deltas. The two-sided
    p-value is ``min(1, 2 * min((#{d <= 0} + 1) / (n_boot + 1), (#{d >= 0} + 1) / (n_boot + 1)))``,
    i.e. twice the bootstrap mass on the far side of 0 (roughly the smallest level at which a
    percentile interval excludes 0); it cannot go below ``2 / (n_boot + 1)``.

    Args:
        preds_a: Predictions frame of arm A.
        preds_b: Predictions frame of arm B (same seeds, folds, utterances and true labels).
        metric: ``"ua"``, ``"wa"`` or ``"macro_f1"``.
        n_boot: Number of bootstrap replicates (>= 1).
        seed: Seed of the resampling (the result is deterministic given it).
        labels: The class names in class-index order.

    Returns:
        ``{"delta", "ci95": [lo, hi], "p_value", "test", "n_boot", "n_runs"}`` with delta and
        interval as fractions (multiply by 100 for points).

    Raises:
        ValueError: If the frames do not cover the same (seed, fold, utt_id) set, their true labels
            differ, a fold's seeds were tested on different utterances, or an argument is invalid.
    """
    return _paired_bootstrap(preds_a, preds_b, metric, n_boot, seed, labels)[0]


def _paired_bootstrap(preds_a: pd.DataFrame, preds_b: pd.DataFrame, metric: str, n_boot: int, seed: int,
                      labels: Sequence[str]) -> Tuple[Dict[str, Any], List[Dict[str, Any]], List[Dict[str, Any]]]:
    """:func:`paired_bootstrap`, plus both arms' :func:`run_metrics` (reused by :func:`compare`)."""
    _check_metric(metric)
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    n_boot = int(n_boot)
    folds = _fold_arrays(preds_a, preds_b, labels)
    runs_a, runs_b = run_metrics(preds_a, labels), run_metrics(preds_b, labels)
    n_runs = len(runs_a)
    delta = float(np.mean([r[metric] for r in runs_a]) - np.mean([r[metric] for r in runs_b]))

    rng = np.random.default_rng(seed)
    total = np.zeros(n_boot)
    num_classes = len(labels)
    for _fold, y, pa, pb in folds:
        w = _stratified_weights(y, n_boot, rng)
        ma = fast_metrics(y, pa, num_classes, w)[metric]  # (B, S)
        mb = fast_metrics(y, pb, num_classes, w)[metric]
        total += (ma - mb).sum(axis=1)
    d = total / n_runs
    lo, hi = np.percentile(d, [2.5, 97.5])
    below = (int(np.sum(d <= 0)) + 1) / (n_boot + 1)
    above = (int(np.sum(d >= 0)) + 1) / (n_boot + 1)
    p = min(1.0, 2.0 * min(below, above))
    return ({"delta": delta, "ci95": [float(lo), float(hi)], "p_value": float(p), "test": BOOTSTRAP_TEST,
             "n_boot": n_boot, "n_runs": n_runs}, runs_a, runs_b)


def _paired_values(runs_a: Sequence[Mapping[str, Any]], runs_b: Sequence[Mapping[str, Any]], metric: str
                   ) -> Tuple[np.ndarray, np.ndarray]:
    """The metric of both arms, paired by (seed, fold) in sorted order."""
    ka = {(r["seed"], r["fold"]): r[metric] for r in runs_a}
    kb = {(r["seed"], r["fold"]): r[metric] for r in runs_b}
    if len(ka) != len(runs_a) or len(kb) != len(runs_b):
        raise ValueError("duplicate (seed, fold) runs")
    if set(ka) != set(kb):
        only_a, only_b = sorted(set(ka) - set(kb)), sorted(set(kb) - set(ka))
        raise ValueError(f"the two arms have different (seed, fold) runs: only in a {only_a}, only in b {only_b}")
    keys = sorted(ka)
    return np.array([ka[k] for k in keys], dtype=float), np.array([kb[k] for k in keys], dtype=float)


def wilcoxon_runs(runs_a: Sequence[Mapping[str, Any]], runs_b: Sequence[Mapping[str, Any]],
                  metric: str = "ua") -> Dict[str, Any]:
    """Wilcoxon signed-rank test of one metric between two arms, paired by (seed, fold).

    Uses :func:`scipy.stats.wilcoxon` (two-sided, zero differences dropped -- scipy's default
    ``zero_method="wilcox"``). The runs are not independent (see :func:`summarise_runs`), so this
    p-value is a secondary check next to :func:`paired_bootstrap`.

    Args:
        runs_a: Run dicts of arm A (see :func:`run_metrics`).
        runs_b: Run dicts of arm B, with the same (seed, fold) pairs.
        metric: ``"ua"``, ``"wa"`` or ``"macro_f1"``.

    Returns:
        ``{"delta", "p_value", "test", "n"}``: the mean paired difference (fraction), the p-value
        (1.0 when every difference is zero; ``None`` without runs) and the number of pairs.

    Raises:
        ValueError: If the arms do not have the same (seed, fold) runs or the metric is unknown.
    """
    _check_metric(metric)
    a, b = _paired_values(runs_a, runs_b, metric)
    n = int(len(a))
    if n == 0:
        return {"delta": None, "p_value": None, "test": WILCOXON_TEST, "n": 0}
    diff = a - b
    delta = float(diff.mean())
    if np.all(diff == 0):
        p = 1.0
    else:
        p = _float_or_none(sps.wilcoxon(a, b).pvalue)
    return {"delta": delta, "p_value": p, "test": WILCOXON_TEST, "n": n}


def sign_flip_p(diff: Sequence[float], n_perm: int = 100_000, seed: int = 0) -> float:
    """Two-sided p-value of a paired sign-flip permutation test of ``mean(diff) = 0``.

    Under the null each paired difference is as likely to have either sign, so the p-value is the
    share of the ``2**n`` sign patterns whose mean is at least as far from 0 as the observed one
    (enumerated exactly up to :data:`EXACT_MAX_RUNS` runs; beyond, ``n_perm`` random patterns,
    ``(hits + 1) / (n_perm + 1)``). All-zero differences give 1.0.
    """
    d = np.asarray(diff, dtype=float)
    n = len(d)
    if n == 0:
        raise ValueError("no paired differences")
    observed = abs(d.mean())
    if observed == 0.0:
        return 1.0
    tol = 1e-12 * max(1.0, float(np.abs(d).max()))
    if n <= EXACT_MAX_RUNS:
        patterns = ((np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1) * 2 - 1  # (2^n, n) of +-1
        means = np.abs(patterns @ d) / n
        return float(np.mean(means >= observed - tol))
    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([-1.0, 1.0]), size=(int(n_perm), n))
    hits = int(np.sum(np.abs(signs @ d) / n >= observed - tol))
    return (hits + 1) / (int(n_perm) + 1)


def scoped_inference(per_fold: Sequence[Tuple[np.ndarray, np.ndarray]], rng: np.random.Generator,
                     seed: int = 0) -> Dict[str, Any]:
    """Both scopes of a paired comparison from each fold's run differences.

    Args:
        per_fold: one ``(d, reps)`` per fold: ``d`` (S,) the observed differences A - B of the fold's S
            seeds, ``reps`` (S, B) the same differences under B resamples of the fold's test utterances
            (one draw per replicate shared by both arms and every seed: the pairing). Undefined
            replicate values (NaN: a CCC of a constant resample) are left out of the means.
        rng: the generator of the seed and fold draws.
        seed: seed of the Monte Carlo sign patterns (more than 20 units).

    Returns:
        ``delta`` (the mean over runs), ``ci95`` / ``p_value`` / ``wins`` / ``losses`` / ``n_runs`` for
        **these test groups** (runs; seeds resampled within each fold, folds fixed), and
        ``fold_ci95`` / ``fold_p_value`` / ``folds_ahead`` / ``folds_behind`` / ``n_folds`` /
        ``fold_p_min`` (the smallest p the design allows, ``2 / 2**K``) for **new test groups**
        (folds; hierarchical bootstrap: folds, seeds within a fold, utterances).
    """
    diffs = [np.asarray(d, dtype=float) for d, _ in per_fold]
    reps = [np.asarray(r, dtype=float) for _, r in per_fold]
    if not diffs or any(len(d) == 0 for d in diffs):
        raise ValueError("every fold needs at least one run")
    n_boot = reps[0].shape[1]
    diff = np.concatenate(diffs)
    fold_means = np.array([d.mean() for d in diffs])
    k = len(diffs)
    # within-fold resamples: replicate b of fold f = mean of its S seeds drawn with replacement at utterance draw b
    within = np.empty((k, n_boot))
    for f, r in enumerate(reps):
        s = r.shape[0]
        pick = rng.integers(0, s, size=(n_boot, s))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            within[f] = np.nanmean(r[pick, np.arange(n_boot)[:, None]], axis=1)
    sizes = np.array([len(d) for d in diffs], dtype=float)
    conditional = (sizes[:, None] * within).sum(0) / sizes.sum()  # these folds, weighted by their runs
    folds = rng.integers(0, k, size=(n_boot, k))
    cols = rng.integers(0, n_boot, size=(n_boot, k))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        hierarchical = np.nanmean(within[folds, cols], axis=1)
        lo, hi = np.nanpercentile(conditional, [2.5, 97.5])
        flo, fhi = np.nanpercentile(hierarchical, [2.5, 97.5])
    return {"delta": float(diff.mean()), "ci95": [float(lo), float(hi)], "p_value": sign_flip_p(diff, seed=seed),
            "n_runs": int(len(diff)), "wins": int((diff > 0).sum()), "losses": int((diff < 0).sum()),
            "fold_delta": float(fold_means.mean()), "fold_ci95": [float(flo), float(fhi)],
            "fold_p_value": sign_flip_p(fold_means, seed=seed), "n_folds": int(k),
            "folds_ahead": int((fold_means > 0).sum()), "folds_behind": int((fold_means < 0).sum()),
            "fold_p_min": fold_p_floor(k), "n_boot": int(n_boot)}


def fold_p_floor(n_folds: int) -> float:
    """The smallest two-sided p a sign-flip test over ``n_folds`` units can give: ``2 / 2**n``."""
    return min(1.0, 2.0 / 2 ** int(n_folds))


def run_level_test(preds_a: pd.DataFrame, preds_b: pd.DataFrame, metric: str = "ua", n_boot: int = 2000,
                   seed: int = 0, labels: Sequence[str] = LABELS) -> Dict[str, Any]:
    """The primary comparison, at both scopes (:func:`scoped_inference`), accounting for training variance.

    * ``p_value``: :func:`sign_flip_p` over the per-run differences ``metric(a) - metric(b)`` of the
      (seed, fold) runs (exact for up to 20 runs): a run's difference carries its training noise, so
      one lucky seed cannot make a difference significant. It is a statement about **these test
      groups** (``ci95``: the folds fixed, seeds resampled within each fold, then the fold's test
      utterances, stratified by class, the same draw for both arms and every seed of the fold);
    * ``fold_p_value`` / ``fold_ci95``: the same question for **new test groups**, over folds.

    Returns:
        The keys of :func:`scoped_inference` plus ``test``, ``fold_test`` (fractions; ``wins`` /
        ``losses``: runs where A is above / below B).
    """
    return _run_level(preds_a, preds_b, metric, n_boot, seed, labels)[0]


def _run_level(preds_a, preds_b, metric, n_boot, seed, labels):
    _check_metric(metric)
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    n_boot = int(n_boot)
    folds = _fold_arrays(preds_a, preds_b, labels)
    runs_a, runs_b = run_metrics(preds_a, labels), run_metrics(preds_b, labels)
    _paired_values(runs_a, runs_b, metric)  # the same (seed, fold) runs in both arms
    rng = np.random.default_rng(seed)
    per_fold = []
    for _fold, y, pa, pb in folds:
        w = _stratified_weights(y, n_boot, rng)
        observed = fast_metrics(y, pa, len(labels))[metric][0] - fast_metrics(y, pb, len(labels))[metric][0]  # (S,)
        d = fast_metrics(y, pa, len(labels), w)[metric] - fast_metrics(y, pb, len(labels), w)[metric]  # (B, S)
        per_fold.append((observed, d.T))
    out = {**scoped_inference(per_fold, rng, seed), "test": RUN_LEVEL_TEST, "fold_test": FOLD_LEVEL_TEST}
    return out, runs_a, runs_b


def scoped_verdicts(res: Mapping[str, Any]) -> Dict[str, str]:
    """``verdict`` (these test groups, the run-level test) and ``fold_verdict`` (new test groups, the
    fold-level test) of a comparison: each "beats" / "is worse than" / "not established", and for the
    fold level "not testable with K folds" when ``2 / 2**K`` is not below :data:`ALPHA`."""
    out = {"verdict": verdict(res.get("p_value"), res.get("delta"), res.get("ci95"))}
    if res.get("fold_p_value") is not None:
        k = int(res.get("n_folds") or 0)
        out["fold_verdict"] = (f"not testable with {k} folds" if fold_p_floor(k) >= ALPHA else
                               verdict(res.get("fold_p_value"), res.get("fold_delta", res.get("delta")), res.get("fold_ci95")))
    return out


def verdict(p_value: Optional[float], delta: Optional[float], ci95: Optional[Sequence[Optional[float]]] = None,
            alpha: float = ALPHA) -> str:
    """``"beats"``, ``"is worse than"`` or ``"not established"`` from the run-level test: established
    only when its p is below ``alpha`` **and** its 95 % interval lies on one side of 0 (the two can
    disagree near the boundary; a claim needs both)."""
    if p_value is None or delta is None or not p_value < alpha or delta == 0:
        return "not established"
    if ci95 is not None:
        lo, hi = (list(ci95) + [None, None])[:2]
        if lo is None or hi is None or lo <= 0 <= hi:
            return "not established"
    return "beats" if delta > 0 else "is worse than"


def compare(preds_a: pd.DataFrame, preds_b: pd.DataFrame, a: str, b: str, mode: str, label_fraction: float,
            metric: str = "ua", n_boot: int = 2000, seed: int = 0, labels: Sequence[str] = LABELS
            ) -> Dict[str, Any]:
    """Compare arm ``a`` with arm ``b`` (same mode and label fraction) on one metric.

    The primary test is :func:`run_level_test` (sign-flip permutation over runs, two-level bootstrap
    interval); the utterance-only bootstrap (:func:`paired_bootstrap`) and the Wilcoxon signed-rank test
    over runs (:func:`wilcoxon_runs`) go alongside. ``verdict`` is what a report may write.

    Returns:
        ``{"a", "b", "mode", "label_fraction", "metric", "delta", "ci95", "p_value", "test", "verdict",
        "wins", "losses", "utterance_ci95", "utterance_p", "wilcoxon_p", "n_boot", "n_runs"}`` (these test
        groups) and ``{"fold_delta", "fold_ci95", "fold_p_value", "fold_test", "fold_verdict", "n_folds",
        "folds_ahead", "folds_behind", "fold_p_min"}`` (new test groups); delta and intervals as fractions.

    Raises:
        ValueError: As :func:`paired_bootstrap`.
    """
    primary, runs_a, runs_b = _run_level(preds_a, preds_b, metric, n_boot, seed, labels)
    boot = _paired_bootstrap(preds_a, preds_b, metric, n_boot, seed, labels)[0]
    wil = wilcoxon_runs(runs_a, runs_b, metric=metric)
    return {"a": a, "b": b, "mode": mode, "label_fraction": float(label_fraction), "metric": metric,
            **primary, **scoped_verdicts(primary),
            "utterance_ci95": boot["ci95"], "utterance_p": boot["p_value"], "wilcoxon_p": wil["p_value"]}


# ------------------------------------------------------------------------------------ labels


def subsample_labels(df: pd.DataFrame, fraction: float, seed: int, label_col: str = "label") -> pd.DataFrame:
    """Keep ``fraction`` of the rows of every class (for label-efficiency runs).

    Per class with ``n`` rows, ``max(1, floor(fraction * n + 0.5))`` rows are kept (rounded half up,
    at least one, so every class present stays present), drawn without replacement with
    ``numpy.random.default_rng(seed)``; classes are visited in sorted order, so the result depends
    only on the frame (its rows in their order), ``fraction`` and ``seed``. The kept rows keep their order and index.

    Args:
        df: The rows to subsample (e.g. a training manifest).
        fraction: Fraction in (0, 1]; 1 keeps every row.
        seed: Seed of the draw.
        label_col: The class column.

    Returns:
        The kept rows (a new frame).

    Raises:
        ValueError: If ``fraction`` is not in (0, 1], ``label_col`` is missing or has missing values.
    """
    try:
        fraction = float(fraction)
    except (TypeError, ValueError):
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}") from None
    if not (0.0 < fraction <= 1.0):
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    if label_col not in df.columns:
        raise ValueError(f"no column {label_col!r} in the frame")
    labels = df[label_col]
    if labels.isna().any():
        raise ValueError(f"column {label_col!r} has {int(labels.isna().sum())} missing value(s)")
    if fraction == 1.0:
        return df.copy()
    rng = np.random.default_rng(seed)
    values = labels.to_numpy()
    keep = np.zeros(len(df), dtype=bool)
    for c in sorted(pd.unique(values), key=lambda v: (type(v).__name__, v)):
        members = np.flatnonzero(values == c)
        k = max(1, int(math.floor(fraction * len(members) + 0.5)))
        keep[rng.choice(members, size=k, replace=False)] = True
    return df.iloc[np.flatnonzero(keep)].copy()
