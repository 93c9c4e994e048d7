"""openSMILE's emotion feature sets: the eGeMAPS / ComParE frame encoder and utterance functionals."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from serray.data.features.encoders import BUILTIN_ENCODERS, OpenSmileEncoder, build_encoder, describe_encoder


def _tone(seconds: float, f0: float = 140.0, sr: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(int(f0))
    return (0.2 * np.sin(2 * np.pi * f0 * t * (1 + 0.05 * np.sin(3 * t))) + 0.01 * rng.normal(size=len(t))).astype(np.float32)


@pytest.mark.parametrize("name,dim", [("egemaps", 26), ("compare", 66)])  # the descriptors + the voicing channel
def test_lld_encoder_frames_dims_and_batch_invariance(name, dim):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"name": name, "layers": [], "sample_rate": 16000, "num_mel_bins": 80,
                            "local_files_only": True, "device": "cpu"})
    enc = build_encoder(cfg)
    assert isinstance(enc, OpenSmileEncoder) and describe_encoder(cfg) == enc.identity()
    assert enc.identity() == {"encoder": name, "layers": [], "dim": dim, "num_layers": 1, "frame_rate": 100.0,
                              "sample_rate": 16000}
    wavs = [_tone(s, f) for s, f in ((0.3, 120), (1.0, 200), (2.0, 160))]
    together = enc.encode(wavs)
    for w, f in zip(wavs, together):
        assert f.shape == (enc.num_frames(len(w)), dim) and np.isfinite(f).all()
        np.testing.assert_array_equal(f, enc.encode([w])[0])  # each signal alone: the batch does not matter
    assert enc.num_frames(32000) == 196 and enc.num_frames(799) == 0
    assert name in BUILTIN_ENCODERS


def _voiced_then_silent(sr: int = 16000, f0: float = 110.0) -> np.ndarray:
    """0.5 s of silence, 1 s of a harmonic voice at ``f0``, 0.5 s of silence."""
    t = np.arange(sr) / sr
    voice = sum(np.sin(2 * np.pi * h * f0 * t) / h for h in range(1, 8)) * 0.1
    return np.concatenate([np.zeros(sr // 2), voice, np.zeros(sr // 2)]).astype(np.float32)


def test_lld_sentinels_are_replaced_before_any_statistic_and_voicing_is_a_channel():
    """openSMILE writes 0 (F0, jitter, shimmer, HNR, H1-H2, H1-A3) and -201 (formant amplitudes) in
    unvoiced frames; the encoder interpolates them from the voiced frames, says voicing in its own
    channel, and gives NaN (missing, not 0) to an utterance with no voiced frame."""
    from serray.data.features.opensmile import RAW_LLD_DIMS, SENTINEL_COLUMNS, smile_for

    enc = OpenSmileEncoder("egemaps")
    wav = _voiced_then_silent()
    raw = smile_for("egemaps", "LowLevelDescriptors").process_signal(wav, 16000)
    f0_raw = raw["F0semitoneFrom27.5Hz_sma3nz"].to_numpy()
    assert (f0_raw == 0).sum() > 50 and (raw["F1amplitudeLogRelF0_sma3nz"].to_numpy() == -201).any()  # the sentinels exist
    x = enc.encode([wav])[0]
    assert x.shape == (len(raw), RAW_LLD_DIMS["egemaps"] + 1)
    voiced = x[:, -1]
    np.testing.assert_array_equal(voiced, (f0_raw > 0).astype(np.float32))
    for col in SENTINEL_COLUMNS["egemaps"][1]:
        v = x[:, raw.columns.get_loc(col)]
        assert np.isfinite(v).all() and not (v == 0).any() and (v > -200).all(), col
    f0 = x[:, raw.columns.get_loc("F0semitoneFrom27.5Hz_sma3nz")]
    expected = 12 * np.log2(110 / 27.5)  # 24 semitones
    assert abs(np.median(f0) - expected) < 1.0 and abs(f0[0] - expected) < 1.5  # unvoiced start: the first voiced value
    # a descriptor that is not a sentinel column (loudness) is left as openSMILE wrote it
    np.testing.assert_allclose(x[:, 0], raw["Loudness_sma3"].to_numpy(), rtol=1e-6)
    silent = enc.encode([np.zeros(16000, dtype=np.float32) + 1e-4 * np.random.default_rng(0).normal(size=16000).astype(np.float32)])[0]
    cols = [raw.columns.get_loc(c) for c in SENTINEL_COLUMNS["egemaps"][1]]
    assert np.isnan(silent[:, cols]).all() and (silent[:, -1] == 0).all()
    others = np.delete(silent, cols, axis=1)
    assert np.isfinite(others).all()


def test_fbank_pitch_tracks_log_f0_on_the_fbank_grid_for_low_and_high_voices():
    """fbank_pitch = Kaldi fbank (unchanged) + log-F0 in semitones + voicing probability, frame for frame:
    a 2-semitone step is 2 semitones for a 100 Hz voice as for a 220 Hz one (the log-mel barely shows it
    for the low voice)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"name": "fbank_pitch", "layers": [], "sample_rate": 16000, "num_mel_bins": 40,
                            "local_files_only": True, "device": "cpu"})
    enc = build_encoder(cfg)
    assert describe_encoder(cfg) == enc.identity() and enc.dim == 42 and "fbank_pitch" in BUILTIN_ENCODERS
    plain = build_encoder(OmegaConf.merge(cfg, {"name": "fbank"}))
    for f0 in (100.0, 220.0):
        low, high = _voiced_then_silent(f0=f0), _voiced_then_silent(f0=f0 * 2 ** (2 / 12))
        a, b = enc.encode([low, high])
        assert a.shape == (plain.num_frames(len(low)), 42)
        np.testing.assert_array_equal(a[:, :40], plain.encode([low])[0])  # the filterbank is fbank's
        mid = slice(70, 130)  # inside the voiced second
        assert np.median(a[mid, 40]) == pytest.approx(12 * np.log2(f0 / 27.5), abs=0.5)
        assert np.median(b[mid, 40] - a[mid, 40]) == pytest.approx(2.0, abs=0.3)
        assert np.median(a[mid, 41]) > 0.5 > np.median(a[:30, 41])  # voicing probability: voiced vs silence
        assert np.isfinite(a).all()


