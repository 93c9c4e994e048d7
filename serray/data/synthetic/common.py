"""What both synthetic presets share: the IEMOCAP label sets, the annotation block, formants, writers.

:mod:`serray.data.synthetic` (the ``demo`` preset and ``make_corpus``) and
:mod:`serray.data.synthetic.benchmark` (the ``benchmark`` preset) both import from here, so the
imports run one way: ``synthetic`` -> ``synthetic.benchmark`` -> ``synthetic.common``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

#: Labels a SER parser keeps (``exc`` is merged into ``hap``).
LABELS_KEPT = ("neu", "hap", "exc", "sad", "ang")
#: Labels present in the annotations that a 4-class SER parser drops.
LABELS_DROPPED = ("fru", "sur", "fea", "dis", "oth", "xxx")
N_SESSIONS = 5


# Words used in the evaluator lines of EmoEvaluation/<dialog>.txt, as in the real release.
_CAT_WORD = {"neu": "Neutral", "hap": "Happiness", "exc": "Excited", "sad": "Sadness",
             "ang": "Anger", "fru": "Frustration", "sur": "Surprise", "fea": "Fear",
             "dis": "Disgust", "oth": "Other"}
# Mean (valence, activation, dominance) on IEMOCAP's 1..5 scale.
_VAD_MEAN = {"neu": (3.0, 2.4, 2.6), "hap": (4.0, 3.0, 3.0), "exc": (3.8, 3.7, 3.3),
             "sad": (2.0, 2.2, 2.3), "ang": (1.8, 3.9, 3.9), "fru": (2.0, 3.3, 3.3),
             "sur": (3.3, 3.6, 2.9), "fea": (2.1, 3.4, 2.2), "dis": (1.8, 3.1, 3.3),
             "oth": (3.0, 3.0, 3.0), "xxx": (2.7, 3.0, 3.0)}


# Peterson & Barney-like adult-male vowel formants (F1, F2, F3), Hz.
_VOWELS = np.array([[270, 2290, 3010], [390, 1990, 2550], [530, 1840, 2480], [660, 1720, 2410],
                    [730, 1090, 2440], [570, 840, 2410], [440, 1020, 2240], [300, 870, 2240],
                    [640, 1190, 2390], [490, 1350, 1690]], dtype=np.float64)
_F4 = 3500.0
_BANDWIDTHS = np.array([80.0, 100.0, 150.0, 250.0])

_WORDS = ("I", "you", "we", "it", "that", "know", "just", "what", "really", "not", "going",
          "can't", "here", "now", "well", "okay", "yeah", "no", "why", "believe", "think",
          "told", "time", "right", "about", "home", "again", "never", "always", "so", "the",
          "job", "letter", "money", "car", "tomorrow", "sure", "mean", "look", "want")

_APPLEDOUBLE = (b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        \x00\x02\x00\x00\x00\t"
                b"\x00\x00\x002\x00\x00\x0e\xb0\x00\x00\x00\x02\x00\x00\x0e\xe2\x00\x00\x01\x1e")


@dataclass
class _Utt:
    index: int         # global utterance index (seeds the audio)
    session: int
    dialog: str
    utt_id: str
    gender: str        # "F" | "M": the speaker, from the utterance id
    label: str
    n_samples: int
    start: float = 0.0
    vad: tuple | None = None   # perceived (valence, arousal, dominance) on 1..5, from the audio's parameters


def _dialog_names(session: int, count: int) -> list[str]:
    """F-led impro, M-led impro, F-led script, M-led script, then the next numbers."""
    names = []
    for k in range(count):
        j, r = divmod(k, 4)
        lead = "FM"[r % 2]
        if r < 2:
            names.append(f"Ses{session:02d}{lead}_impro{j + 1:02d}")
        else:
            names.append(f"Ses{session:02d}{lead}_script{j // 2 + 1:02d}_{j % 2 + 1}")
    return names


def _moving_average(x: np.ndarray, width: int) -> np.ndarray:
    if width <= 1:
        return x
    pad = width // 2
    xp = np.concatenate([np.full(pad, x[0]), x, np.full(width - pad, x[-1])])
    c = np.cumsum(xp)
    return (c[width:] - c[:-width])[: len(x)] / width


def _resonator_sos(freqs: np.ndarray, sr: int) -> np.ndarray:
    """Cascade of unity-DC-gain 2nd-order resonators as an (n, 6) sos array."""
    freqs = np.minimum(freqs, 0.45 * sr)
    r = np.exp(-np.pi * _BANDWIDTHS[: len(freqs)] / sr)
    c = -2.0 * r * np.cos(2.0 * np.pi * freqs / sr)
    gain = 1.0 + c + r * r
    z = np.zeros_like(r)
    return np.stack([gain, z, z, np.ones_like(r), c, r * r], axis=1)


def _fmt_vad(v: np.ndarray) -> str:
    return f"[{v[0]:.4f}, {v[1]:.4f}, {v[2]:.4f}]"


def _annotation_block(rng: np.random.Generator, u: _Utt, end: float) -> tuple[list[str], dict]:
    """The EmoEvaluation block of one utterance, plus per-evaluator values for other files."""
    lab = u.label
    n_eval = 3
    if lab == "xxx":                 # no majority: evaluators disagree
        words = list(rng.choice(["Neutral", "Frustration", "Anger", "Sadness", "Happiness",
                                 "Excited", "Surprise", "Other"], size=n_eval, replace=False))
    else:
        words = [_CAT_WORD[lab]] * n_eval
        others = [w for w in _CAT_WORD.values() if w != _CAT_WORD[lab]]
        if rng.random() < 0.6:      # one dissenting evaluator, majority still holds
            words[int(rng.integers(n_eval))] = str(rng.choice(others))
    mean = np.array(u.vad if getattr(u, "vad", None) is not None else _VAD_MEAN[lab])
    evals = np.clip(np.rint(mean + rng.normal(0.0, 0.6, (2, 3))), 1, 5).astype(int)   # A-E*
    own = np.clip(np.rint(mean + rng.normal(0.0, 0.7, 3)), 1, 5).astype(int)           # self
    vad = evals.mean(axis=0)
    ev_ids = sorted(rng.choice([1, 2, 3, 4, 5, 6], size=n_eval, replace=False).tolist())
    self_id = f"{u.gender}1"
    lines = [f"[{u.start:.4f} - {end:.4f}]\t{u.utt_id}\t{lab}\t{_fmt_vad(vad)}"]
    for e, w in zip(ev_ids, words):
        extra = f" {_CAT_WORD['fru']};" if rng.random() < 0.1 and w != _CAT_WORD["fru"] else ""
        lines.append(f"C-E{e}:\t{w};{extra}\t()")
    self_word = words[0] if lab != "xxx" else "Other"
    note = str(rng.choice(["", "", "", "curious", "tense", "calm", "annoyed"]))
    lines.append(f"C-{self_id}:\t{self_word};\t({note})")
    for e, (v, a, d) in zip(ev_ids[:2], evals):
        lines.append(f"A-E{e}:\tval {v}; act {a}; dom  {d};\t()")
    lines.append(f"A-{self_id}:\tval {own[0]}; act {own[1]}; dom  {own[2]};\t()")
    return lines, {"ev_ids": ev_ids, "words": words, "evals": evals}


def _write_text(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_wav(path: Path, audio: np.ndarray, sr: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), audio, sr, subtype="PCM_16", format="WAV")


def turn_genders(rng: np.random.Generator, dialog: str, n: int) -> list[str]:
    """Who speaks each of a dialog's ``n`` turns: the lead (the dialog name's ``F``/``M``) starts, the
    other answers, then a quarter of the turns keep the speaker and the rest alternate."""
    lead = dialog[5]
    genders = [lead, "M" if lead == "F" else "F"]
    for _ in range(n - 2):
        genders.append(genders[-1] if rng.random() < 0.25 else ("M" if genders[-1] == "F" else "F"))
    return genders


def annotate(rng: np.random.Generator, u: _Utt, end: float, emo: list, cat: list, atr: list, trans: list) -> None:
    """One utterance's lines in its dialog's EmoEvaluation, Categorical, Attribute and transcription files."""
    block, ev = _annotation_block(rng, u, end)
    emo += block + [""]
    cat.append(f"{u.utt_id} :{ev['words'][0].replace('Neutral', 'Neutral state')}; ()")
    v, a, dm = ev["evals"][0]
    atr.append(f"{u.utt_id} :act {a}; val {v}; dom  {dm}; ()")
    n_words = max(1, int(round((end - u.start) * rng.uniform(1.5, 3.0))))
    text = " ".join(rng.choice(_WORDS, size=n_words)).capitalize() + "."
    trans.append(f"{u.utt_id} [{u.start:08.4f}-{end:08.4f}]: {text}")


def write_dialog(sess_dir: Path, dialog: str, utts: list, sr: int, emo: list, cat: list, atr: list, trans: list,
                 first_two: list, junk: bool) -> None:
    """A dialog's files beside its utterances' wavs, as the release has them: the annotations
    (EmoEvaluation, Categorical, Attribute, the Self-evaluation ANVIL), the transcription with a
    non-utterance turn, the dialog's wav (its first two utterances here), and macOS AppleDouble junk
    beside real files (``junk``: also beside the dialog's annotation and wav)."""
    emo_dir, wav_dir = sess_dir / "dialog" / "EmoEvaluation", sess_dir / "sentences" / "wav" / dialog
    last_end = utts[-1].start + utts[-1].n_samples / sr
    trans.append(f"{dialog}_{dialog[5]}XX0 [{last_end + 0.1:08.4f}-{last_end + 0.6:08.4f}]: [LAUGHTER]")
    _write_text(emo_dir / f"{dialog}.txt", emo)
    _write_text(emo_dir / "Categorical" / f"{dialog}_e1_cat.txt", cat)
    _write_text(emo_dir / "Attribute" / f"{dialog}_e1_atr.txt", atr)
    _write_text(emo_dir / "Self-evaluation" / f"{dialog}.anvil", [
        '<?xml version="1.0" encoding="ISO-8859-1"?>',
        "<annotation>",
        f'  <head><video src="{dialog}.avi"/></head>',
        "  <body>",
        *(f'    <el index="{i}" start="{u.start:.4f}" end="{u.start + u.n_samples / sr:.4f}">'
          f'<attribute name="utterance">{u.utt_id}</attribute></el>'
          for i, u in enumerate(utts)),
        "  </body>",
        "</annotation>"])
    _write_text(sess_dir / "dialog" / "transcriptions" / f"{dialog}.txt", trans)
    _write_wav(sess_dir / "dialog" / "wav" / f"{dialog}.wav",
               np.concatenate([first_two[0], np.zeros(int(0.2 * sr)), first_two[1]]), sr)
    (wav_dir / f"._{utts[0].utt_id}.wav").write_bytes(_APPLEDOUBLE)
    if junk:
        (emo_dir / f"._{dialog}.txt").write_bytes(_APPLEDOUBLE)
        (sess_dir / "sentences" / "wav" / f"._{dialog}").write_bytes(_APPLEDOUBLE)
        (sess_dir / "dialog" / "wav" / f"._{dialog}.wav").write_bytes(_APPLEDOUBLE)
