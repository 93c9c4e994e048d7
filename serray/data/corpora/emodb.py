"""EmoDB (Berlin Database of Emotional Speech): ``wav/<speaker><text><emotion><version>.wav``.

Facts of the release this parser relies on (the official ``download.zip``; audformat's EmoDB example):

* 535 files named like ``03a01Fa.wav``: speaker (2 digits; 03 08 09 10 11 12 13 14 15 16), text
  (a01 ... b10), emotion letter of the German word, version letter. The letters: W anger (Wut),
  L boredom (Langeweile), E disgust (Ekel), A fear (Angst), F happiness (Freude), T sadness
  (Trauer), N neutral. **A is fear, not anger; W is anger**;
* the audio folder is ``wav/`` in the official zip and ``wav_corpus/`` in another redistribution:
  both are read; ``lablaut/``, ``labsilb/``, ``silb/``, ``erkennung.txt`` and ``._*`` stubs are not;
* speakers 03, 10, 11, 12 and 15 are male, the rest female.

Protocol: leave-one-speaker-out, 10 folds: fold group k is the k-th speaker in id order
(03 -> 1, 08 -> 2, ..., 16 -> 10).
"""

from __future__ import annotations

import re

from serray.data.corpora.base import (Corpus, ManifestReport, cfg_get, check_root, label_space, apply_labels, no_match,
                                row, walk_files)

NAME_RE = re.compile(r"^(?P<speaker>\d\d)(?P<text>[ab]\d\d)(?P<emotion>[WLEAFTN])(?P<version>[a-z])\.wav$")
SPEAKERS = ("03", "08", "09", "10", "11", "12", "13", "14", "15", "16")
MALE = ("03", "10", "11", "12", "15")
LETTERS = {"W": "anger", "L": "boredom", "E": "disgust", "A": "fear", "F": "happiness", "T": "sadness",
           "N": "neutral"}
EMOTIONS = {"anger": "ang", "boredom": "", "disgust": "", "fear": "", "happiness": "hap", "sadness": "sad",
            "neutral": "neu"}
#: data.classes: native -- the seven emotions
NATIVE = {"anger": "ang", "boredom": "bor", "disgust": "dis", "fear": "fea", "happiness": "hap", "sadness": "sad",
          "neutral": "neu"}


def build(root, data_cfg, keep_unlabelled: bool = False) -> ManifestReport:
    root = check_root(root, CORPUS)
    folders = [root / d for d in ("wav", "wav_corpus") if (root / d).is_dir()]
    if not folders:
        raise no_match(root, CORPUS, "no wav/ (or wav_corpus/) directory")
    parsed, malformed, ignored = [], [], {}
    for folder in folders:
        files, ign = walk_files(folder)
        for k, v in ign.items():
            ignored[k] = ignored.get(k, 0) + v
        for path in files:
            m = NAME_RE.match(path.name)
            if m is None or m["speaker"] not in SPEAKERS:
                malformed.append(f"{path}: not <speaker><text><emotion><version>.wav")
                continue
            parsed.append((path, m))
    if not parsed:
        raise no_match(root, CORPUS, "no files named like 03a01Fa.wav in wav/")
    entries = [{**row(path.stem, SPEAKERS.index(m["speaker"]) + 1, m["speaker"],
                      "M" if m["speaker"] in MALE else "F", LETTERS[m["emotion"]], "", path, dialog=m["text"],
                      method=m["version"]), "where": path.name}
               for path, m in parsed]
    return apply_labels(entries, label_space(CORPUS, data_cfg), keep_unlabelled, CORPUS,
                        {"malformed": malformed, "ignored": ignored})


CORPUS = Corpus(
    name="emodb", title="EmoDB", group_name="speaker", protocol="leave_one_speaker_out",
    layout="wav/<speaker><text><emotion><version>.wav, e.g. wav/03a01Fa.wav",
    raw_labels=EMOTIONS, native=NATIVE, build=build, groups=lambda data_cfg: list(range(1, len(SPEAKERS) + 1)),
)
