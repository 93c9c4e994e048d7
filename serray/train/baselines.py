"""Reference baselines for the ablation: classical utterance statistics, the synthesis oracle, metadata.

Plain numpy / torchaudio / scikit-learn (no Ray), deterministic. The arms they give:

* ``classical`` -- :func:`classical_features` (pooled statistics of log-mel, MFCC and frame energy)
  + :func:`fit_predict`: what a frame-blind utterance-level model gets from the audio;
* ``oracle`` -- :func:`oracle_features` (the synthesis parameters the ``benchmark`` preset of
  :func:`serray.data.synthetic.make_corpus` writes to ``synthetic_oracle.csv``) + :func:`fit_predict`:
  a ceiling for the synthetic benchmark;
* ``metadata`` -- :func:`metadata_features` (ids, speaker, dialog, timing, session) + :func:`fit_predict`:
  a control that must stay at chance.

:func:`loso_ua` runs any of them leave-one-session-out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from serray.errors import DataError

__all__ = ["CLASSICAL_STATS", "classical_features", "oracle_features", "metadata_features",
           "fit_predict", "choose_recipe", "classical_recipes", "loso_ua"]

#: Statistics over frames, in feature order within each block.
CLASSICAL_STATS = ("mean", "std", "p10", "p50", "p90")
_N_MELS, _N_CEPS = 40, 13


def _stats(frames: np.ndarray) -> np.ndarray:
    """[T, D] -> [5 * D]: mean, std, 10th / 50th / 90th percentile of every column."""
    p10, p50, p90 = np.percentile(frames, [10, 50, 90], axis=0)
    return np.concatenate([frames.mean(0), frames.std(0), p10, p50, p90])


def classical_features(paths: Sequence[str | Path], sample_rate: int = 16000) -> np.ndarray:
    """Utterance statistics of log-mel, MFCC and frame-energy frames.

    Every file is read with soundfile (mono, resampled to ``sample_rate`` with torchaudio), then
    framed Kaldi-style (25 ms windows, 10 ms hop, no dither) by ``torchaudio.compliance.kaldi``:
    40 log-mel filterbank energies, 13 MFCCs and the log frame energy. Each of these 54 frame
    features is summarised by :data:`CLASSICAL_STATS` over the utterance.

    Args:
        paths: audio files (WAV / FLAC).
        sample_rate: the rate the audio is brought to before framing.

    Returns:
        float64 array [N, 270]: blocks ``log-mel (40) x 5 stats``, ``MFCC (13) x 5 stats``,
        ``log energy (1) x 5 stats``, each block ordered stat-major (all means, then all stds ...).

    Raises:
        AudioError: a file is missing, unreadable or shorter than one 25 ms frame.
    """
    import torch
    from torchaudio.compliance import kaldi

    from serray.data.audio import load_audio

    out = np.empty((len(paths), 5 * (_N_MELS + _N_CEPS + 1)), dtype=np.float64)
    common = dict(sample_frequency=float(sample_rate), dither=0.0, frame_length=25.0, frame_shift=10.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # per-utterance ops are tiny: threads only add overhead
    try:
        with torch.inference_mode():
            for i, path in enumerate(paths):
                wav = torch.from_numpy(load_audio(path, sample_rate, min_seconds=0.025))[None, :] * 32768.0
                fb = kaldi.fbank(wav, num_mel_bins=_N_MELS, use_energy=True, raw_energy=True, **common)
                mfcc = kaldi.mfcc(wav, num_ceps=_N_CEPS, num_mel_bins=_N_MELS, **common)
                energy, logmel = fb[:, :1].numpy(), fb[:, 1:].numpy()
                out[i] = np.concatenate([_stats(logmel), _stats(mfcc.numpy()), _stats(energy)])
    finally:
        torch.set_num_threads(threads)
    return out


def oracle_features(oracle_csv: str | Path, utt_ids: Sequence[str]) -> np.ndarray:
    """Synthesis parameters of utterances, from the benchmark preset's ``synthetic_oracle.csv``.

    Only numeric synthesis parameters are used (never the ``label`` column, nor any class-level
    constant): :data:`serray.data.synthetic.benchmark.ORACLE_FEATURES` -- duration, the speaker's
    expressiveness (the factor on every event rate), the drawn utterance offsets ``off_*`` and the
    realised event counts ``n_*`` --, the exposure ``duration * spk_expressive`` (with the counts,
    the sufficient statistic of a Poisson rate) and a one-hot of the utterance ``contour``.

    Args:
        oracle_csv: the oracle file (``benchmark_paths(root).oracle``).
        utt_ids: the utterances, in the row order wanted.

    Returns:
        float64 array [N, len(ORACLE_FEATURES) + 1 + 4].

    Raises:
        DataError: the file is missing or lacks some of the utterances or columns.
    """
    from serray.data.synthetic.benchmark import CONTOURS, ORACLE_FEATURES

    path = Path(oracle_csv)
    if not path.is_file():
        raise DataError(f"oracle file not found: {path} (made by make_corpus(..., preset='benchmark'))")
    df = pd.read_csv(path).set_index("utt_id")
    missing_cols = [c for c in (*ORACLE_FEATURES, "contour") if c not in df.columns]
    if missing_cols:
        raise DataError(f"{path} lacks oracle columns {missing_cols}")
    ids = list(utt_ids)
    missing = [u for u in ids if u not in df.index]
    if missing:
        raise DataError(f"{len(missing)} utterances are not in {path}, e.g. {missing[0]}")
    rows = df.loc[ids]
    num = rows[list(ORACLE_FEATURES)].to_numpy(dtype=np.float64)
    exposure = (rows["duration"] * rows["spk_expressive"]).to_numpy(dtype=np.float64)[:, None]
    contour = (rows["contour"].to_numpy()[:, None] == np.array(CONTOURS)[None, :]).astype(np.float64)
    return np.concatenate([num, exposure, contour], axis=1)


def metadata_features(manifest: pd.DataFrame) -> np.ndarray:
    """Features a classifier must not be able to use: ids, speaker, dialog, timing and session.

    Args:
        manifest: rows of :func:`serray.data.corpora.iemocap.build_manifest` (``utt_id``, ``session``,
            ``dialog``, ``method``, ``gender``, ``start``, ``duration``).

    Returns:
        float64 array [N, 12]: speaker gender, dialog lead gender, impro/script, dialog number,
        script variant, turn number of the speaker in the dialog, start time, duration, and a
        one-hot of the session (which is also its recording channel).
    """
    df = manifest
    dialog = df["dialog"].astype(str)
    num = dialog.str.extract(r"(?:impro|script)(\d+)")[0].astype(float)
    variant = dialog.str.extract(r"script\d+_(\d+)")[0].astype(float).fillna(0.0)
    turn = df["utt_id"].astype(str).str.extract(r"_[FM](\d+)$")[0].astype(float)
    cols = [
        (df["gender"] == "F").astype(float), (dialog.str[5] == "F").astype(float),
        (df["method"] == "impro").astype(float), num, variant, turn,
        df["start"].astype(float), df["duration"].astype(float),
    ]
    session = np.stack([(df["session"] == s).astype(float).to_numpy() for s in range(1, 6)], axis=1)
    return np.concatenate([np.stack([np.asarray(c, dtype=np.float64) for c in cols], axis=1), session],
                          axis=1)


def fit_predict(X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, seed: int = 0,
                C: float = 0.1) -> Tuple[np.ndarray, np.ndarray]:
    """Standardise on the training rows only, then a class-balanced multinomial logistic regression.

    Args:
        X_train: [N_train, F] features.
        y_train: [N_train] integer labels.
        X_test: [N_test, F] features.
        seed: ``random_state`` of the solver (lbfgs is deterministic anyway).
        C: inverse L2 strength on the standardised features (for direct calls; the ablation's
            reference arms choose it per fold on their training sessions, :func:`choose_recipe`).

    Returns:
        ``(pred, proba)``: [N_test] int predicted labels and [N_test, C] probabilities whose
        columns are the sorted distinct labels of ``y_train``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    X_train = np.asarray(X_train, dtype=np.float64)
    X_test = np.asarray(X_test, dtype=np.float64)
    scaler = StandardScaler().fit(X_train)
    clf = LogisticRegression(C=C, class_weight="balanced", max_iter=5000, random_state=seed)
    clf.fit(scaler.transform(X_train), np.asarray(y_train))
    proba = clf.predict_proba(scaler.transform(X_test))
    pred = clf.classes_[np.argmax(proba, axis=1)].astype(np.int64)
    return pred, proba


