"""The ``benchmark`` preset of the synthetic corpus: frame-local emotion cues, unseen channels, a pool.

``make_corpus(out_dir, preset="benchmark")`` (see :mod:`serray.data.synthetic`) writes, from ``seed``
alone and byte-identically for the same arguments:

* ``out_dir`` -- the ``IEMOCAP_full_release`` tree, in the same layout and annotation format as the
  ``demo`` preset (5 sessions, 2 actors each, EmoEvaluation blocks, AppleDouble junk...). Per session
  8 dialogs and ``ceil(160 / 0.6) = 267`` utterances: **160 four-class** ones with IEMOCAP's class
  shares (neu 50, hap+exc 47 -- 30 of them ``exc``, as 64 % in IEMOCAP --, sad 31, ang 32; the real
  4-class counts are 1708 / 1636 / 1084 / 1103) and **107 (40 %) with labels a 4-class parser
  drops** (``xxx`` 50 %, ``fru`` 40 %, ``sur``, ``fea``, ``oth``, ``dis``), which sound like a
  mixture of two classes and are an in-domain unlabelled pool. Durations: log-normal, median 3.2 s,
  clipped to [1.5, 8] s, independent of the label (as are the dialog, the speaker and the turn order).
* ``<parent>/synthetic_unlabelled/`` (``parent = out_dir.resolve().parent``) -- unlabelled speech of
  *other* speakers (LibriSpeech-style numeric ids, voices drawn from their own random stream; never
  the 10 actors), ``unlabelled_factor`` (default 10) times the duration of the four-class
  utterances, as ``<speaker>/<chapter>/<speaker>-<chapter>-<nnnn>.flac`` with a
  ``<speaker>-<chapter>.trans.txt`` per chapter (random words), a ``SPEAKERS.TXT`` and a
  ``README.txt``; 40 speakers x 2 chapters at full size. Utterances are 3-16 s (median 8 s), each in
  one speaking style drawn from neu 45 %, hap 12 %, exc 6 %, sad 14 %, ang 15 %, fru 8 %, with the
  same local events at that style's rates; every chapter has its own channel.
* ``<parent>/synthetic_oracle.csv`` -- one row per four-class utterance (``utt_id`` key; the rows of
  ``build_manifest(out_dir).kept``) with its synthesis parameters: drawn utterance offsets ``off_*``,
  realised event counts ``n_*`` and spans ``events`` (``kind@start+length;...`` in seconds),
  ``contour``, speaker voice ``spk_*``, session channel ``channel_id`` / ``ch_*``, and the raw
  ``label`` (which is not a feature: see :data:`ORACLE_FEATURES`).
* ``<parent>/synthetic_unlabelled_oracle.csv`` -- the same for the pool (``utt_id`` = file stem,
  ``style`` instead of ``label``).

:func:`benchmark_paths` gives these paths for a release root. Full size (seed 0): 1335 release
utterances (800 four-class, 0.76 h of them), 3176 pool utterances (7.56 h); 151 MB + 469 MB.

What carries the emotion
------------------------
**Local events** (the main cue), drawn per utterance as Poisson counts with mean
``rate[class][event] * duration * speaker expressiveness`` (expressiveness: log-normal, sd 0.3, per
speaker), placed in random order with uniformly random gaps and without overlap; when they do not
fit (replacing events over 60 % of the utterance, or all spans over 95 %) random ones are dropped,
so in the crowded classes about 10-15 % fewer are realised. The oracle has the realised counts.

==========  =====  =====  =====  =====  ======================================================
event       neu    hap    sad    ang    what it is (exc: laugh .65, accent .50, risefall .50)
==========  =====  =====  =====  =====  ======================================================
laugh       0.05   0.50   0.03   0.05   0.25-0.55 s of 2-5 breathy "ha" pulses at +8..+11 st
sigh        0.08   0.04   0.40   0.12   0.35-0.7 s breathy exhale, f0 falling -1 -> -6 st, -5 dB
sob         0.03   0.03   0.30   0.02   0.3-0.5 s: 2-3 inhaled catches + trembling /u/ (7-9 Hz)
accent      0.20   0.35   0.05   0.80   one syllable +5..+9 st and +4..+7 dB (emphatic accent)
creak       0.06   0.03   0.15   0.50   0.15-0.3 s of speech at 38-62 Hz, irregular, pressed
risefall    0.10   0.45   0.04   0.08   0.4-0.7 s hat contour: +4..+7 st rise, then a fall below
==========  =====  =====  =====  =====  ======================================================

(events per second; labels outside the 4 classes mix two classes' rates). ``laugh``, ``sigh`` and
``sob`` replace speech in their span; ``accent``, ``creak`` and ``risefall`` modify the speech under
them. One **utterance contour** per utterance, ``fall`` / ``final_drop`` (the last 30 % of the speech
falls 4-7 st) / ``final_rise`` (the last 25 % rises 3-6 st) / ``flat``, with class probabilities neu
(.45, .15, .25, .15), hap (.30, .10, .45, .15), sad (.25, .50, .05, .20), ang (.35, .35, .05, .25).

**Utterance-wide offsets** are weak and overlap (class means vs per-utterance spread): pitch
neu/hap/sad/ang 0 / +1.0 / -0.8 / +0.6 st (sd 2.0), energy 0 / +1.0 / -1.5 / +2.0 dB (sd 3.0), pitch
range x1 / 1.2 / 0.85 / 1.1 (log-sd 0.3), rate x1 / 1.05 / 0.94 / 1.04 (log-sd 0.12), tilt, breath,
jitter, open quotient likewise. **Speakers** vary more than in the demo: f0 150-260 Hz (F) /
80-150 Hz (M), vocal-tract scale, loudness (sd 4 dB), tilt, rate, breathiness, range, jitter,
expressiveness.

**Channels**: every session (and every pool chapter) has its own microphone EQ (2nd-order high-pass
at 60-250 Hz, 4th-order low-pass at 3.6-7.5 kHz, two peaking filters of +-8 dB at 250-4000 Hz), room
(exponentially decaying noise RIR, RT60 0.15-0.7 s, direct-to-reverberant ratio 0-12 dB), input gain
(+-5 dB) and noise floor (-65..-48 dBFS, coloured, plus 50 or 60 Hz hum), so an unseen session is an
unseen channel.

Reference LOSO UA on the full corpus, seed 0 (:mod:`serray.train.baselines`, logistic regression, C=0.1):
classical utterance statistics 0.466, oracle synthesis parameters 0.858 (its event counts alone
0.788, its drawn offsets alone 0.577), metadata 0.241; on the default demo corpus classical gets
0.765 and metadata 0.222.

Generation runs over ``processes`` worker processes (default: up to 2, forked; pass
``processes=1`` to stay in the calling process); every file depends only on ``seed`` and its own
index, so the result does not depend on the number of processes. Full size, measured on 2 cores
shared with other jobs: 3 min 22 s wall, 4 min 27 s of CPU.
"""

