"""The built-in synthetic corpus written in the layout of another release, so every corpus parser and
the cross-corpus path run end to end offline (``serray make-corpus --layout crema-d``).

The utterances are those of :func:`serray.data.synthetic.make_corpus` (the same voices, labels and
seed), re-filed as the target release files them: the file-name grammar, the label files, the
speaker ids and genders, and the release's decoys (``._*`` AppleDouble stubs, ``__MACOSX/``, song
files, a malformed name, annotation folders, a label row without audio, withheld Test3 rows). The
IEMOCAP speakers become the target's speakers (gender kept); raw labels the target does not have
are left out. What each layout maps is in :data:`LAYOUT_LABELS`.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List

import pandas as pd

from serray.errors import ConfigError

#: Layouts ``make-corpus`` writes (``iemocap`` is the generator's own).
LAYOUTS = ("iemocap", "crema-d", "ravdess", "emodb", "msp-podcast", "csv")

#: Synthetic (IEMOCAP) raw label -> the target's raw label; absent: not written in that layout.
LAYOUT_LABELS: Dict[str, Dict[str, str]] = {
    "crema-d": {"neu": "NEU", "hap": "HAP", "exc": "HAP", "sad": "SAD", "ang": "ANG", "fea": "FEA", "dis": "DIS"},
    "ravdess": {"neu": "01", "fru": "02", "hap": "03", "exc": "03", "sad": "04", "ang": "05", "fea": "06",
                "dis": "07", "sur": "08"},
    "emodb": {"ang": "W", "fru": "L", "dis": "E", "fea": "A", "hap": "F", "exc": "F", "sad": "T", "neu": "N"},
    "msp-podcast": {"ang": "A", "hap": "H", "exc": "H", "sad": "S", "neu": "N", "sur": "U", "fea": "F", "dis": "D",
                    "fru": "C", "oth": "O", "xxx": "X"},
    "csv": {"neu": "neutral", "hap": "happy", "exc": "happy", "sad": "sad", "ang": "angry"},
}


def native_classes(layout: str) -> List[str]:
    """The synthetic raw labels a layout files as distinct classes of its own (``data.classes: native``):
    the ones the generator balances over when the run asks for more than the four classes."""
    from serray.data.synthetic import CLASSES_OWN

    if layout not in LAYOUT_LABELS:  # iemocap: its native classes are the four
        return ["neu", "hap", "sad", "ang"]
    return [c for c in CLASSES_OWN if c in LAYOUT_LABELS[layout]]


def _place(src: str, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _decoy(path: Path, data: bytes = b"\x00\x05\x16\x07AppleDouble junk") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _speakers(df: pd.DataFrame) -> List[tuple]:
    """(speaker, gender) of the source corpus, in id order."""
    return sorted({(s, g) for s, g in zip(df["speaker"], df["gender"])})


def _crema_d(df: pd.DataFrame, out: Path) -> int:
    from serray.data.corpora.crema_d import SENTENCES

    slots = [(s, "XX") for s in SENTENCES[1:]] + [("IEO", lv) for lv in ("LO", "MD", "HI", "XX")]
    actors = {spk: (str(1001 + i), g) for i, (spk, g) in enumerate(_speakers(df))}
    used: Dict[tuple, int] = {}
    n = 0
    for r in df.itertuples():
        emo = LAYOUT_LABELS["crema-d"].get(r.raw_label)
        actor = actors[r.speaker][0]
        k = used.get((actor, emo), 0)
        if emo is None or k >= len(slots):
            continue
        used[(actor, emo)] = k + 1
        sentence, level = slots[k]
        _place(r.path, out / "AudioWAV" / f"{actor}_{sentence}_{emo}_{level}.wav")
        n += 1
    with open(out / "VideoDemographics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ActorID", "Age", "Sex", "Race", "Ethnicity"])
        for actor, g in sorted(actors.values()):
            w.writerow([actor, 30, "Male" if g == "M" else "Female", "Caucasian", "Not Hispanic"])
    first = sorted((out / "AudioWAV").iterdir())[0]
    _decoy(out / "AudioWAV" / f"._{first.name}")
    shutil.copyfile(first, out / "AudioWAV" / "1040_ITH_SAD_X.wav")  # the renamed file of old copies
    (out / "AudioMP3").mkdir(exist_ok=True)
    (out / "processedResults").mkdir(exist_ok=True)
    (out / "processedResults" / "summaryTable.csv").write_text(",FileName,VoiceVote,VoiceLevel\n")
    (out / "SentenceFilenames.csv").write_text("Stimulus_Number,Filename\n")
    return n


def _ravdess(df: pd.DataFrame, out: Path) -> int:
    top = out / "Audio_Speech_Actors_01-24"
    males = [s for s, g in _speakers(df) if g == "M"]
    females = [s for s, g in _speakers(df) if g != "M"]
    actors = {**{s: 2 * i + 1 for i, s in enumerate(males)}, **{s: 2 * i + 2 for i, s in enumerate(females)}}
    used: Dict[tuple, int] = {}
    n = 0
    for r in df.itertuples():
        emo = LAYOUT_LABELS["ravdess"].get(r.raw_label)
        actor = actors[r.speaker]
        slots = [(i, s, rep) for i in ("01", "02") for s in ("01", "02") for rep in ("01", "02")
                 if not (emo == "01" and i == "02")]  # neutral has no strong intensity
        k = used.get((actor, emo), 0)
        if emo is None or k >= len(slots):
            continue
        used[(actor, emo)] = k + 1
        intensity, statement, rep = slots[k]
        name = f"03-01-{emo}-{intensity}-{statement}-{rep}-{actor:02d}.wav"
        _place(r.path, top / f"Actor_{actor:02d}" / name)
        n += 1
    first = sorted((top / "Actor_01").iterdir())[0]
    _decoy(out / "__MACOSX" / "Audio_Speech_Actors_01-24" / "Actor_01" / f"._{first.name}")
    shutil.copyfile(first, top / "Actor_01" / first.name.replace("03-01-", "03-02-", 1))  # a song file
    _decoy(top / ".DS_Store", b"Bud1")
    return n


def _emodb(df: pd.DataFrame, out: Path) -> int:
    from serray.data.corpora.emodb import MALE, SPEAKERS

    males = [s for s, g in _speakers(df) if g == "M"]
    females = [s for s, g in _speakers(df) if g != "M"]
    female_ids = [s for s in SPEAKERS if s not in MALE]
    ids = {**dict(zip(males, MALE)), **dict(zip(females, female_ids))}
    texts = ("a01", "a02", "a04", "a05", "a07", "b01", "b02", "b03", "b09", "b10")
    used: Dict[tuple, int] = {}
    n = 0
    for r in df.itertuples():
        letter = LAYOUT_LABELS["emodb"].get(r.raw_label)
        spk = ids.get(r.speaker)
        if letter is None or spk is None:
            continue
        k = used.get((spk, letter), 0)
        used[(spk, letter)] = k + 1
        name = f"{spk}{texts[k % len(texts)]}{letter}{'abcdefghijklmnopqrstuvwxyz'[k // len(texts)]}.wav"
        _place(r.path, out / "wav" / name)
        n += 1
    for folder in ("lablaut", "labsilb", "silb"):
        (out / folder).mkdir(exist_ok=True)
    (out / "erkennung.txt").write_text("Satz\terkannt\n03a01Wa\t0,95\n", encoding="latin-1")
    first = sorted((out / "wav").iterdir())[0]
    _decoy(out / "wav" / f"._{first.name}")
    return n


def _msp_podcast(df: pd.DataFrame, out: Path) -> int:
    splits = {1: "Train", 2: "Train", 3: "Test2", 4: "Development", 5: "Test1"}
    spk_ids = {s: str(100 + i) for i, (s, _) in enumerate(_speakers(df))}
    rows = []
    n = 0
    for i, r in enumerate(df.itertuples()):
        code = LAYOUT_LABELS["msp-podcast"].get(r.raw_label)
        if code is None:
            continue
        name = f"MSP-PODCAST_{1000 + i // 50:04d}_{i % 50:04d}.wav"
        _place(r.path, out / "Audios" / name)
        scale = (lambda v: round(1 + (float(v) - 1) * 1.5, 2))  # IEMOCAP's 1-5 to MSP-Podcast's 1-7
        unknown = n < 2  # a couple of turns without a speaker identity, as in the release
        rows.append({"FileName": name, "EmoClass": code, "EmoAct": scale(r.activation), "EmoVal": scale(r.valence),
                     "EmoDom": scale(r.dominance), "SpkrID": "Unknown" if unknown else spk_ids[r.speaker],
                     "Gender": "Unknown" if unknown else ("Male" if r.gender == "M" else "Female"),
                     "Split_Set": splits[int(r.session)]})
        n += 1
    rows.append({**rows[-1], "FileName": "MSP-PODCAST_9999_0001.wav", "Split_Set": "Test3", "EmoClass": "X"})
    rows.append({**rows[-2], "FileName": "MSP-PODCAST_9999_0002.wav"})  # a labelled turn whose audio is missing
    (out / "Labels").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out / "Labels" / "labels_consensus.csv", index=False)
    pd.DataFrame(rows).head(3).to_csv(out / "Labels" / "labels_detailed.csv", index=False)
    (out / "Partition.txt").write_text("".join(f"{r['Split_Set']}; {r['FileName']}\n" for r in rows))
    _decoy(out / "Audios" / f"._{rows[0]['FileName']}")
    return n


def _csv(df: pd.DataFrame, out: Path) -> int:
    rows = []
    for r in df.itertuples():
        label = LAYOUT_LABELS["csv"].get(r.raw_label)
        if label is None:
            continue
        rel = Path("wav") / r.speaker / f"{r.utt_id}.wav"
        _place(r.path, out / rel)
        rows.append({"path": rel.as_posix(), "label": label, "speaker": r.speaker, "gender": r.gender})
    pd.DataFrame(rows).to_csv(out / "labels.csv", index=False)
    return len(rows)


WRITERS = {"crema-d": _crema_d, "ravdess": _ravdess, "emodb": _emodb, "msp-podcast": _msp_podcast, "csv": _csv}


def make_layout(out_dir, layout: str, **synthetic_kwargs) -> Path:
    """Write the synthetic corpus (``make_corpus`` arguments) to ``out_dir`` in ``layout``.

    Returns:
        ``out_dir`` (for ``csv``: the ``labels.csv`` inside it, which is what ``data.root`` names).

    Raises:
        ConfigError: an unknown layout, or ``out_dir`` exists and is not empty.
    """
    from serray.data.corpora.iemocap import build_manifest
    from serray.data.synthetic import make_corpus

    if layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    out = Path(out_dir).expanduser().resolve()
    if layout == "iemocap":
        return make_corpus(out, **synthetic_kwargs)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty: choose a new directory for the {layout} corpus")
    synthetic_kwargs = {k: v for k, v in synthetic_kwargs.items() if k != "progress"}
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.src.") as tmp:
        src = make_corpus(Path(tmp) / "IEMOCAP_full_release", **synthetic_kwargs)
        df = build_manifest(src, keep_unlabelled=True).kept
        WRITERS[layout](df, out)
    return out / "labels.csv" if layout == "csv" else out