def test_egemaps_functionals_are_88_deterministic_and_tell_pitch_apart(tmp_path):
    from serray.data.features.opensmile import functionals

    paths = []
    for i, f0 in enumerate((110, 110, 240)):
        p = tmp_path / f"{i}.wav"
        sf.write(p, _tone(1.5, f0), 16000)
        paths.append(p)
    x = functionals(paths, "egemaps")
    assert x.shape == (3, 88) and np.isfinite(x).all()
    np.testing.assert_array_equal(x, functionals(paths, "egemaps"))
    # the first functional is the mean F0 (semitones from 27.5 Hz): one octave higher is ~12 semitones up
    assert x[2, 0] - x[0, 0] == pytest.approx(12 * np.log2(240 / 110), abs=1.0)


def test_unknown_feature_set_and_wrong_keys_are_config_errors():
    from serray.config import load_config
    from serray.data.features.opensmile import functionals
    from serray.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown openSMILE feature set 'gemaps'"):
        functionals([], "gemaps")
    with pytest.raises(ConfigError, match="ablate.classical_features must be stats, egemaps or compare"):
        load_config(None, ["ablate.classical_features=mfcc"])


def test_classical_arm_on_egemaps_chooses_C_on_training_sessions_and_learns(featurized):
    """The ablation's ``classical`` arm with ``ablate.classical_features=egemaps`` on the shared tiny
    corpus: every test utterance of the fold predicted once, C chosen by the training sessions'
    cross-validation, and the synthetic corpus's prosodic cues learned (UA well above chance)."""
    from serray.config import derive
    from serray.train.ablation import _reference_arms
    from serray.train.folds import fold_split
    from serray.train.stats import run_metrics

    cfg = derive(featurized, ["ablate.arms=[classical]", "ablate.classical_features=egemaps"])
    out, val = _reference_arms(cfg, [0], [1], echo=lambda *_: None)
    (key, preds), = out.items()
    assert key[0] == "classical"
    test = fold_split(cfg, 1)["test"]
    assert sorted(preds["utt_id"]) == sorted(test["utt_id"])
    (vkey, v), = val.items()
    assert 0.25 < v[(0, 1)] <= 1.0  # the chosen C's cross-validated UA over sessions 2-5
    ua = run_metrics(preds)[0]["ua"]
    assert ua > 0.45, ua
    # the run is on disk beside the neural arms' runs, so other studies can pair with it utterance by utterance
    import json
    from pathlib import Path

    import pandas as pd

    from serray.train.ablation import reference_dir

    fold_dir = Path(reference_dir(cfg.output_dir, "classical", 1.0, 0)) / "fold1"
    assert fold_dir == Path(cfg.output_dir) / "ablation" / "classical" / "frac1" / "seed0" / "fold1"
    on_disk = pd.read_csv(fold_dir / "predictions.csv", dtype={"utt_id": str})
    pd.testing.assert_frame_equal(on_disk, preds[["utt_id", "label", "pred"]].reset_index(drop=True))
    record = json.loads((fold_dir / "reference.json").read_text())
    assert record["val_ua"] == pytest.approx(v[(0, 1)]) and record["features"] == "egemaps"
    assert record["C"] > 0 and (record["seed"], record["fold"]) == (0, 1)