from __future__ import annotations

import csv
import math
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import soundfile as sf
from scipy.signal import butter, lfilter, oaconvolve, sosfilt

from serray.data.synthetic import common as _common
from serray.errors import ConfigError

__all__ = ["EVENTS", "CONTOURS", "EVENT_RATES", "CONTOUR_P", "CLASS_SHARES", "ORACLE_FEATURES",
           "BenchmarkPaths", "benchmark_paths", "make_benchmark_corpus", "session_label_counts"]

CLASSES = ("neu", "hap", "sad", "ang")
#: Local event types, in oracle column order.
EVENTS = ("laugh", "sigh", "sob", "accent", "creak", "risefall")
_REPLACING = ("laugh", "sigh", "sob")          # replace speech in their span
#: Utterance-level f0 contours.
CONTOURS = ("fall", "final_drop", "final_rise", "flat")

#: Events per second for each label (before the speaker's expressiveness factor).
EVENT_RATES: Dict[str, Dict[str, float]] = {
    "neu": dict(laugh=0.05, sigh=0.08, sob=0.03, accent=0.20, creak=0.06, risefall=0.10),
    "hap": dict(laugh=0.50, sigh=0.04, sob=0.03, accent=0.35, creak=0.03, risefall=0.45),
    "exc": dict(laugh=0.65, sigh=0.03, sob=0.02, accent=0.50, creak=0.04, risefall=0.50),
    "sad": dict(laugh=0.03, sigh=0.40, sob=0.30, accent=0.05, creak=0.15, risefall=0.04),
    "ang": dict(laugh=0.05, sigh=0.12, sob=0.02, accent=0.80, creak=0.50, risefall=0.08),
}
#: Probability of each contour in :data:`CONTOURS` for each label.
CONTOUR_P: Dict[str, Tuple[float, ...]] = {
    "neu": (0.45, 0.15, 0.25, 0.15), "hap": (0.30, 0.10, 0.45, 0.15),
    "exc": (0.30, 0.10, 0.45, 0.15), "sad": (0.25, 0.50, 0.05, 0.20),
    "ang": (0.35, 0.35, 0.05, 0.25),
}
# Utterance-wide class means (weak): pitch st, energy dB, bright (tilt) are added; range, rate,
# breath, jitter multiply; oq is the glottal open quotient.
_OFFSETS = {
    "neu": dict(pitch=0.0, energy=0.0, bright=0.00, range=1.00, rate=1.00, breath=1.00, jitter=1.0, oq=0.60),
    "hap": dict(pitch=1.0, energy=1.0, bright=0.05, range=1.20, rate=1.05, breath=1.00, jitter=1.0, oq=0.58),
    "exc": dict(pitch=1.4, energy=1.5, bright=0.08, range=1.30, rate=1.07, breath=0.95, jitter=1.1, oq=0.57),
    "sad": dict(pitch=-0.8, energy=-1.5, bright=-0.06, range=0.85, rate=0.94, breath=1.25, jitter=1.1, oq=0.64),
    "ang": dict(pitch=0.6, energy=2.0, bright=0.06, range=1.10, rate=1.04, breath=0.90, jitter=1.2, oq=0.56),
}
# Per-utterance spread: ("add", sd) or ("mul", log-sd).
_OFFSET_SD = {"pitch": ("add", 2.0), "energy": ("add", 3.0), "bright": ("add", 0.15),
              "range": ("mul", 0.30), "rate": ("mul", 0.12), "breath": ("mul", 0.30),
              "jitter": ("mul", 0.30), "oq": ("add", 0.04)}
_OFFSET_KEYS = tuple(_OFFSET_SD)
# Labels outside the 4 classes sound like a random mixture of two classes (None: a random pair).
_MIX = {"fru": ("ang", "neu"), "sur": ("hap", "ang"), "fea": ("sad", "hap"), "dis": ("ang", "sad"),
        "oth": None, "xxx": None}
#: The real IEMOCAP 4-class counts (neu, hap+exc, sad, ang), whose shares every session follows.
CLASS_SHARES = {"neu": 1708, "hap": 1636, "sad": 1084, "ang": 1103}
_EXC_SHARE = 1041 / 1636           # excited among hap+exc in the real release
_DROPPED_P = {"xxx": 0.50, "fru": 0.40, "sur": 0.05, "fea": 0.02, "oth": 0.02, "dis": 0.01}
_POOL_STYLES = {"neu": 0.45, "hap": 0.12, "exc": 0.06, "sad": 0.14, "ang": 0.15, "fru": 0.08}

# Full-scale sizes (``scale`` multiplies them).
_FOUR_CLASS_PER_SESSION = 160
_DIALOGS_PER_SESSION = 8
_UNLABELLED_SHARE = 0.4            # of the annotated utterances, as in IEMOCAP
_DURATION = (3.2, 0.35, 1.5, 8.0)  # log-normal median (s), log-sd, clip range
_POOL_DURATION = (8.0, 0.4, 3.0, 16.0)
_POOL_SECONDS_PER_SPEAKER = 600.0
_POOL_MAX_SPEAKERS = 40

#: Oracle columns that :func:`serray.train.baselines.oracle_features` uses (all numeric synthesis
#: parameters; the ``contour`` string is one-hot encoded there, the label never used).
ORACLE_FEATURES = ("duration", "spk_expressive", *(f"off_{k}" for k in _OFFSET_KEYS),
                   *(f"n_{e}" for e in EVENTS))

_SCHWA = np.array([500.0, 1500.0, 2500.0])
_VOWEL_A = _common._VOWELS[4]
_VOWEL_U = _common._VOWELS[7]


@dataclass(frozen=True)
class BenchmarkPaths:
    """Where the benchmark preset writes, for a release root."""

    root: Path                 #: the IEMOCAP_full_release tree
    unlabelled: Path           #: LibriSpeech-style tree of unlabelled speech from other speakers
    oracle: Path               #: synthesis parameters of every four-class utterance (CSV)
    unlabelled_oracle: Path    #: synthesis parameters of every pool utterance (CSV)


