"""CREMA-D: ``AudioWAV/<actor>_<sentence>_<emotion>_<level>.wav`` (91 actors, 7,442 clips).

Facts of the release this parser relies on (``CheyneyComputerScience/CREMA-D``):

* the audio is ``AudioWAV/AAAA_SSS_EEE_LL.wav``: a 4-digit actor id (1001-1091), one of 12 sentence
  codes, the *acted* emotion (ANG DIS FEA HAP NEU SAD) and an intensity (LO MD HI, or XX unspecified;
  the graded levels occur only with sentence IEO). A name that fails this grammar is reported as
  malformed, never guessed at (an old copy holds ``1040_ITH_SAD_X.wav``);
* ``VideoDemographics.csv`` (ActorID, Age, Sex, Race, Ethnicity) gives each actor's sex (gender ``""``
  when it is absent);
* ``AudioMP3/``, ``VideoFlash/`` and the vote tables are not read; the label is the acted emotion of
  the file name (the crowd's voice-only vote agrees with it for 42 % of the clips: a different label
  source);
* media files live in Git LFS: a clone without LFS holds pointer files, which are refused with the fix.

Protocol: speaker-grouped k-fold over actors (``data.num_folds``, 5 by default; the release has no
official split). Fold groups are the actors dealt round-robin by sex then id
(:func:`serray.data.corpora.base.speaker_folds`).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from serray.data.corpora.base import (Corpus, ManifestReport, cfg_get, check_root, kfold_groups, label_space, apply_labels,
                                no_match, row, speaker_folds, walk_files)

NAME_RE = re.compile(r"^(?P<actor>\d{4})_(?P<sentence>[A-Z]{3})_(?P<emotion>[A-Z]{3})_(?P<level>LO|MD|HI|XX)\.wav$",
                     re.IGNORECASE)
SENTENCES = ("IEO", "TIE", "IOM", "IWW", "TAI", "MTI", "IWL", "ITH", "DFA", "ITS", "TSI", "WSI")
EMOTIONS = {"NEU": "neu", "HAP": "hap", "SAD": "sad", "ANG": "ang", "DIS": "", "FEA": ""}
#: data.classes: native -- the six acted emotions
NATIVE = {"NEU": "neu", "HAP": "hap", "SAD": "sad", "ANG": "ang", "FEA": "fea", "DIS": "dis"}


def _sexes(root: Path) -> dict:
    path = root / "VideoDemographics.csv"
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        return {r.get("ActorID", "").strip(): {"Male": "M", "Female": "F"}.get(r.get("Sex", "").strip(), "")
                for r in csv.DictReader(f)}


def build(root, data_cfg, keep_unlabelled: bool = False) -> ManifestReport:
    root = check_root(root, CORPUS)
    audio = root / "AudioWAV"
    if not audio.is_dir():
        raise no_match(root, CORPUS, "no AudioWAV/ directory")
    files, ignored = walk_files(audio)
    parsed, malformed = [], []
    for path in files:
        m = NAME_RE.match(path.name)
        if m is None or m["sentence"].upper() not in SENTENCES:
            malformed.append(f"{path}: not AAAA_SSS_EEE_LL.wav")
            continue
        parsed.append((path, m))
    if not parsed:
        raise no_match(root, CORPUS, f"no AudioWAV/AAAA_SSS_EEE_LL.wav files ({len(malformed)} other .wav)")
    sexes = _sexes(root)
    actors = {m["actor"]: sexes.get(m["actor"], "") for _, m in parsed}
    groups = speaker_folds(actors, len(kfold_groups(data_cfg)), CORPUS.title)
    entries = [{**row(path.stem, groups[m["actor"]], m["actor"], actors[m["actor"]], m["emotion"].upper(), "", path,
                      dialog=m["sentence"].upper(), method=m["level"].upper()), "where": path.name}
               for path, m in parsed]
    return apply_labels(entries, label_space(CORPUS, data_cfg), keep_unlabelled, CORPUS,
                        {"malformed": malformed, "ignored": ignored})


CORPUS = Corpus(
    name="crema-d", title="CREMA-D", group_name="fold", protocol="speaker_kfold",
    layout="AudioWAV/<actor>_<sentence>_<emotion>_<level>.wav (+ VideoDemographics.csv)",
    raw_labels=EMOTIONS, native=NATIVE, build=build, groups=kfold_groups,
)
