"""Tests for the reference baselines (serray.train.baselines): features and the logistic-regression arm.

Their use on the synthetic benchmark (classical >> chance, metadata at chance, oracle as a ceiling)
is tested in tests/data/test_synthetic_benchmark.py.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from serray.train.baselines import (C_GRID, CLASSICAL_STATS, classical_features, classical_recipes, fit_predict,
                              choose_recipe, loso_ua, metadata_features, oracle_features)
from serray.data.synthetic.benchmark import CONTOURS, ORACLE_FEATURES
from serray.errors import AudioError, DataError

SR = 16000


def _tone(freq: float, seconds: float = 1.0, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    noise = np.random.default_rng(seed).standard_normal(len(t))
    return 0.1 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t)) + 0.003 * noise


@pytest.fixture
def wavs(tmp_path):
    x, y = _tone(440.0), _tone(1800.0, seed=1)
    paths = []
    for name, sig in (("a", x), ("a_loud", 2 * x), ("b", y)):
        p = tmp_path / f"{name}.wav"
        sf.write(str(p), sig, SR, subtype="FLOAT")
        paths.append(str(p))
    sf.write(str(tmp_path / "a.flac"), x, SR, subtype="PCM_16")
    return paths + [str(tmp_path / "a.flac")]


def test_classical_features_values(wavs):
    X = classical_features(wavs)
    n_frames = 1 + (SR - 400) // 160
    assert X.shape == (4, 5 * 54) and np.isfinite(X).all() and n_frames == 98
    a, loud, b, a_flac = X
    mel = lambda v, stat: v[40 * CLASSICAL_STATS.index(stat):40 * (CLASSICAL_STATS.index(stat) + 1)]
    mfcc = lambda v, stat: v[200 + 13 * CLASSICAL_STATS.index(stat):200 + 13 * (CLASSICAL_STATS.index(stat) + 1)]
    energy = lambda v: v[265:270]
    # twice the amplitude = +ln(4) on every log energy; spreads and the cepstral shape do not move
    assert np.allclose(energy(loud) - energy(a), [np.log(4), 0, np.log(4), np.log(4), np.log(4)], atol=1e-3)
    assert np.allclose(mel(loud, "mean") - mel(a, "mean"), np.log(4), atol=2e-3)
    assert np.allclose(mel(loud, "std"), mel(a, "std"), atol=2e-3)
    assert np.allclose(mfcc(loud, "mean")[1:], mfcc(a, "mean")[1:], atol=1e-2)
    assert mfcc(loud, "mean")[0] - mfcc(a, "mean")[0] == pytest.approx(np.log(4) * np.sqrt(40), abs=0.02)
    # the loudest mel band follows the tone; p10 <= p50 <= p90 everywhere
    assert np.argmax(mel(b, "mean")) > np.argmax(mel(a, "mean")) + 5
    for v in X:
        assert (mel(v, "p10") <= mel(v, "p50") + 1e-9).all() and (mel(v, "p50") <= mel(v, "p90") + 1e-9).all()
    # FLAC / 16-bit input reads the same (to quantisation)
    assert np.allclose(a_flac, a, atol=0.05)
    assert np.array_equal(classical_features(wavs[:1]), X[:1])          # deterministic


def test_classical_features_resamples_and_rejects_bad_audio(tmp_path, wavs):
    sig = _tone(440.0)
    sf.write(str(tmp_path / "a8k.wav"), sig[::2], SR // 2, subtype="FLOAT")
    a8, a16 = classical_features([str(tmp_path / "a8k.wav"), wavs[0]])
    energy = slice(265, 270)
    assert np.allclose(a8[energy][[0, 2, 3, 4]], a16[energy][[0, 2, 3, 4]], atol=0.2)
    with pytest.raises(AudioError):
        classical_features([str(tmp_path / "missing.wav")])


def _oracle_csv(path, rows):
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _oracle_row(utt, label, contour, k):
    row = {"utt_id": utt, "session": 1, "label": label, "contour": contour, "events": "laugh@0.1+0.3"}
    for j, c in enumerate(ORACLE_FEATURES):
        row[c] = float(k * 10 + j)
    return row


def test_oracle_features_values(tmp_path):
    rows = [_oracle_row("u1", "hap", "final_rise", 1), _oracle_row("u2", "sad", "fall", 2),
            _oracle_row("u3", "ang", "flat", 3)]
    path = _oracle_csv(tmp_path / "oracle.csv", rows)
    X = oracle_features(path, ["u3", "u1"])
    nf = len(ORACLE_FEATURES)
    assert X.shape == (2, nf + 1 + len(CONTOURS))
    assert np.array_equal(X[:, :nf], [[30.0 + j for j in range(nf)], [10.0 + j for j in range(nf)]])
    d, e = ORACLE_FEATURES.index("duration"), ORACLE_FEATURES.index("spk_expressive")
    assert X[0, nf] == (30.0 + d) * (30.0 + e)                            # exposure
    assert np.array_equal(X[:, nf + 1:], [[0, 0, 0, 1], [0, 0, 1, 0]])    # flat, final_rise
    # the label never enters
    relabelled = _oracle_csv(tmp_path / "o2.csv", [{**r, "label": "neu"} for r in rows])
    assert np.array_equal(oracle_features(relabelled, ["u3", "u1"]), X)
    with pytest.raises(DataError, match="u9"):
        oracle_features(path, ["u1", "u9"])
    with pytest.raises(DataError, match="not found"):
        oracle_features(tmp_path / "nope.csv", ["u1"])
    with pytest.raises(DataError, match="n_laugh"):
        _oracle_csv(tmp_path / "o3.csv", [{k: v for k, v in r.items() if k != "n_laugh"} for r in rows])
        oracle_features(tmp_path / "o3.csv", ["u1"])


def test_metadata_features_values():
    df = pd.DataFrame({
        "utt_id": ["Ses01F_impro03_M002", "Ses04M_script02_1_F010"], "session": [1, 4],
        "dialog": ["Ses01F_impro03", "Ses04M_script02_1"], "method": ["impro", "script"],
        "gender": ["M", "F"], "start": [12.5, 3.25], "duration": [2.0, 4.5]})
    X = metadata_features(df)
    assert np.array_equal(X, [[0, 1, 1, 3, 0, 2, 12.5, 2.0, 1, 0, 0, 0, 0],
                              [1, 0, 0, 2, 1, 10, 3.25, 4.5, 0, 0, 0, 1, 0]])


def _blobs(seed=0, n=(60, 60, 60), labels=(0, 2, 5), spread=0.5):
    rng = np.random.default_rng(seed)
    centres = np.array([[0, 0, 0], [4, 0, 0], [0, 4, 0]], dtype=float)
    X = np.concatenate([c + spread * rng.standard_normal((k, 3)) for c, k in zip(centres, n)])
    y = np.concatenate([np.full(k, lab) for lab, k in zip(labels, n)])
    return X, y


def test_fit_predict_values():
    X, y = _blobs()
    Xt, yt = _blobs(seed=1)
    pred, proba = fit_predict(X, y, Xt, seed=0)
    assert pred.dtype == np.int64 and proba.shape == (len(Xt), 3)
    assert np.array_equal(pred, yt)                                       # separable: all right
    assert np.allclose(proba.sum(axis=1), 1.0)
    assert np.array_equal(np.array([0, 2, 5])[proba.argmax(axis=1)], pred)  # columns = sorted labels
    # deterministic, standardised on the training rows only: test rows do not change anything,
    # and rescaling a feature (train and test alike) does not either
    p2, q2 = fit_predict(X, y, np.concatenate([Xt, 1e6 * np.ones((5, 3))]), seed=0)
    assert np.array_equal(p2[:len(Xt)], pred) and np.allclose(q2[:len(Xt)], proba)
    scale = np.array([1000.0, 1.0, 0.001])
    p3, q3 = fit_predict(X * scale + 7.0, y, Xt * scale + 7.0, seed=0)
    assert np.array_equal(p3, pred) and np.allclose(q3, proba, atol=1e-6)


def test_fit_predict_balances_classes():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    X, y = _blobs(n=(270, 30, 0), labels=(0, 1, 2), spread=2.0)
    Xt, yt = _blobs(seed=1, n=(300, 300, 0), labels=(0, 1, 2), spread=2.0)
    pred, _ = fit_predict(X, y, Xt)
    s = StandardScaler().fit(X)
    plain = LogisticRegression(C=0.1).fit(s.transform(X), y).predict(s.transform(Xt))
    recall = lambda p: np.mean(p[yt == 1] == 1)
    assert recall(pred) > recall(plain) + 0.2 and recall(pred) > 0.7


def test_loso_ua_values():
    X, y = _blobs(n=(90, 90, 90), labels=(0, 1, 2))
    sessions = np.tile([1, 2, 3], 90)
    assert loso_ua(X, y, sessions) == {1: 1.0, 2: 1.0, 3: 1.0}
    rng = np.random.default_rng(0)
    noise = loso_ua(rng.standard_normal((600, 4)), rng.integers(0, 4, 600), np.repeat([1, 2, 3], 200))
    assert set(noise) == {1, 2, 3} and abs(np.mean(list(noise.values())) - 0.25) < 0.06
    assert loso_ua(X, y, sessions, folds=[2]).keys() == {2}


def test_the_recipe_is_chosen_by_cross_validation_over_the_training_sessions_only():
    """C (and the feature subset) maximise the mean UA of a leave-one-session-out cross-validation over
    the rows given (a fold's training sessions); nothing else is looked at."""
    from serray.train.metrics import classification_metrics

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 240)
    X = rng.standard_normal((240, 30))
    X[:, 0] += 1.5 * y  # one informative column among 29 of noise
    groups = np.repeat([2, 3, 4, 5], 60)
    cols = {"first": np.arange(3), "all": np.arange(30)}
    choice = choose_recipe(X, y, groups, columns=cols)

    def cv(name, C):
        c = cols[name]
        return np.mean([classification_metrics(y[groups == g], fit_predict(X[groups != g][:, c], y[groups != g],
                                                                           X[groups == g][:, c], C=C)[0])["ua"]
                        for g in (2, 3, 4, 5)])

    scores = {(n, C): cv(n, C) for n in cols for C in C_GRID}
    assert choice["val_ua"] == pytest.approx(max(scores.values()))
    assert scores[(choice["columns"], choice["C"])] == pytest.approx(max(scores.values()))
    assert choice["columns"] == "first"  # the subset that holds the signal, found without test data
    with pytest.raises(DataError, match="at least two training sessions"):
        choose_recipe(X[:60], y[:60], groups[:60])


def test_classical_recipes_pick_mean_and_std_of_every_block():
    r = classical_recipes()
    assert len(r["all"]) == 270 and len(r["mean_std"]) == 2 * 54
    assert list(r["mean_std"][:80]) == list(range(80))       # log-mel mean, std
    assert list(r["mean_std"][80:106]) == list(range(200, 226))  # MFCC mean, std
    assert list(r["mean_std"][106:]) == [265, 266]           # energy mean, std