def benchmark_paths(root) -> BenchmarkPaths:
    """The companion paths of a benchmark release root (``root.resolve().parent / ...``)."""
    root = Path(root)
    parent = root.resolve().parent
    return BenchmarkPaths(root=root, unlabelled=parent / "synthetic_unlabelled",
                          oracle=parent / "synthetic_oracle.csv",
                          unlabelled_oracle=parent / "synthetic_unlabelled_oracle.csv")


# ----------------------------------------------------------------------------------------------
# speakers and channels


@dataclass(frozen=True)
class _Voice:
    f0: float
    vt: float
    loud_db: float
    bright: float
    rate: float
    breath: float
    range: float
    jitter: float
    expressive: float


def _voice(rng: np.random.Generator, gender: str) -> _Voice:
    if gender == "F":
        f0, vt = rng.uniform(150.0, 260.0), rng.uniform(1.06, 1.28)
    else:
        f0, vt = rng.uniform(80.0, 150.0), rng.uniform(0.88, 1.08)
    return _Voice(f0=float(f0), vt=float(vt), loud_db=float(rng.normal(0.0, 4.0)),
                  bright=float(rng.normal(0.0, 0.3)), rate=float(rng.lognormal(0.0, 0.15)),
                  breath=float(rng.lognormal(0.0, 0.4)), range=float(rng.lognormal(0.0, 0.25)),
                  jitter=float(rng.lognormal(0.0, 0.3)), expressive=float(rng.lognormal(0.0, 0.3)))


def _actor(seed: int, session: int, gender: str) -> _Voice:
    return _voice(np.random.default_rng([seed, 0xBE5B, session, 0 if gender == "F" else 1]), gender)


@dataclass(frozen=True)
class _Channel:
    cid: int
    hp: float
    lp: float
    peaks: Tuple[Tuple[float, float, float], ...]   # (Hz, dB, Q)
    rt60: float
    drr_db: float
    gain_db: float
    floor_db: float
    noise_pole: float
    hum_hz: float
    hum_db: float
    sos: np.ndarray
    rir: np.ndarray


def _peaking(f: float, gain_db: float, q: float, sr: int) -> np.ndarray:
    """RBJ peaking-EQ biquad as one sos row."""
    a = 10.0 ** (gain_db / 40.0)
    w = 2.0 * np.pi * f / sr
    alpha = np.sin(w) / (2.0 * q)
    b = np.array([1 + alpha * a, -2 * np.cos(w), 1 - alpha * a])
    den = np.array([1 + alpha / a, -2 * np.cos(w), 1 - alpha / a])
    return np.concatenate([b / den[0], den / den[0]])[None, :]


def _channel(rng: np.random.Generator, cid: int, sr: int) -> _Channel:
    hp = float(rng.uniform(60.0, 250.0))
    lp = float(min(rng.uniform(3600.0, 7500.0), 0.45 * sr))
    peaks = tuple((float(rng.uniform(250.0, 4000.0)), float(rng.uniform(-8.0, 8.0)),
                   float(rng.uniform(0.7, 2.0))) for _ in range(2))
    rt60, drr = float(rng.uniform(0.15, 0.7)), float(rng.uniform(0.0, 12.0))
    sos = np.concatenate([butter(2, hp, "highpass", fs=sr, output="sos"),
                          butter(4, lp, "lowpass", fs=sr, output="sos"),
                          *(_peaking(f, g, q, sr) for f, g, q in peaks)])
    # room: a direct path, a short pre-delay, then exponentially decaying (slightly low-passed) noise
    n_tail = int(min(rt60, 0.5) * sr)
    t = np.arange(n_tail) / sr
    tail = rng.standard_normal(n_tail) * np.exp(-6.91 * t / rt60)
    tail = lfilter([0.6], [1.0, -0.4], tail)
    tail *= np.sqrt(10.0 ** (-drr / 10.0) / (np.sum(tail ** 2) + 1e-12))
    pre = int(rng.uniform(0.001, 0.006) * sr)
    rir = np.concatenate([[1.0], np.zeros(pre), tail])
    return _Channel(cid=cid, hp=hp, lp=lp, peaks=peaks, rt60=rt60, drr_db=drr,
                    gain_db=float(rng.uniform(-5.0, 5.0)), floor_db=float(rng.uniform(-65.0, -48.0)),
                    noise_pole=float(rng.uniform(0.0, 0.9)), hum_hz=float(rng.choice([50.0, 60.0])),
                    hum_db=float(rng.uniform(-8.0, 4.0)), sos=sos, rir=rir)


@lru_cache(maxsize=256)
def _session_channel(seed: int, session: int, sr: int) -> _Channel:
    return _channel(np.random.default_rng([seed, 0xBEC4, session]), session, sr)


@lru_cache(maxsize=256)
def _chapter_channel(seed: int, chapter_index: int, sr: int) -> _Channel:
    return _channel(np.random.default_rng([seed, 0xBEC5, chapter_index]), 100 + chapter_index, sr)


@lru_cache(maxsize=8)
def _hum(hz: float, sr: int) -> np.ndarray:
    """One second of mains hum (fundamental + 2 harmonics): a whole number of periods."""
    t = np.arange(sr) / sr
    return sum(np.sin(2 * np.pi * k * hz * t) / k for k in (1, 2, 3))


def _apply_channel(rng: np.random.Generator, y: np.ndarray, ch: _Channel, sr: int) -> np.ndarray:
    n = len(y)
    y = oaconvolve(y, ch.rir)[:n]
    y = sosfilt(ch.sos, y) * 10.0 ** (ch.gain_db / 20.0)
    peak = np.max(np.abs(y))
    if peak > 0.9:
        y *= 0.9 / peak
    noise = lfilter([1.0], [1.0, -ch.noise_pole], rng.standard_normal(n))
    noise *= 10.0 ** (ch.floor_db / 20.0) / (np.std(noise) + 1e-12)
    noise += _hum(ch.hum_hz, sr)[(np.arange(n) + int(rng.integers(0, sr))) % sr] * (
        10.0 ** ((ch.floor_db + ch.hum_db) / 20.0))
    return np.clip(y + noise, -0.98, 0.98)


# ----------------------------------------------------------------------------------------------
# one utterance


