"""Synthetic speech-emotion corpus in the exact layout of ``IEMOCAP_full_release``.

IEMOCAP is licensed, so tests, CI and demos run on a small generated stand-in that a correct
IEMOCAP parser reads exactly like the real thing::

    <root>/Session1 ... <root>/Session5
        sentences/wav/<dialog>/<utt_id>.wav        utterance audio, 16 kHz mono PCM_16
        dialog/EmoEvaluation/<dialog>.txt          per-utterance labels and V/A/D
        dialog/EmoEvaluation/Categorical/...       (noise: per-evaluator files)
        dialog/EmoEvaluation/Attribute/...         (noise)
        dialog/EmoEvaluation/Self-evaluation/...   (noise: .anvil XML)
        dialog/transcriptions/<dialog>.txt         (noise: also has non-utterance turns)
        dialog/wav/<dialog>.wav                    (noise: whole-dialog audio, shortened)
        ._<name>                                   (noise: macOS AppleDouble junk, not audio)

This is the ``demo`` preset (the default). ``make_corpus(..., preset="benchmark")`` writes a harder
corpus in the same layout, with frame-local emotion events, per-session channels, IEMOCAP class
imbalance, an unlabelled pool of other speakers and an oracle file: see
:mod:`serray.data.synthetic.benchmark`.

Both actors of a session speak in every dialog: ``Ses01F_impro01_M000`` is the *male* actor of
session 1 although the dialog name says ``F``. The speaker is ``Ses0N`` + the letter of the last
field of the utterance id.

The audio is a numpy source-filter synthesis (Rosenberg glottal pulses on a continuously varying
f0 contour, aspiration noise, per-syllable vowel formant resonators, syllable envelopes, pauses,
consonant noise bursts, spectral tilt, background noise). Emotion changes the prosody and voice
quality (pitch level/range, energy, speaking rate, spectral tilt, jitter/shimmer, breathiness)
with a large per-utterance spread, and every one of the 10 speakers has its own voice (base f0,
vocal-tract length, loudness, tilt), so emotion is learnable from audio alone, on unseen
speakers, but not trivially. The valence / arousal / dominance annotations are what the audio
carries too (:func:`_perceived_vad`: arousal from energy and rate, valence from the f0 contour and
rough-voice events, dominance from level and pitch range, plus expression noise and the evaluators'
integer ratings), so a dimensional model can learn them; they have their own RNG, so the audio and
the labels are the same as before they existed.

Everything is deterministic from ``seed``: speaker voices from ``(seed, session, gender)``,
labels from ``(seed, session)``, each utterance's audio from ``(seed, utterance index)`` only.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy.signal import lfilter, sosfilt

from serray.data.synthetic.benchmark import benchmark_paths, make_benchmark_corpus
from serray.data.synthetic.common import (_F4, _VOWELS, LABELS_DROPPED, LABELS_KEPT, N_SESSIONS, _dialog_names,
                                          _moving_average, _resonator_sos, _Utt, _write_text, _write_wav, annotate,
                                          turn_genders, write_dialog)
from serray.errors import ConfigError

__all__ = ["LABELS_KEPT", "LABELS_DROPPED", "N_SESSIONS", "PRESETS", "benchmark_paths", "make_corpus"]

#: ``make_corpus`` presets: ``demo`` (utterance-wide cues, small) and ``benchmark`` (local events,
#: channels, imbalance, unlabelled pool, oracle; :mod:`serray.data.synthetic.benchmark`).
PRESETS = ("demo", "benchmark")


_BASE_CLASSES = ("neu", "hap", "sad", "ang")
_DROPPED_P = {"fru": 0.40, "xxx": 0.20, "sur": 0.10, "oth": 0.10, "fea": 0.10, "dis": 0.10}
# Dropped labels sound like a random mixture of two base classes.
_DROPPED_MIX = {"fru": ("ang", "neu"), "sur": ("hap", "ang"), "fea": ("sad", "hap"),
                "dis": ("ang", "sad"), "oth": None, "xxx": None}

# Class-dependent synthesis means.
#   pitch: semitones relative to the speaker's base f0     range: f0 movement (semitones)
#   energy: dB relative to the speaker's loudness           rate: syllables per second
#   bright: spectral tilt (>0 brighter, <0 darker)          jitter/shimmer/rough: voice quality
#   breath: aspiration-noise ratio                           oq: glottal open quotient
#   pause: probability of a pause after a syllable
_CLASS = {
    "neu": dict(pitch=0.0, range=2.0, energy=0.0, rate=4.2, bright=0.0, jitter=0.006,
                shimmer=0.04, rough=0.00, breath=0.10, oq=0.62, pause=0.12),
    "hap": dict(pitch=3.5, range=4.5, energy=3.5, rate=5.0, bright=0.30, jitter=0.008,
                shimmer=0.05, rough=0.00, breath=0.07, oq=0.55, pause=0.08),
    "exc": dict(pitch=4.0, range=5.0, energy=4.5, rate=5.3, bright=0.40, jitter=0.010,
                shimmer=0.06, rough=0.02, breath=0.06, oq=0.52, pause=0.07),
    "sad": dict(pitch=-2.0, range=1.2, energy=-6.0, rate=3.2, bright=-0.50, jitter=0.010,
                shimmer=0.06, rough=0.00, breath=0.28, oq=0.72, pause=0.22),
    "ang": dict(pitch=2.0, range=3.0, energy=6.0, rate=5.3, bright=0.65, jitter=0.030,
                shimmer=0.12, rough=0.10, breath=0.05, oq=0.45, pause=0.06),
}
# Their own profiles (used only for the labels a corpus balances over, ``make_corpus(classes=...)``; the
# default corpus keeps them as mixtures, so its audio is what it always was). fru stands for the low-arousal
# classes of the other layouts (EmoDB boredom, RAVDESS calm, MSP-Podcast contempt).
_CLASS_OWN = {
    "fea": dict(pitch=4.5, range=3.5, energy=-1.0, rate=5.6, bright=0.10, jitter=0.022,
                shimmer=0.08, rough=0.00, breath=0.24, oq=0.60, pause=0.16),
    "dis": dict(pitch=-1.5, range=2.8, energy=1.5, rate=3.5, bright=-0.15, jitter=0.012,
                shimmer=0.07, rough=0.07, breath=0.12, oq=0.50, pause=0.18),
    "sur": dict(pitch=5.5, range=7.0, energy=3.0, rate=4.5, bright=0.30, jitter=0.007,
                shimmer=0.05, rough=0.00, breath=0.08, oq=0.56, pause=0.10),
    "fru": dict(pitch=-1.0, range=0.8, energy=-3.0, rate=3.5, bright=-0.30, jitter=0.007,
                shimmer=0.045, rough=0.00, breath=0.16, oq=0.66, pause=0.20),
}
#: Raw labels ``make_corpus(classes=...)`` can balance over (beyond the four, each with its own profile).
CLASSES_OWN = _BASE_CLASSES + tuple(_CLASS_OWN)
# Per-utterance spread: ("add", sd) adds N(0, sd); ("mul", sd) multiplies by lognormal(0, sd).
_SPREAD = {"pitch": ("add", 1.6), "range": ("mul", 0.30), "energy": ("add", 2.5),
           "rate": ("mul", 0.13), "bright": ("add", 0.25), "jitter": ("mul", 0.35),
           "shimmer": ("mul", 0.30), "rough": ("mul", 0.30), "breath": ("mul", 0.35),
           "oq": ("add", 0.04), "pause": ("mul", 0.2)}

@dataclass(frozen=True)
class _Speaker:
    f0: float          # base f0, Hz
    vt: float          # formant scale (shorter vocal tract -> higher)
    loud_db: float     # loudness offset
    bright: float      # tilt offset
    rate: float        # speaking-rate factor
    breath: float      # breathiness factor
    range: float       # pitch-range factor


def _speaker(seed: int, session: int, gender: str) -> _Speaker:
    rng = np.random.default_rng([seed, 0x5BEA, session, 0 if gender == "F" else 1])
    if gender == "F":
        f0, vt = rng.uniform(170.0, 240.0), rng.uniform(1.10, 1.24)
    else:
        f0, vt = rng.uniform(90.0, 140.0), rng.uniform(0.92, 1.06)
    return _Speaker(f0=float(f0), vt=float(vt), loud_db=float(rng.normal(0.0, 2.0)),
                    bright=float(rng.normal(0.0, 0.15)), rate=float(rng.lognormal(0.0, 0.08)),
                    breath=float(rng.lognormal(0.0, 0.25)), range=float(rng.lognormal(0.0, 0.15)))


def _session_labels(seed: int, session: int, n: int, drop_fraction: float,
                    excited_fraction: float, classes: Sequence[str] = _BASE_CLASSES) -> list[str]:
    rng = np.random.default_rng([seed, 0x1ABE, session])
    n_drop = int(round(drop_fraction * n))
    n_keep = n - n_drop
    k = len(classes)
    order = [classes[i] for i in rng.permutation(k)]   # who gets the remainder
    kept = [order[i % k] for i in range(n_keep)]
    hap = [i for i, lab in enumerate(kept) if lab == "hap"]
    n_exc = int(round(excited_fraction * len(hap)))
    for i in rng.choice(hap, size=n_exc, replace=False) if n_exc else []:
        kept[int(i)] = "exc"
    names = [k for k in _DROPPED_P if k not in classes]
    p = np.array([_DROPPED_P[k] for k in names])
    dropped = [names[i] for i in rng.choice(len(names), size=n_drop, p=p / p.sum())]
    labels = kept + dropped
    return [labels[i] for i in rng.permutation(len(labels))]


def _class_params(rng: np.random.Generator, label: str, spk: _Speaker, own: bool = False) -> dict:
    if label in _CLASS:
        mean = dict(_CLASS[label])
    elif own:
        mean = dict(_CLASS_OWN[label])
    else:
        pair = _DROPPED_MIX[label]
        if pair is None:
            pair = tuple(rng.choice(_BASE_CLASSES, size=2, replace=False))
        w = rng.uniform(0.3, 0.7)
        mean = {k: w * _CLASS[pair[0]][k] + (1 - w) * _CLASS[pair[1]][k] for k in _CLASS["neu"]}
    out = {}
    for k, v in mean.items():
        kind, sd = _SPREAD[k]
        out[k] = v + rng.normal(0.0, sd) if kind == "add" else v * rng.lognormal(0.0, sd)
    out["range"] *= spk.range
    out["rate"] *= spk.rate
    out["bright"] += spk.bright
    out["breath"] *= spk.breath
    out["energy"] += spk.loud_db
    out["oq"] = float(np.clip(out["oq"], 0.35, 0.85))
    return out


def _synthesize(rng: np.random.Generator, n: int, sr: int, spk: _Speaker, label: str,
                params_out: dict | None = None, own: bool = False) -> np.ndarray:
    p = _class_params(rng, label, spk, own)
    if params_out is not None:   # the drawn parameters, for the V/A/D annotation (no extra draws)
        params_out.update(p)

    # --- syllable / pause plan (a short Python loop over ~10 syllables; samples are vectorised)
    lead = int(rng.uniform(0.03, 0.10) * sr)
    trail = int(rng.uniform(0.03, 0.10) * sr)
    end = max(lead + 1, n - trail)
    sylls = []                                    # (start, length)
    pos = lead
    while pos < end:
        length = int(sr / p["rate"] * rng.lognormal(0.0, 0.25))
        length = min(max(length, int(0.06 * sr)), end - pos)
        if length < int(0.05 * sr) and sylls:
            break
        sylls.append((pos, max(length, 2)))
        pos += length
        if rng.random() < p["pause"]:
            pos += int(rng.uniform(0.08, 0.30) * sr)
    if not sylls:
        sylls = [(0, n)]
    n_syl = len(sylls)

    voiced_env = np.zeros(n)
    cons_env = np.zeros(n)
    cons_frac = np.where(rng.random(n_syl) < 0.7, rng.uniform(0.12, 0.35, n_syl), 0.0)
    voiced_spans = []
    for (a, length), cf in zip(sylls, cons_frac):
        c = int(cf * length)
        if c > 1:
            cons_env[a:a + c] = np.hanning(c)
        v = length - c
        x = (np.arange(v) + 0.5) / v
        voiced_env[a + c:a + length] = np.sin(np.pi * x) ** 0.6
        voiced_spans.append((a + c, v))

    # --- f0 contour: syllable accents + declination, smoothed, plus jitter per glottal cycle
    centres = np.array([a + v / 2.0 for a, v in voiced_spans])
    decl = np.linspace(0.5, -0.5, n_syl) if n_syl > 1 else np.zeros(1)
    accents = p["range"] * (decl + rng.normal(0.0, 0.55, n_syl))
    knots_x = np.concatenate([[0.0], centres, [n - 1.0]])
    knots_y = np.concatenate([[accents[0]], accents, [accents[-1]]])
    st = np.interp(np.arange(n), knots_x, knots_y)
    st = _moving_average(st, int(0.05 * sr))
    f0 = np.clip(spk.f0 * 2.0 ** ((p["pitch"] + st) / 12.0), 55.0, 520.0)

    cycle0 = np.floor(np.cumsum(f0 / sr)).astype(np.int64)
    n_cyc = int(cycle0[-1]) + 2
    f0 = f0 * (1.0 + p["jitter"] * rng.standard_normal(n_cyc))[cycle0]
    phase = np.cumsum(f0 / sr)
    cycle = np.floor(phase).astype(np.int64)
    phi = phase - cycle
    n_cyc = int(cycle[-1]) + 2

    # --- Rosenberg glottal pulse, its derivative (lip radiation), shimmer and roughness
    tp, tn = 0.6 * p["oq"], 0.4 * p["oq"]
    g = np.where(phi < tp, 0.5 * (1.0 - np.cos(np.pi * phi / tp)),
                 np.where(phi < tp + tn, np.cos(0.5 * np.pi * (phi - tp) / tn), 0.0))
    dg = np.diff(g, prepend=g[0])
    amp = 1.0 + p["shimmer"] * rng.standard_normal(n_cyc)
    amp += p["rough"] * np.where(np.arange(n_cyc) % 2 == 0, 1.0, -1.0)   # period doubling
    dg = dg * np.maximum(amp, 0.05)[cycle]
    dg /= np.sqrt(np.mean(dg[voiced_env > 0.3] ** 2)) + 1e-12 if np.any(voiced_env > 0.3) else 1.0
    aspiration = rng.standard_normal(n) * p["breath"] * (0.4 + 0.6 * g)
    source = (dg + aspiration) * voiced_env

    # --- vowel formants, piecewise per syllable, filtered with overlap-added tails
    tail = int(0.025 * sr)
    y = np.zeros(n + tail)
    vowels = rng.integers(0, len(_VOWELS), n_syl)
    for (a, length), vi in zip(sylls, vowels):
        freqs = np.append(_VOWELS[vi] * rng.uniform(0.94, 1.06, 3), _F4) * spk.vt
        seg = np.concatenate([source[a:a + length], np.zeros(tail)])
        y[a:a + length + tail] += sosfilt(_resonator_sos(freqs, sr), seg)
    y = y[:n]

    # --- consonant bursts (high-passed noise, not shaped by the vowel)
    y_rms = np.sqrt(np.mean(y[voiced_env > 0.3] ** 2)) if np.any(voiced_env > 0.3) else 1.0
    burst = np.diff(rng.standard_normal(n + 1)) * cons_env
    y += burst * y_rms * rng.uniform(0.08, 0.25)

    # --- spectral tilt
    b = p["bright"]
    if b > 0:
        y = lfilter([1.0, -min(0.95, b)], [1.0], y)
    elif b < 0:
        pole = min(0.92, -b)
        y = lfilter([1.0 - pole], [1.0, -pole], y)

    # --- level: active-speech RMS at the class/speaker target, no clipping
    active = (voiced_env > 0.3) | (cons_env > 0.3)
    rms = np.sqrt(np.mean(y[active] ** 2)) if np.any(active) else np.sqrt(np.mean(y ** 2))
    y *= 10.0 ** ((-27.0 + p["energy"]) / 20.0) / (rms + 1e-12)
    peak = np.max(np.abs(y))
    if peak > 0.9:
        y *= 0.9 / peak
    y += rng.standard_normal(n) * 10.0 ** ((-62.0 + rng.normal(0.0, 3.0)) / 20.0)
    return np.clip(y, -0.98, 0.98)


def _perceived_vad(p: dict, spk: _Speaker, rng: np.random.Generator) -> tuple:
    """What a listener hears, on IEMOCAP's 1..5 scale, from an utterance's drawn synthesis
    parameters relative to its speaker's own voice (the speaker offsets are taken back out):

    * arousal from energy (dB) and speaking rate;
    * valence from the f0 contour (pitch level and movement) and rough-voice events;
    * dominance from level and pitch range;

    plus a per-utterance expression noise (sd 0.25) from ``rng``, clipped to 1..5. The weights are
    set by hand so the class means land near IEMOCAP's (``_VAD_MEAN``: angry high arousal and low
    valence, sad low both, happy high valence). The evaluators' integer ratings around this value
    (:func:`serray.data.synthetic.common._annotation_block`) add the annotator spread."""
    energy = p["energy"] - spk.loud_db
    rate = p["rate"] / spk.rate
    movement = np.log(p["range"] / spk.range / 2.5)
    arousal = 2.9 + 0.09 * energy + 1.5 * np.log(rate / 4.5)
    valence = 3.0 + 0.25 * p["pitch"] + 0.6 * movement - 15.0 * p["rough"]
    dominance = 2.9 + 0.10 * energy + 0.3 * movement
    vad = np.array([valence, arousal, dominance]) + rng.normal(0.0, 0.25, 3)
    return tuple(float(x) for x in np.clip(vad, 1.0, 5.0))


def _validate(dialogs_per_session, utterances_per_dialog, min_duration, max_duration,
              sample_rate, drop_fraction, excited_fraction) -> None:
    if int(dialogs_per_session) < 1:
        raise ConfigError(f"dialogs_per_session must be >= 1, got {dialogs_per_session}")
    if int(utterances_per_dialog) < 2:
        raise ConfigError(f"utterances_per_dialog must be >= 2 (both actors speak in every "
                          f"dialog), got {utterances_per_dialog}")
    if not 0.2 <= float(min_duration) <= float(max_duration) <= 60.0:
        raise ConfigError("need 0.2 <= min_duration <= max_duration <= 60 seconds, got "
                          f"min_duration={min_duration}, max_duration={max_duration}")
    if not 8000 <= int(sample_rate) <= 48000:
        raise ConfigError(f"sample_rate must be in [8000, 48000] Hz, got {sample_rate}")
    if not 0.0 <= float(drop_fraction) < 1.0:
        raise ConfigError(f"drop_fraction must be in [0, 1), got {drop_fraction}")
    if not 0.0 <= float(excited_fraction) <= 1.0:
        raise ConfigError(f"excited_fraction must be in [0, 1], got {excited_fraction}")


def make_corpus(out_dir, *, seed: int = 0, dialogs_per_session: int = 4,
                utterances_per_dialog: int = 10, min_duration: float = 1.0,
                max_duration: float = 2.5, sample_rate: int = 16000,
                drop_fraction: float = 0.15, excited_fraction: float = 0.3,
                progress: bool = False, preset: str = "demo", scale: float = 1.0,
                unlabelled_factor: float = 10.0, processes: int | None = None,
                classes: Sequence[str] | None = None) -> Path:
    """Write a synthetic IEMOCAP-layout corpus under ``out_dir`` and return ``Path(out_dir)``.

    ``out_dir`` becomes the IEMOCAP root (``out_dir/Session1`` ... ``out_dir/Session5``).
    Existing files with the same names are overwritten; nothing else is removed. The result is
    byte-identical for the same arguments.

    ``preset="demo"`` (the default): 5 * ``dialogs_per_session`` * ``utterances_per_dialog``
    utterances, about ``drop_fraction`` of them with a dropped label (fru, sur, fea, dis, oth,
    xxx), the rest balanced over neu/hap/sad/ang with ``excited_fraction`` of the happy ones
    labelled ``exc``; emotion is carried by utterance-wide offsets. ``classes`` (raw labels among
    :data:`CLASSES_OWN`; None: the four) balances the kept share over more classes, each beyond the
    four with its own profile (fea, dis, sur, and fru for the low-arousal classes of other layouts),
    so a layout's native classes (``data.classes: native``) are learnable; None writes the corpus as it
    always was, byte for byte.

    ``preset="benchmark"``: frame-local emotion events, weak offsets, per-session channels,
    IEMOCAP class imbalance, an unlabelled pool of other speakers and an oracle file beside
    ``out_dir`` (see :mod:`serray.data.synthetic.benchmark` and :func:`benchmark_paths`). It uses
    ``seed``, ``sample_rate``, ``progress``, ``scale`` (sizes x scale), ``unlabelled_factor``
    (pool duration / four-class duration) and ``processes``; it has its own sizes, durations and
    label shares, so ``dialogs_per_session``, ``utterances_per_dialog``, ``min_duration``,
    ``max_duration``, ``drop_fraction`` and ``excited_fraction`` are ignored.

    Raises:
        ConfigError: an unknown preset or an invalid size.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown synthetic preset {preset!r}: valid presets are "
                          f"{', '.join(PRESETS)}")
    if preset == "benchmark" and classes is not None:
        raise ConfigError("synthetic.classes applies to the demo preset only (the benchmark preset has the four)")
    if preset == "benchmark":
        return make_benchmark_corpus(out_dir, seed=seed, sample_rate=sample_rate, scale=scale,
                                     unlabelled_factor=unlabelled_factor, processes=processes,
                                     progress=progress)
    if scale != 1.0 or unlabelled_factor != 10.0:
        raise ConfigError("scale and unlabelled_factor apply to the benchmark preset only")
    _validate(dialogs_per_session, utterances_per_dialog, min_duration, max_duration,
              sample_rate, drop_fraction, excited_fraction)
    balanced = _BASE_CLASSES if classes is None else tuple(dict.fromkeys(str(c) for c in classes))
    wrong = [c for c in balanced if c not in CLASSES_OWN]
    if wrong or len(balanced) < 2:
        raise ConfigError(f"synthetic.classes: {wrong or list(balanced)}: raw labels among {list(CLASSES_OWN)}, "
                          "at least two")
    seed, sr = int(seed), int(sample_rate)
    dialogs_per_session, utterances_per_dialog = int(dialogs_per_session), int(utterances_per_dialog)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    _write_text(root / "README.txt", [
        "Synthetic speech-emotion corpus in the IEMOCAP_full_release layout,",
        f"generated by serray.data.synthetic.make_corpus(seed={seed}).",
        "The audio is synthetic: it is not IEMOCAP and contains no real speech."])

    index = 0
    for session in range(1, N_SESSIONS + 1):
        speakers = {g: _speaker(seed, session, g) for g in "FM"}
        dialogs = _dialog_names(session, dialogs_per_session)
        labels = _session_labels(seed, session, dialogs_per_session * utterances_per_dialog,
                                 float(drop_fraction), float(excited_fraction), balanced)
        sess_dir = root / f"Session{session}"
        n_written = 0
        for d, dialog in enumerate(dialogs):
            drng = np.random.default_rng([seed, 0xD1A, session, d])
            genders = turn_genders(drng, dialog, utterances_per_dialog)
            counters = {"F": 0, "M": 0}
            utts: list[_Utt] = []
            t = float(drng.uniform(0.5, 4.0))
            for k, g in enumerate(genders):
                urng = np.random.default_rng([seed, 0x077, index, 0])
                dur = float(urng.uniform(float(min_duration), float(max_duration)))
                u = _Utt(index=index, session=session, dialog=dialog,
                         utt_id=f"{dialog}_{g}{counters[g]:03d}", gender=g,
                         label=labels[d * utterances_per_dialog + k],
                         n_samples=int(round(dur * sr)), start=round(t, 4))
                counters[g] += 1
                index += 1
                utts.append(u)
                t = u.start + u.n_samples / sr + float(drng.uniform(0.2, 2.5))

            emo = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
            cat, atr, trans = [], [], []
            first_audio = []
            wav_dir = sess_dir / "sentences" / "wav" / dialog
            for u in utts:
                arng = np.random.default_rng([seed, 0x077, u.index, 1])
                params: dict = {}
                audio = _synthesize(arng, u.n_samples, sr, speakers[u.gender], u.label, params,
                                    own=u.label in balanced)
                # V/A/D from the drawn parameters, with its own RNG: the audio streams are untouched
                u.vad = _perceived_vad(params, speakers[u.gender],
                                       np.random.default_rng([seed, 0x7AD, u.index]))
                _write_wav(wav_dir / f"{u.utt_id}.wav", audio, sr)
                if len(first_audio) < 2:
                    first_audio.append(audio)
                annotate(drng, u, u.start + u.n_samples / sr, emo, cat, atr, trans)
                n_written += 1
            write_dialog(sess_dir, dialog, utts, sr, emo, cat, atr, trans, first_audio, junk=d == 0)
        if progress:
            print(f"[synthetic] Session{session}: {len(dialogs)} dialogs, {n_written} utterances",
                  file=sys.stderr, flush=True)
    return root
