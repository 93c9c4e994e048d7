"""openSMILE's emotion feature sets: the eGeMAPS / ComParE frame encoder and utterance functionals."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from serray.data.encoders import BUILTIN_ENCODERS, OpenSmileEncoder, build_encoder, describe_encoder


def _tone(seconds: float, f0: float = 140.0, sr: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(int(f0))
    return (0.2 * np.sin(2 * np.pi * f0 * t * (1 + 0.05 * np.sin(3 * t))) + 0.01 * rng.normal(size=len(t))).astype(np.float32)


@pytest.mark.parametrize("name,dim", [("egemaps", 25), ("compare", 65)])
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


def test_egemaps_functionals_are_88_deterministic_and_tell_pitch_apart(tmp_path):
    from serray.data.opensmile_features import functionals

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
    from serray.data.opensmile_features import functionals
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
