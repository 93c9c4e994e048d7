"""RAVDESS, speech, audio-only: ``Actor_NN/03-01-EE-II-SS-RR-AA.wav`` (24 actors, 1,440 files).

Facts of the release this parser relies on (Zenodo 1188976, ``Audio_Speech_Actors_01-24.zip``):

* each file name is seven two-digit fields: modality (03 audio-only), vocal channel (01 speech,
  02 song), emotion (01 neutral, 02 calm, 03 happy, 04 sad, 05 angry, 06 fearful, 07 disgust,
  08 surprised), intensity (01 normal, 02 strong), statement, repetition, actor (01-24; odd male,
  even female). Only ``03-01-`` files are read: song and video files are counted and ignored;
* tools unpack the zip with or without its ``Audio_Speech_Actors_01-24/`` level, so ``Actor_NN``
  folders are searched for anywhere under the root; ``__MACOSX/`` and ``._*`` stubs are ignored;
* calm (02) is its own class: dropped by default, ``data.label_map={calm: neu}`` merges it into
  neutral (the choice papers make either way; say which one you made).

Protocol: speaker-grouped k-fold over actors (``data.num_folds``, 5 by default).
"""

from __future__ import annotations

import re

from serray.data.corpora.base import (Corpus, ManifestReport, cfg_get, check_root, kfold_groups, label_space, apply_labels,
                                no_match, row, speaker_folds, walk_files)

NAME_RE = re.compile(r"^(?P<modality>\d\d)-(?P<channel>\d\d)-(?P<emotion>0[1-8])-(?P<intensity>0[12])-"
                     r"(?P<statement>0[12])-(?P<repetition>0[12])-(?P<actor>\d\d)\.wav$", re.IGNORECASE)
EMOTION_CODES = {"01": "neutral", "02": "calm", "03": "happy", "04": "sad", "05": "angry", "06": "fearful",
                 "07": "disgust", "08": "surprised"}
EMOTIONS = {"neutral": "neu", "calm": "", "happy": "hap", "sad": "sad", "angry": "ang", "fearful": "",
            "disgust": "", "surprised": ""}
#: data.classes: native -- the eight emotions, calm its own class
NATIVE = {"neutral": "neu", "calm": "cal", "happy": "hap", "sad": "sad", "angry": "ang", "fearful": "fea",
          "disgust": "dis", "surprised": "sur"}


def build(root, data_cfg, keep_unlabelled: bool = False) -> ManifestReport:
    root = check_root(root, CORPUS)
    files, ignored = walk_files(root)
    parsed, malformed = [], []
    for path in files:
        if not path.parent.name.startswith("Actor_"):
            ignored["files outside Actor_NN/"] = ignored.get("files outside Actor_NN/", 0) + 1
            continue
        m = NAME_RE.match(path.name)
        if m is None:
            malformed.append(f"{path}: not MM-VV-EE-II-SS-RR-AA.wav")
            continue
        if (m["modality"], m["channel"]) != ("03", "01"):
            ignored["song / video files"] = ignored.get("song / video files", 0) + 1
            continue
        if path.parent.name != f"Actor_{m['actor']}":
            malformed.append(f"{path}: actor {m['actor']} in folder {path.parent.name}")
            continue
        parsed.append((path, m))
    if not parsed:
        raise no_match(root, CORPUS, "no Actor_NN/03-01-*.wav speech files")
    actors = {m["actor"]: ("M" if int(m["actor"]) % 2 else "F") for _, m in parsed}
    groups = speaker_folds(actors, len(kfold_groups(data_cfg)), CORPUS.title)
    entries = [{**row(path.stem, groups[m["actor"]], f"Actor_{m['actor']}", actors[m["actor"]],
                      EMOTION_CODES[m["emotion"]], "", path, dialog=f"statement{m['statement']}",
                      method="strong" if m["intensity"] == "02" else "normal"), "where": path.name}
               for path, m in parsed]
    return apply_labels(entries, label_space(CORPUS, data_cfg), keep_unlabelled, CORPUS,
                        {"malformed": malformed, "ignored": ignored})


CORPUS = Corpus(
    name="ravdess", title="RAVDESS", group_name="fold", protocol="speaker_kfold",
    layout="[Audio_Speech_Actors_01-24/]Actor_NN/03-01-EE-II-SS-RR-AA.wav",
    raw_labels=EMOTIONS, native=NATIVE, build=build, groups=kfold_groups,
)