#: Inverse L2 strengths a reference arm chooses from on its training sessions (never on test data).
C_GRID = (0.01, 0.1, 1.0, 10.0)


def classical_recipes() -> Dict[str, np.ndarray]:
    """Column subsets of :func:`classical_features` a reference arm chooses from: ``mean_std`` (the plain
    recipe: per-band mean and standard deviation of log-mel, MFCC and energy) and ``all`` (with the
    10th / 50th / 90th percentiles too)."""
    blocks = [(0, _N_MELS), (5 * _N_MELS, _N_CEPS), (5 * (_N_MELS + _N_CEPS), 1)]
    mean_std = np.concatenate([np.arange(start, start + 2 * width) for start, width in blocks])
    return {"mean_std": mean_std, "all": np.arange(5 * (_N_MELS + _N_CEPS + 1))}


def choose_recipe(X: np.ndarray, y: np.ndarray, groups: np.ndarray, C_grid: Sequence[float] = C_GRID,
                  columns: Optional[Dict[str, np.ndarray]] = None, seed: int = 0) -> Dict[str, object]:
    """The feature subset and C with the best mean UA in a leave-one-group-out cross-validation over
    ``groups`` (a fold's training sessions: every labelled row of them, never the test session).

    A grouped cross-validation over the training sessions uses every training row to choose, where
    the validation speakers alone are few (one speaker of 34 utterances per fold on the built-in
    corpus) and choose noisily. Ties: the stronger regularisation, then the first subset.

    Returns:
        ``{"columns", "C", "val_ua"}`` (``val_ua``: the chosen recipe's cross-validated UA).
    """
    from serray.train.metrics import classification_metrics

    X, y, groups = np.asarray(X, dtype=np.float64), np.asarray(y), np.asarray(groups)
    columns = columns or {"all": np.arange(X.shape[1])}
    splits = [(groups != g, groups == g) for g in np.unique(groups)]
    if len(splits) < 2:
        raise DataError("choosing a reference recipe needs at least two training sessions")
    best = None
    for name, cols in columns.items():
        for C in sorted(C_grid):
            uas = [classification_metrics(y[te], fit_predict(X[tr][:, cols], y[tr], X[te][:, cols], seed=seed, C=C)[0])["ua"]
                   for tr, te in splits]
            ua = float(np.mean(uas))
            if best is None or ua > best[0] + 1e-12:
                best = (ua, name, C)
    return {"columns": best[1], "C": best[2], "val_ua": best[0]}


def loso_ua(X: np.ndarray, y: np.ndarray, sessions: np.ndarray, seed: int = 0, C: float = 0.1,
            folds: Optional[Sequence[int]] = None) -> Dict[int, float]:
    """Leave-one-session-out UA (mean per-class recall) of :func:`fit_predict`.

    Args:
        X: [N, F] features.
        y: [N] integer labels.
        sessions: [N] session of every row.
        seed: passed to :func:`fit_predict`.
        C: passed to :func:`fit_predict`.
        folds: held-out sessions (default: every session present).

    Returns:
        ``{held-out session: UA on it}``.
    """
    from serray.train.metrics import classification_metrics

    X, y, sessions = np.asarray(X), np.asarray(y), np.asarray(sessions)
    out = {}
    for s in (folds if folds is not None else sorted(np.unique(sessions).tolist())):
        test = sessions == s
        pred, _ = fit_predict(X[~test], y[~test], X[test], seed=seed, C=C)
        out[int(s)] = classification_metrics(y[test], pred)["ua"]
    return out