def _class_mean(rng: np.random.Generator, label: str):
    """Event rates, contour probabilities and offset means of a label (mixtures for dropped ones)."""
    if label in EVENT_RATES:
        return dict(EVENT_RATES[label]), np.array(CONTOUR_P[label]), dict(_OFFSETS[label])
    pair = _MIX[label]
    if pair is None:
        pair = tuple(str(c) for c in rng.choice(CLASSES, size=2, replace=False))
    w = float(rng.uniform(0.3, 0.7))
    rates = {e: w * EVENT_RATES[pair[0]][e] + (1 - w) * EVENT_RATES[pair[1]][e] for e in EVENTS}
    cp = w * np.array(CONTOUR_P[pair[0]]) + (1 - w) * np.array(CONTOUR_P[pair[1]])
    off = {k: w * _OFFSETS[pair[0]][k] + (1 - w) * _OFFSETS[pair[1]][k] for k in _OFFSET_KEYS}
    return rates, cp, off


def _event_length(rng: np.random.Generator, kind: str) -> float:
    lo, hi = {"laugh": (0.25, 0.55), "sigh": (0.35, 0.7), "sob": (0.3, 0.5), "creak": (0.15, 0.3),
              "risefall": (0.4, 0.7)}[kind]
    return float(rng.uniform(lo, hi))


def _overlaps(a: int, b: int, spans, margin: int) -> bool:
    return any(a < s1 + margin and s0 - margin < b for s0, s1 in spans)


def _hann_rise(x: np.ndarray) -> np.ndarray:
    """0 -> 1 smoothly over x in [0, 1] (clipped outside)."""
    return 0.5 - 0.5 * np.cos(np.pi * np.clip(x, 0.0, 1.0))


