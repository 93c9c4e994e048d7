"""openSMILE's feature sets made for emotion (audEERING's maintained ``opensmile`` package).

* :func:`functionals` -- the utterance-level eGeMAPS v02 (88 features) or ComParE 2016 (6,373)
  functionals: the field's standard baseline with a linear classifier (the ``classical`` arm with
  ``ablate.classical_features: egemaps``, and the reference column of ``serray evaluate``);
* :class:`serray.data.features.encoders.OpenSmileEncoder` -- their frame-level low-level descriptors (eGeMAPS 25, ComParE 65, at
  100 frames/s) as a frozen encoder (``encoder.name: egemaps`` / ``compare``), so the adapter can be
  tried on features made for emotion, cleaned by :func:`clean_llds` (below) and with a voicing
  channel added (26 / 66 per frame);
* :func:`pitch_track` -- log-F0 and voicing probability per 10 ms frame from openSMILE's
  sub-harmonic-summation pitch tracker (ComParE 2016's pitch chain), the two prosody channels of the
  ``fbank_pitch`` encoder.

openSMILE processes each signal alone, so the features of an utterance do not depend on its batch.

**Sentinels.** openSMILE writes the voice-quality descriptors only where it finds voicing
(``_sma3nz`` / ``_sma`` of the F0 path): in an unvoiced frame F0, jitter, shimmer, HNR and the
harmonic differences are 0 and the formant amplitudes relative to F0 are -201 (or an amplitude
relative to an F0 of 0). Fed to global CMVN as they are, the F0 column becomes mostly a voicing flag
(a class effect of 2-3.5 semitones shrinks to about 0.2 sd) and a pooled mean of F0 mixes the pause
rate with the pitch. :func:`clean_llds` replaces them before any statistic is taken: each such
column is interpolated linearly over the utterance's unvoiced frames from its voiced ones (held
flat before the first and after the last), a 0/1 voicing channel keeps what the sentinel said, and
an utterance with no voiced frame at all gets NaN there, which the NaN-aware statistics and
:class:`serray.models.wap.FeatureNorm` treat as missing (the pool's mean after normalisation).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Dict, Sequence

import numpy as np

from serray.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

#: ``encoder.name`` / ``ablate.classical_features`` -> openSMILE feature set name.
FEATURE_SETS: Dict[str, str] = {"egemaps": "eGeMAPSv02", "compare": "ComParE_2016"}
#: Low-level descriptor widths as openSMILE writes them.
RAW_LLD_DIMS: Dict[str, int] = {"egemaps": 25, "compare": 65}
#: Per feature set: the column whose 0 marks an unvoiced frame, and the columns that hold a sentinel
#: there (openSMILE's names; measured on the synthetic corpora and checked in tests/data/test_opensmile.py).
SENTINEL_COLUMNS: Dict[str, tuple] = {
    "egemaps": ("F0semitoneFrom27.5Hz_sma3nz",
                ("F0semitoneFrom27.5Hz_sma3nz", "jitterLocal_sma3nz", "shimmerLocaldB_sma3nz", "HNRdBACF_sma3nz",
                 "logRelF0-H1-H2_sma3nz", "logRelF0-H1-A3_sma3nz", "F1amplitudeLogRelF0_sma3nz",
                 "F2amplitudeLogRelF0_sma3nz", "F3amplitudeLogRelF0_sma3nz")),
    "compare": ("F0final_sma", ("F0final_sma", "jitterLocal_sma", "jitterDDP_sma", "shimmerLocal_sma")),
}
#: The encoder's width: the descriptors plus the voicing channel.
LLD_DIMS: Dict[str, int] = {k: v + 1 for k, v in RAW_LLD_DIMS.items()}
FRAME_RATE = 100.0  # openSMILE's LLDs: 10 ms hop ...
FIRST_FRAME = 800  # ... the first frame needs 50 ms at 16 kHz (measured: 32,000 samples -> 196 frames)


def lld_frames(num_samples: int, sample_rate: int = 16000) -> int:
    """LLD frames openSMILE gives a signal (shorter than one window: 0, it would fill NaN)."""
    first, hop = int(FIRST_FRAME * sample_rate / 16000), int(sample_rate / FRAME_RATE)
    return 0 if num_samples < first else 1 + (num_samples - first) // hop


def smile_for(name: str, level: str):
    """An ``opensmile.Smile`` of feature set ``name`` (``egemaps`` / ``compare``) at ``level``."""
    if name not in FEATURE_SETS:
        raise ConfigError(f"unknown openSMILE feature set {name!r}; known: {', '.join(FEATURE_SETS)}")
    try:
        import opensmile
    except ImportError:  # pragma: no cover - a declared dependency
        raise ConfigError("openSMILE features need the `opensmile` package: pip install opensmile") from None
    return opensmile.Smile(feature_set=getattr(opensmile.FeatureSet, FEATURE_SETS[name]),
                           feature_level=getattr(opensmile.FeatureLevel, level))


def functionals(paths: Sequence[str | Path], name: str = "egemaps", sample_rate: int = 16000) -> np.ndarray:
    """Utterance functionals [N, 88] (eGeMAPS) or [N, 6373] (ComParE) of audio files, float64.

    Files are decoded like everything else in serray (:func:`serray.data.audio.load_audio`: mono,
    ``sample_rate``), then handed to openSMILE as signals.

    Raises:
        AudioError: a file is missing or unreadable.
    """
    from serray.data.audio import load_audio

    smile = smile_for(name, "Functionals")
    rows = [smile.process_signal(load_audio(p, sample_rate), sample_rate).to_numpy()[0] for p in paths]
    x = np.asarray(rows, dtype=np.float64)
    return np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def interpolate_unvoiced(values: np.ndarray, voiced: np.ndarray) -> np.ndarray:
    """``values`` [T] (or [T, C]) with the unvoiced frames replaced by a linear interpolation between
    the voiced ones (the first / last voiced value held before / after them); NaN where no frame is voiced."""
    values = np.asarray(values, dtype=np.float32)
    out = np.full_like(values, np.nan)
    idx = np.flatnonzero(voiced)
    if len(idx) == 0:
        return out
    t = np.arange(len(values))
    if values.ndim == 1:
        return np.interp(t, idx, values[idx]).astype(np.float32)
    for c in range(values.shape[1]):
        out[:, c] = np.interp(t, idx, values[idx, c])
    return out


SENTINEL_FLOOR = -200.0  # openSMILE's formant amplitudes relative to a missing F0 are -201


def clean_llds(frame: "pd.DataFrame", name: str) -> np.ndarray:
    """The encoder's frames [T, raw + 1] (float32) from openSMILE's LLD frame: each sentinel column
    interpolated over the frames where it has no value (:func:`interpolate_unvoiced`: unvoiced frames,
    and voiced ones where openSMILE still wrote its sentinel, e.g. jitter at a voicing onset, which
    needs two periods), a 0/1 voicing channel last, other NaN / inf (openSMILE's own) as 0."""
    f0_col, cols = SENTINEL_COLUMNS[name]
    x = np.nan_to_num(frame.to_numpy(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    voiced = x[:, frame.columns.get_loc(f0_col)] > 0
    for c in cols:
        i = frame.columns.get_loc(c)
        x[:, i] = interpolate_unvoiced(x[:, i], voiced & (x[:, i] != 0) & (x[:, i] > SENTINEL_FLOOR))
    return np.concatenate([x, voiced[:, None].astype(np.float32)], axis=1)


#: openSMILE's pitch chain of ComParE 2016 alone (sub-harmonic summation, Viterbi smoothing: F0 from
#: 52 to 620 Hz and a voicing probability; ``serray/data/features/opensmile_pitch.conf``). Its frame ``i`` is
#: the 60 ms from ``i`` x 10 ms, centred 30 ms in; the fbank's frame ``j`` (25 ms from ``j`` x 10 ms) is
#: centred 12.5 ms in, so it takes the pitch frame centred nearest to it, ``j - 2`` (held at the ends).
PITCH_CONFIG = Path(__file__).with_name("opensmile_pitch.conf")
PITCH_LAG = 2
_PITCH_COLUMNS = ("F0final_sma", "voicingFinalUnclipped_sma")


def pitch_smile():
    """The ``opensmile.Smile`` of :data:`PITCH_CONFIG`."""
    import opensmile

    return opensmile.Smile(feature_set=str(PITCH_CONFIG), feature_level="lld")


def pitch_track(wav: np.ndarray, sample_rate: int, num_frames: int, smile=None) -> np.ndarray:
    """``[num_frames, 2]`` float32 on the fbank's frame grid: log-F0 in semitones above 27.5 Hz (the
    eGeMAPS scale) and the voicing probability, from openSMILE's SHS pitch tracker
    (:data:`PITCH_CONFIG`).

    F0 is interpolated over unvoiced frames (:func:`interpolate_unvoiced`; NaN in an utterance with no
    voiced frame), so the channel says pitch and the voicing channel says voicing: an unvoiced 0 never
    reaches a statistic.
    """
    import warnings

    smile = smile or pitch_smile()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        df = smile.process_signal(np.asarray(wav, dtype=np.float32), sample_rate)
    x = np.nan_to_num(df[list(_PITCH_COLUMNS)].to_numpy(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if len(x) == 0:  # shorter than one 60 ms frame
        x = np.zeros((1, 2))
    idx = np.clip(np.arange(num_frames) - PITCH_LAG, 0, len(x) - 1)
    f0, prob = x[idx, 0], x[idx, 1]
    voiced = f0 > 0
    semitones = np.where(voiced, 12.0 * np.log2(np.maximum(f0, 1e-3) / 27.5), 0.0)
    return np.stack([interpolate_unvoiced(semitones, voiced), prob], axis=1).astype(np.float32)


def identity(name: str, sample_rate: int) -> dict:
    return {"encoder": name, "layers": [], "dim": LLD_DIMS[name], "num_layers": 1, "frame_rate": FRAME_RATE,
            "sample_rate": sample_rate}