def _render(rng: np.random.Generator, n: int, sr: int, voice: _Voice, label: str) -> Tuple[np.ndarray, dict]:
    """Dry (channel-free) audio of one utterance and its synthesis parameters."""
    rates, contour_p, off_mean = _class_mean(rng, label)
    off = {}
    for k in _OFFSET_KEYS:
        kind, sd = _OFFSET_SD[k]
        v = off_mean[k]
        off[k] = float(v + rng.normal(0.0, sd) if kind == "add" else v * rng.lognormal(0.0, sd))
    contour = CONTOURS[int(rng.choice(len(CONTOURS), p=contour_p / contour_p.sum()))]
    dur = n / sr
    want = {e: int(rng.poisson(rates[e] * dur * voice.expressive)) for e in EVENTS}

    rate = 4.3 * off["rate"] * voice.rate
    pause_p = 0.12
    base_breath = 0.12 * off["breath"] * voice.breath
    base_jit = 0.008 * off["jitter"] * voice.jitter
    base_shim = 0.05
    oq = float(np.clip(off["oq"], 0.4, 0.8))
    prange = 2.0 * off["range"] * voice.range

    lead = int(rng.uniform(0.03, 0.10) * sr)
    trail = int(rng.uniform(0.03, 0.10) * sr)
    end = max(lead + 1, n - trail)
    margin = int(0.05 * sr)

    # --- event spans (all but accents): random order, uniformly random gaps, no overlap. When they
    # do not fit (replacing events > 60 % of the time, or all spans > 95 %), random ones are dropped.
    kinds = [e for e in EVENTS if e != "accent" for _ in range(want[e])]
    kinds = [kinds[i] for i in rng.permutation(len(kinds))]
    lengths = [int(_event_length(rng, k) * sr) for k in kinds]
    avail = end - lead

    def crowded() -> bool:
        rep = sum(ln for k, ln in zip(kinds, lengths) if k in _REPLACING)
        return rep > 0.6 * avail or sum(lengths) + margin * len(kinds) > 0.95 * avail

    while kinds and crowded():
        i = int(rng.integers(len(kinds)))
        del kinds[i], lengths[i]
    events: List[Tuple[str, int, int]] = []       # (kind, start, length)
    if kinds:
        gaps = rng.dirichlet(np.ones(len(kinds) + 1)) * (avail - sum(lengths) - margin * len(kinds))
        pos = lead + margin / 2 + gaps[0]
        for k, ln, gap in zip(kinds, lengths, gaps[1:]):
            events.append((k, int(pos), ln))
            pos += ln + margin + gap
    reserved = sorted((a, a + ln) for k, a, ln in events if k in _REPLACING)

    # --- syllables in the free time
    sylls: List[Tuple[int, int]] = []
    pos, min_len = lead, int(0.06 * sr)
    while pos < end:
        inside = [s1 for s0, s1 in reserved if s0 - margin // 2 <= pos < s1 + margin // 2]
        if inside:
            pos = inside[0] + margin // 2
            continue
        nxt = min([s0 - margin // 2 for s0, _ in reserved if s0 - margin // 2 > pos] + [end])
        length = int(sr / rate * rng.lognormal(0.0, 0.25))
        length = min(max(length, min_len), nxt - pos)
        if length < int(0.05 * sr):
            pos = nxt if nxt < end else end
            continue
        sylls.append((pos, length))
        pos += length
        if rng.random() < pause_p:
            pos += int(rng.uniform(0.08, 0.30) * sr)
    if not sylls:                                  # an utterance is never only events
        sylls = [(lead, max(2, end - lead))]
        events = []
        reserved = []
    n_syl = len(sylls)
    speech_end = sylls[-1][0] + sylls[-1][1]

    # --- accents on syllables outside creaky spans
    creaks = [(a, a + ln) for k, a, ln in events if k == "creak"]
    free = [i for i, (a, length) in enumerate(sylls) if not _overlaps(a, a + length, creaks, 0)]
    n_acc = min(want["accent"], len(free))
    for i in sorted(rng.choice(free, size=n_acc, replace=False).tolist()) if n_acc else []:
        events.append(("accent", sylls[i][0], sylls[i][1]))
    events.sort(key=lambda ev: ev[1])

    # --- per-sample controls
    voice_env = np.zeros(n)          # glottal pulses
    asp_env = np.zeros(n)            # aspiration noise not tied to voicing (h, sighs)
    cons_env = np.zeros(n)           # consonant bursts
    hiss_env = np.zeros(n)           # inhaled catches of sobs
    gain_db = np.zeros(n)
    breath = np.full(n, base_breath)
    jit = np.full(n, base_jit)
    shim = np.full(n, base_shim)
    rough = np.zeros(n)
    oqs = np.full(n, oq)
    speech = np.zeros(n, dtype=bool)
    segments: List[Tuple[int, int, np.ndarray]] = []   # (start, length, F1-F3) formant segments

    cons_frac = np.where(rng.random(n_syl) < 0.7, rng.uniform(0.12, 0.35, n_syl), 0.0)
    vowels = rng.integers(0, len(_common._VOWELS), n_syl)
    centres = np.empty(n_syl)
    for i, ((a, length), cf) in enumerate(zip(sylls, cons_frac)):
        c = int(cf * length)
        if c > 1:
            cons_env[a:a + c] = np.hanning(c)
        v = length - c
        x = (np.arange(v) + 0.5) / v
        voice_env[a + c:a + length] = np.sin(np.pi * x) ** 0.6
        speech[a:a + length] = True
        centres[i] = a + c + v / 2.0
        segments.append((a, length, _common._VOWELS[vowels[i]] * rng.uniform(0.94, 1.06, 3)))

    # f0 contour (semitones re the speaker's f0): syllable accents, declination, utterance contour
    t_rel = np.clip((np.arange(n) - sylls[0][0]) / max(1, speech_end - sylls[0][0]), 0.0, 1.0)
    acc_sd = 0.55 * (0.5 if contour == "flat" else 1.0)
    decl_amp = {"fall": 0.5, "final_drop": 0.25, "final_rise": 0.3, "flat": 0.0}[contour]
    decl = np.linspace(decl_amp, -decl_amp, n_syl) if n_syl > 1 else np.zeros(1)
    accents = prange * (decl + rng.normal(0.0, acc_sd, n_syl))
    st = np.interp(np.arange(n), np.concatenate([[0.0], centres, [n - 1.0]]),
                   np.concatenate([[accents[0]], accents, [accents[-1]]]))
    st = _common._moving_average(st, int(0.05 * sr))
    depth = 0.0
    if contour == "final_drop":
        depth = -float(rng.uniform(4.0, 7.0))
        st += depth * _hann_rise((t_rel - 0.7) / 0.3)
    elif contour == "final_rise":
        depth = float(rng.uniform(3.0, 6.0))
        st += depth * _hann_rise((t_rel - 0.75) / 0.25)
    st += off["pitch"]
    f0_override = np.zeros(n)        # creak: weight of the creaky f0
    creak_f0 = np.full(n, 50.0)

    for kind, a, length in events:
        b = a + length
        x = (np.arange(length) + 0.5) / length
        if kind == "accent":
            bump = np.sin(np.pi * x)
            st[a:b] += float(rng.uniform(5.0, 9.0)) * bump
            gain_db[a:b] += float(rng.uniform(4.0, 7.0)) * bump
        elif kind == "risefall":
            h = float(rng.uniform(4.0, 7.0))
            shape = np.where(x < 0.4, _hann_rise(x / 0.4), 1.0 - 1.4 * _hann_rise((x - 0.4) / 0.6))
            st[a:b] += h * shape
        elif kind == "creak":
            w = np.minimum(1.0, np.minimum(x, 1.0 - x) * length / (0.02 * sr))
            f0_override[a:b] = w
            creak_f0[a:b] = float(rng.uniform(38.0, 62.0))
            jit[a:b] += 0.12 * w
            shim[a:b] += 0.35 * w
            rough[a:b] += 0.4 * w
            oqs[a:b] -= 0.25 * w
            gain_db[a:b] -= 2.0 * w
        elif kind == "laugh":
            period = int(rng.uniform(0.11, 0.16) * sr)
            k = max(2, length // period)
            pitch = float(rng.uniform(8.0, 11.0))
            for j in range(k):
                p0 = a + j * period
                plen = min(period, b - p0)
                if plen < int(0.04 * sr):
                    break
                h = int(0.35 * plen)
                asp_env[p0:p0 + h] = 0.8 * np.hanning(h)
                vx = (np.arange(plen - h) + 0.5) / (plen - h)
                voice_env[p0 + h:p0 + plen] = np.sin(np.pi * vx) ** 0.8
                st[p0:p0 + plen] = pitch - 0.6 * j - 1.5 * np.linspace(0.0, 1.0, plen)
                segments.append((p0, plen, _VOWEL_A * rng.uniform(0.95, 1.05, 3)))
            breath[a:b] *= 2.5
            gain_db[a:b] += 2.0
        elif kind == "sigh":
            env = np.where(x < 0.3, _hann_rise(x / 0.3), 1.0 - _hann_rise((x - 0.3) / 0.7))
            voice_env[a:b] = 0.3 * env
            asp_env[a:b] = 1.2 * env
            st[a:b] = -1.0 - 5.0 * x
            breath[a:b] *= 2.0
            gain_db[a:b] -= 5.0
            segments.append((a, length, _SCHWA * rng.uniform(0.95, 1.05, 3)))
        elif kind == "sob":
            k = int(rng.integers(2, 4))
            part = length // k
            vib_hz, vib_st = float(rng.uniform(7.0, 9.0)), float(rng.uniform(1.5, 2.5))
            for j in range(k):
                p0 = a + j * part
                c = int(min(0.07 * sr, 0.35 * part))
                hiss_env[p0:p0 + c] = np.hanning(c)
                vlen = part - c
                vx = (np.arange(vlen) + 0.5) / vlen
                voice_env[p0 + c:p0 + part] = np.sin(np.pi * vx) ** 0.6
                tt = np.arange(vlen) / sr
                st[p0 + c:p0 + part] = 1.0 + vib_st * np.sin(2 * np.pi * vib_hz * tt) - 2.0 * vx
                segments.append((p0 + c, vlen, _VOWEL_U * rng.uniform(0.95, 1.05, 3)))
            breath[a:b] *= 2.5
            jit[a:b] += 0.02
            gain_db[a:b] -= 3.0

    # --- glottal source (as the demo: Rosenberg pulses on the f0 contour, jitter, shimmer)
    f0 = voice.f0 * 2.0 ** (st / 12.0)
    f0 = f0 * (1.0 - f0_override) + creak_f0 * f0_override
    f0 = np.clip(f0, 35.0, 600.0)
    cycle0 = np.floor(np.cumsum(f0 / sr)).astype(np.int64)
    n_cyc = int(cycle0[-1]) + 2
    f0 = f0 * (1.0 + jit * rng.standard_normal(n_cyc)[cycle0])
    phase = np.cumsum(np.maximum(f0, 20.0) / sr)
    cycle = np.floor(phase).astype(np.int64)
    phi = phase - cycle
    n_cyc = int(cycle[-1]) + 2
    tp, tn = 0.6 * oqs, 0.4 * oqs
    g = np.where(phi < tp, 0.5 * (1.0 - np.cos(np.pi * phi / tp)),
                 np.where(phi < tp + tn, np.cos(0.5 * np.pi * (phi - tp) / tn), 0.0))
    dg = np.diff(g, prepend=g[0])
    z = rng.standard_normal(n_cyc)
    alt = np.where(np.arange(n_cyc) % 2 == 0, 1.0, -1.0)
    amp = 1.0 + shim * z[cycle] + rough * alt[cycle]
    dg = dg * np.maximum(amp, 0.05)
    vmask = voice_env > 0.3
    dg /= np.sqrt(np.mean(dg[vmask] ** 2)) + 1e-12 if np.any(vmask) else 1.0
    noise = rng.standard_normal(n)
    source = dg * voice_env + noise * (breath * (0.4 + 0.6 * g) * voice_env + asp_env)

    # --- formants per segment, tails overlap-added
    tail = int(0.025 * sr)
    y = np.zeros(n + tail)
    for a, length, fr in segments:
        freqs = np.append(fr, _common._F4) * voice.vt
        seg = np.concatenate([source[a:a + length], np.zeros(tail)])
        y[a:a + length + tail] += sosfilt(_common._resonator_sos(freqs, sr), seg)
    y = y[:n]
    smask = speech & vmask
    y_rms = np.sqrt(np.mean(y[smask] ** 2)) if np.any(smask) else 1.0
    burst = np.diff(rng.standard_normal(n + 1))
    y += burst * (cons_env * y_rms * rng.uniform(0.08, 0.25) + hiss_env * y_rms * 0.5)

    # --- tilt, local gains, level
    b = off["bright"] + voice.bright
    if b > 0:
        y = lfilter([1.0, -min(0.95, b)], [1.0], y)
    elif b < 0:
        pole = min(0.92, -b)
        y = lfilter([1.0 - pole], [1.0, -pole], y)
    y *= 10.0 ** (_common._moving_average(gain_db, int(0.01 * sr)) / 20.0)
    active = speech & ((voice_env > 0.3) | (cons_env > 0.3))
    rms = np.sqrt(np.mean(y[active] ** 2)) if np.any(active) else np.sqrt(np.mean(y ** 2))
    y *= 10.0 ** ((-27.0 + off["energy"] + voice.loud_db) / 20.0) / (rms + 1e-12)
    peak = np.max(np.abs(y))
    if peak > 0.9:
        y *= 0.9 / peak

    counts = {e: 0 for e in EVENTS}
    for kind, _, _ in events:
        counts[kind] += 1
    params = {"contour": contour, "contour_depth": round(depth, 4),
              **{f"off_{k}": round(off[k], 6) for k in _OFFSET_KEYS},
              **{f"n_{e}": counts[e] for e in EVENTS},
              "events": ";".join(f"{k}@{a / sr:.4f}+{ln / sr:.4f}" for k, a, ln in events)}
    return y, params


# ----------------------------------------------------------------------------------------------
# jobs (run in worker processes; each depends only on its own arguments)


def _perceived_vad(params: dict, duration: float, rng: np.random.Generator) -> tuple:
    """What a listener hears, on IEMOCAP's 1..5 scale, from an utterance's synthesis parameters
    (:func:`_render`'s ``params``: the utterance offsets and the realised local events, per second):

    * arousal from energy, speaking rate, accents, creak and laughter (sighs lower it);
    * valence from laughter and rise-fall contours (up), sighs, sobs and creak (down), pitch level and
      the utterance contour;
    * dominance from energy, pitch range, accents and creak (sobs lower it);

    plus an expression noise (sd 0.25) from ``rng``, clipped to 1..5; the evaluators' integer ratings
    around it add the annotator spread (:func:`serray.data.synthetic.common._annotation_block`). The weights
    put the class means near IEMOCAP's (the demo preset's ``_VAD_MEAN``)."""
    r = {e: params[f"n_{e}"] / max(duration, 0.5) for e in EVENTS}
    energy, pitch = params["off_energy"], params["off_pitch"]
    contour = {"final_rise": 0.2, "final_drop": -0.2}.get(params["contour"], 0.0)
    arousal = (2.6 + 0.12 * energy + 1.5 * math.log(params["off_rate"]) + (r["accent"] + r["creak"])
               + r["laugh"] - r["sigh"])
    valence = (3.0 + 1.2 * (r["laugh"] + r["risefall"]) - 1.5 * (r["sigh"] + r["sob"]) - 2.0 * r["creak"]
               + 0.15 * pitch + contour)
    dominance = (2.7 + 0.10 * energy + 0.5 * math.log(params["off_range"]) + r["accent"] + 0.6 * r["creak"]
                 - 2.0 * r["sob"])
    vad = np.array([valence, arousal, dominance]) + rng.normal(0.0, 0.25, 3)
    return tuple(float(x) for x in np.clip(vad, 1.0, 5.0))


def _voice_cols(v: _Voice) -> dict:
    return {"spk_f0": round(v.f0, 4), "spk_vt": round(v.vt, 5), "spk_loud_db": round(v.loud_db, 4),
            "spk_bright": round(v.bright, 5), "spk_rate": round(v.rate, 5),
            "spk_breath": round(v.breath, 5), "spk_range": round(v.range, 5),
            "spk_jitter": round(v.jitter, 5), "spk_expressive": round(v.expressive, 5)}


def _channel_cols(ch: _Channel) -> dict:
    return {"channel_id": ch.cid, "ch_hp_hz": round(ch.hp, 2), "ch_lp_hz": round(ch.lp, 2),
            "ch_rt60": round(ch.rt60, 4), "ch_drr_db": round(ch.drr_db, 3),
            "ch_gain_db": round(ch.gain_db, 3), "ch_floor_db": round(ch.floor_db, 3)}


def _job(job: tuple) -> dict:
    kind = job[0]
    if kind == "release":
        _, seed, sr, index, session, gender, label, n, path = job
        voice = _actor(seed, session, gender)
        ch = _session_channel(seed, session, sr)
        rng = np.random.default_rng([seed, 0xBEA0, index])
        y, params = _render(rng, n, sr, voice, label)
        y = _apply_channel(rng, y, ch, sr)
        _common._write_wav(Path(path), y, sr)
    else:
        _, seed, sr, index, spk_seed, gender, chapter_index, style, n, path = job
        voice = _voice(np.random.default_rng([seed, 0xBEB5, spk_seed]), gender)
        ch = _chapter_channel(seed, chapter_index, sr)
        rng = np.random.default_rng([seed, 0xBEB1, index])
        y, params = _render(rng, n, sr, voice, style)
        y = _apply_channel(rng, y, ch, sr)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(path), y, sr, subtype="PCM_16", format="FLAC")
    return {**params, **_voice_cols(voice), **_channel_cols(ch)}


def _worker_init() -> None:
    """Keep freed numpy buffers in the heap (glibc): without it every multi-MB temporary is a fresh
    mmap whose pages fault in again, which costs about a third of the synthesis time."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 256 << 20)      # M_TRIM_THRESHOLD
        libc.mallopt(-3, 32 << 20)       # M_MMAP_THRESHOLD (glibc's maximum)
    except (OSError, AttributeError):    # not glibc: defaults
        pass


def _run_jobs(jobs: List[tuple], processes: int, progress: bool, what: str) -> List[dict]:
    t0 = time.time()
    if processes <= 1 or len(jobs) < 16:
        out = [_job(j) for j in jobs]
    else:
        # fork: workers only run numpy/scipy/soundfile, and unlike spawn it does not re-import a
        # calling script that lacks an ``if __name__ == "__main__"`` guard
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        with ctx.Pool(processes, initializer=_worker_init) as pool:
            out = list(pool.imap(_job, jobs, chunksize=8))
    if progress:
        print(f"[synthetic] {what}: {len(jobs)} files in {time.time() - t0:.1f} s",
              file=sys.stderr, flush=True)
    return out


# ----------------------------------------------------------------------------------------------
# the corpus


def _largest_remainder(total: int, shares: Dict[str, float]) -> Dict[str, int]:
    keys = list(shares)
    w = np.array([shares[k] for k in keys], dtype=np.float64)
    exact = total * w / w.sum()
    out = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - out), kind="stable")[: total - int(out.sum())]:
        out[i] += 1
    return dict(zip(keys, out.tolist()))


def _sizes(scale: float) -> Tuple[int, int, int]:
    """(four-class utterances per session, dialogs per session, utterances per session)."""
    four = max(12, int(round(_FOUR_CLASS_PER_SESSION * scale)))
    dialogs = max(2, int(round(_DIALOGS_PER_SESSION * scale)))
    total = int(math.ceil(four / (1.0 - _UNLABELLED_SHARE)))
    return four, dialogs, total


def session_label_counts(scale: float = 1.0) -> Dict[str, int]:
    """Raw-label counts of the four-class utterances of every session (``exc`` split from ``hap``)."""
    four, _, _ = _sizes(scale)
    counts = _largest_remainder(four, CLASS_SHARES)
    exc = int(round(_EXC_SHARE * counts["hap"]))
    return {"neu": counts["neu"], "hap": counts["hap"] - exc, "exc": exc, "sad": counts["sad"],
            "ang": counts["ang"]}


def _session_labels(seed: int, session: int, scale: float) -> List[str]:
    rng = np.random.default_rng([seed, 0xBE1A, session])
    _, _, total = _sizes(scale)
    kept = [lab for lab, c in session_label_counts(scale).items() for _ in range(c)]
    names = list(_DROPPED_P)
    p = np.array([_DROPPED_P[k] for k in names])
    dropped = [names[i] for i in rng.choice(len(names), size=total - len(kept), p=p / p.sum())]
    labels = kept + dropped
    return [labels[i] for i in rng.permutation(len(labels))]


def _duration(rng: np.random.Generator, spec) -> float:
    median, sd, lo, hi = spec
    return float(np.clip(rng.lognormal(np.log(median), sd), lo, hi))


def _write_csv(path: Path, rows: List[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def make_benchmark_corpus(out_dir, *, seed: int = 0, sample_rate: int = 16000, scale: float = 1.0,
                          unlabelled_factor: float = 10.0, processes: Optional[int] = None,
                          progress: bool = False) -> Path:
    """Write the benchmark corpus (see the module docstring) and return the release root.

    Args:
        out_dir: the IEMOCAP root to create (``out_dir/Session1`` ...); the pool and the oracle files
            go beside it (:func:`benchmark_paths`).
        seed: everything is deterministic from it.
        sample_rate: of every file.
        scale: multiplies the sizes (160 four-class utterances and 8 dialogs per session at 1.0;
            at least 12 and 2); the pool follows through ``unlabelled_factor``.
        unlabelled_factor: pool duration / total duration of the four-class utterances.
        processes: worker processes (default: ``min(2, os.cpu_count())``).
        progress: print a line per stage to stderr.

    Returns:
        ``Path(out_dir)``.
    """
    if not 8000 <= int(sample_rate) <= 48000:
        raise ConfigError(f"sample_rate must be in [8000, 48000] Hz, got {sample_rate}")
    if not 0.0 < float(scale) <= 10.0:
        raise ConfigError(f"scale must be in (0, 10], got {scale}")
    if not 0.0 <= float(unlabelled_factor) <= 100.0:
        raise ConfigError(f"unlabelled_factor must be in [0, 100], got {unlabelled_factor}")
    seed, sr, scale = int(seed), int(sample_rate), float(scale)
    processes = int(processes) if processes else min(2, os.cpu_count() or 1)
    paths = benchmark_paths(out_dir)
    root = paths.root
    root.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    _common._write_text(root / "README.txt", [
        "Synthetic speech-emotion corpus in the IEMOCAP_full_release layout,",
        f"generated by serray.data.synthetic.make_corpus(seed={seed}, preset='benchmark', scale={scale:g}).",
        "The audio is synthetic: it is not IEMOCAP and contains no real speech.",
        f"Unlabelled speech of other speakers, beside this directory: ../{paths.unlabelled.name}/",
        f"Synthesis parameters of the four-class utterances (oracle): ../{paths.oracle.name}"])

    # --- plan the release: dialogs, turns, labels, durations
    _, n_dialogs, per_session = _sizes(scale)
    jobs, plan = [], []
    index = 0
    for session in range(1, _common.N_SESSIONS + 1):
        labels = _session_labels(seed, session, scale)
        dialogs = _common._dialog_names(session, n_dialogs)
        sizes = [per_session // n_dialogs + (1 if d < per_session % n_dialogs else 0)
                 for d in range(n_dialogs)]
        k_lab = 0
        for d, dialog in enumerate(dialogs):
            drng = np.random.default_rng([seed, 0xBED1, session, d])
            genders = _common.turn_genders(drng, dialog, sizes[d])
            counters = {"F": 0, "M": 0}
            t = float(drng.uniform(0.5, 4.0))
            utts = []
            for g in genders:
                dur = _duration(np.random.default_rng([seed, 0xBEDA, index]), _DURATION)
                n = int(round(dur * sr))
                u = _common._Utt(index=index, session=session, dialog=dialog,
                               utt_id=f"{dialog}_{g}{counters[g]:03d}", gender=g,
                               label=labels[k_lab], n_samples=n, start=round(t, 4))
                counters[g] += 1
                k_lab += 1
                index += 1
                utts.append(u)
                path = root / f"Session{session}" / "sentences" / "wav" / dialog / f"{u.utt_id}.wav"
                jobs.append(("release", seed, sr, u.index, session, g, u.label, n, str(path)))
                t = u.start + n / sr + float(drng.uniform(0.2, 2.5))
            plan.append((session, d, dialog, drng, utts))
    meta = _run_jobs(jobs, processes, progress, "release utterances")

    # --- annotations and the other files of the release (as the demo preset)
    oracle_rows = []
    by_index = {j[3]: m for j, m in zip(jobs, meta)}
    for session, d, dialog, drng, utts in plan:
        sess_dir = root / f"Session{session}"
        wav_dir = sess_dir / "sentences" / "wav" / dialog
        emo = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
        cat, atr, trans = [], [], []
        for u in utts:
            end = u.start + u.n_samples / sr
            # V/A/D from the drawn parameters and realised events, with its own RNG (audio untouched)
            u.vad = _perceived_vad(by_index[u.index], u.n_samples / sr, np.random.default_rng([seed, 0x7AD, u.index]))
            _common.annotate(drng, u, end, emo, cat, atr, trans)
            if u.label in _common.LABELS_KEPT:
                oracle_rows.append({"utt_id": u.utt_id, "session": session, "dialog": dialog,
                                    "speaker": f"Ses{session:02d}{u.gender}", "gender": u.gender,
                                    "label": u.label, "duration": round(u.n_samples / sr, 4),
                                    **by_index[u.index]})
        first = [sf.read(str(wav_dir / f"{u.utt_id}.wav"))[0] for u in utts[:2]]
        _common.write_dialog(sess_dir, dialog, utts, sr, emo, cat, atr, trans, first, junk=d == 0)
    oracle_rows.sort(key=lambda r: r["utt_id"])
    _write_csv(paths.oracle, oracle_rows)

    # --- the unlabelled pool of other speakers
    labelled_s = sum(r["duration"] for r in oracle_rows)
    _make_pool(paths.unlabelled, paths.unlabelled_oracle, seed, sr, unlabelled_factor * labelled_s,
               processes, progress)
    if progress:
        print(f"[synthetic] benchmark corpus written in {time.time() - t_start:.1f} s: {root}, "
              f"{paths.unlabelled}, {paths.oracle}", file=sys.stderr, flush=True)
    return root


def _make_pool(out: Path, oracle_path: Path, seed: int, sr: int, target_s: float, processes: int,
               progress: bool) -> None:
    prng = np.random.default_rng([seed, 0xBEB0])
    n_spk = int(np.clip(round(target_s / _POOL_SECONDS_PER_SPEAKER), 4, _POOL_MAX_SPEAKERS))
    spk_ids = sorted(int(i) for i in prng.choice(np.arange(100, 9000), size=n_spk, replace=False))
    genders = ["F" if i % 2 == 0 else "M" for i in range(n_spk)]
    chapters = []                                  # (speaker index, speaker id, chapter id)
    chap_ids = prng.choice(np.arange(10000, 200000), size=2 * n_spk, replace=False)
    for i, s in enumerate(spk_ids):
        for c in sorted(int(x) for x in chap_ids[2 * i:2 * i + 2]):
            chapters.append((i, s, c))
    styles = list(_POOL_STYLES)
    p = np.array([_POOL_STYLES[s] for s in styles])
    jobs, rows, total, k = [], [], 0.0, 0
    counters: Dict[int, int] = {}
    while total < target_s:
        ci = k % len(chapters)
        i, s, c = chapters[ci]
        urng = np.random.default_rng([seed, 0xBEB2, k])
        dur = _duration(urng, _POOL_DURATION)
        style = styles[int(urng.choice(len(styles), p=p / p.sum()))]
        num = counters.get(ci, 0)
        counters[ci] = num + 1
        utt = f"{s}-{c}-{num:04d}"
        n = int(round(dur * sr))
        jobs.append(("pool", seed, sr, k, s, genders[i], ci, style, n, str(out / str(s) / str(c) / f"{utt}.flac")))
        rows.append({"utt_id": utt, "speaker": s, "chapter": c, "gender": genders[i], "style": style,
                     "duration": round(n / sr, 4)})
        total += n / sr
        k += 1
    out.mkdir(parents=True, exist_ok=True)
    meta = _run_jobs(jobs, processes, progress, f"unlabelled pool ({total / 3600:.2f} h)")
    rows = [{**r, **m} for r, m in zip(rows, meta)]
    _write_csv(oracle_path, rows)
    words = np.array([w.upper() for w in _common._WORDS])
    for ci, (i, s, c) in enumerate(chapters):
        lines = []
        for r, j in zip(rows, jobs):
            if j[6] == ci:
                n_words = max(1, int(round(r["duration"] * 2.5)))
                wrng = np.random.default_rng([seed, 0xBEB3, j[3]])
                lines.append(f"{r['utt_id']} " + " ".join(wrng.choice(words, size=n_words)))
        if lines:
            _common._write_text(out / str(s) / str(c) / f"{s}-{c}.trans.txt", lines)
    minutes = {s: 0.0 for s in spk_ids}
    for r in rows:
        minutes[r["speaker"]] += r["duration"] / 60.0
    _common._write_text(out / "SPEAKERS.TXT", [
        "; Synthetic speakers of the unlabelled pool (not IEMOCAP actors)",
        ";ID  |SEX| SUBSET           |MINUTES| NAME",
        *(f"{s:<5}| {g} | synthetic-unlab  | {minutes[s]:6.2f}| spk{s}" for s, g in zip(spk_ids, genders))])
    _common._write_text(out / "README.txt", [
        "Unlabelled synthetic speech (serray benchmark preset), LibriSpeech-style tree:",
        "<speaker>/<chapter>/<speaker>-<chapter>-<nnnn>.flac, 16-bit FLAC.",
        f"{len(rows)} utterances, {total / 3600:.3f} h, {n_spk} speakers, {len(chapters)} chapters "
        "(one recording channel each).",
        "Speaking styles are mixed (neutral and emotional); no labels are given."])
