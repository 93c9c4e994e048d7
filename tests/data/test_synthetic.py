"""Tests for the synthetic IEMOCAP-layout corpus generator (serray.data.synthetic)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from serray.data.synthetic import LABELS_DROPPED, LABELS_KEPT, make_corpus
from serray.errors import ConfigError

UTT_LINE = re.compile(r"^\[(\d+\.\d+) - (\d+\.\d+)\]\t(\S+)\t(\S+)\t\[(.+)\]$")
EVAL_LINE = re.compile(r"^(C-(E\d|F1|M1):\t.+;\t\(.*\)|A-(E\d|F1|M1):\tval \d; act \d; dom  \d;\t\(.*\))$")
FOUR_CLASS = {"neu": 0, "hap": 1, "exc": 1, "sad": 2, "ang": 3}
UTT_PER_DIALOG = 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = make_corpus(tmp_path_factory.mktemp("iemocap"), seed=0,
                       utterances_per_dialog=UTT_PER_DIALOG)
    assert isinstance(root, Path)
    return root


def parse(root: Path) -> list[dict]:
    """A minimal IEMOCAP parser: utterance lines of SessionN/dialog/EmoEvaluation/<dialog>.txt."""
    rows = []
    for session in range(1, 6):
        emo = root / f"Session{session}" / "dialog" / "EmoEvaluation"
        for txt in sorted(emo.glob("Ses*.txt")):
            lines = txt.read_text(encoding="utf-8").splitlines()
            assert lines[0] == "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]"
            for i, line in enumerate(lines):
                m = UTT_LINE.match(line)
                if not m:
                    continue
                # evaluator lines follow, then a blank line
                j = i + 1
                while lines[j]:
                    assert EVAL_LINE.match(lines[j]), lines[j]
                    j += 1
                assert j - i - 1 >= 4
                start, end, utt, label, vad = m.groups()
                dialog, last = utt.rsplit("_", 1)
                assert dialog == txt.stem
                rows.append(dict(session=session, dialog=dialog, utt=utt, label=label,
                                 start=float(start), end=float(end),
                                 vad=[float(v) for v in vad.split(", ")],
                                 speaker=f"Ses{session:02d}{last[0]}",
                                 wav=root / f"Session{session}" / "sentences" / "wav" / dialog / f"{utt}.wav"))
    return rows


def test_layout_and_annotations(corpus):
    rows = parse(corpus)
    assert len(rows) == 5 * 4 * UTT_PER_DIALOG
    assert len({r["utt"] for r in rows}) == len(rows)                      # each utt once
    assert sorted(p.name for p in corpus.glob("Session*")) == [f"Session{i}" for i in range(1, 6)]
    for r in rows:
        assert r["wav"].is_file(), r["wav"]
        assert re.fullmatch(r"Ses0[1-5][FM]_(impro\d\d|script\d\d_\d)_[FM]\d{3}", r["utt"])
        assert all(1.0 <= v <= 5.0 for v in r["vad"]) and len(r["vad"]) == 3
    # the utterance wavs of a dialog are exactly the annotated utterances (plus AppleDouble junk)
    for session in range(1, 6):
        wav_root = corpus / f"Session{session}" / "sentences" / "wav"
        for d in wav_root.iterdir():
            if d.name.startswith("._"):
                assert d.is_file()
                continue
            names = {p.stem for p in d.glob("*.wav") if not p.name.startswith("._")}
            assert names == {r["utt"] for r in rows if r["dialog"] == d.name}
    for session in range(1, 6):
        srows = [r for r in rows if r["session"] == session]
        assert {r["speaker"][-1] for r in srows} == {"F", "M"}
        for dialog in {r["dialog"] for r in srows}:
            # both actors speak in every dialog, whoever leads it
            assert {r["speaker"] for r in srows if r["dialog"] == dialog} == {
                f"Ses{session:02d}F", f"Ses{session:02d}M"}
        dialogs = {r["dialog"] for r in srows}
        assert any("_impro" in d for d in dialogs) and any("_script" in d for d in dialogs)
        assert {d[5] for d in dialogs} == {"F", "M"}
        # turns are consecutive, non-overlapping, with gaps
        for dialog in dialogs:
            drows = [r for r in srows if r["dialog"] == dialog]
            assert all(a["end"] < b["start"] for a, b in zip(drows, drows[1:]))
            ids = [r["utt"].rsplit("_", 1)[1] for r in drows]
            for g in "FM":
                nums = [int(i[1:]) for i in ids if i[0] == g]
                assert nums == list(range(len(nums)))                        # per-speaker numbering


def test_labels(corpus):
    rows = parse(corpus)
    labels = Counter(r["label"] for r in rows)
    assert set(labels) <= set(LABELS_KEPT) | set(LABELS_DROPPED)
    assert set(LABELS_KEPT) <= set(labels)
    n_dropped = sum(labels[lab] for lab in LABELS_DROPPED)
    assert 0.08 * len(rows) <= n_dropped <= 0.25 * len(rows)
    assert labels["fru"] == max(labels[lab] for lab in LABELS_DROPPED)
    four = Counter(FOUR_CLASS[r["label"]] for r in rows if r["label"] in FOUR_CLASS)
    assert max(four.values()) - min(four.values()) <= 8                      # balanced-ish
    assert 0 < labels["exc"] < four[1]
    vad = {lab: np.mean([r["vad"] for r in rows if r["label"] == lab], axis=0)
           for lab in ("neu", "hap", "sad", "ang")}
    assert vad["ang"][0] < vad["hap"][0] and vad["ang"][1] > vad["sad"][1]


def test_audio_matches_annotation(corpus):
    for r in parse(corpus):
        info = sf.info(str(r["wav"]))
        assert (info.samplerate, info.channels, info.subtype, info.format) == (16000, 1, "PCM_16", "WAV")
        assert abs(info.frames / info.samplerate - (r["end"] - r["start"])) < 1e-3
        assert 1.0 - 1e-3 <= info.duration <= 2.5 + 1e-3
        x, _ = sf.read(str(r["wav"]))
        assert np.abs(x).max() < 0.99
        assert np.sqrt(np.mean(x ** 2)) > 1e-3


def test_non_utterance_files(corpus):
    for session in range(1, 6):
        sess = corpus / f"Session{session}"
        emo = sess / "dialog" / "EmoEvaluation"
        junk = list(sess.rglob("._*"))
        assert any(p.suffix == ".wav" and p.parent.parent.name == "wav" for p in junk)
        assert (emo / f"._{sorted(emo.glob('Ses*.txt'))[0].name}").is_file()
        for p in junk:
            with pytest.raises(Exception):
                sf.read(str(p))
        for txt in emo.glob("Ses*.txt"):
            d = txt.stem
            assert (sess / "dialog" / "wav" / f"{d}.wav").is_file()
            assert (emo / "Categorical" / f"{d}_e1_cat.txt").is_file()
            assert (emo / "Attribute" / f"{d}_e1_atr.txt").is_file()
            assert (emo / "Self-evaluation" / f"{d}.anvil").is_file()
            trans = (sess / "dialog" / "transcriptions" / f"{d}.txt").read_text().splitlines()
            assert all(re.match(rf"^{d}_[FM]\S* \[\d+\.\d+-\d+\.\d+\]: .+$", t) for t in trans)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic(tmp_path):
    kw = dict(dialogs_per_session=2, utterances_per_dialog=2, max_duration=1.2)
    a = _tree(make_corpus(tmp_path / "a", seed=7, **kw))
    b = _tree(make_corpus(tmp_path / "b", seed=7, **kw))
    c = _tree(make_corpus(tmp_path / "c", seed=8, **kw))
    assert a == b
    wavs = [k for k in a if k.endswith(".wav") and "/sentences/" in k and "/._" not in k]
    assert len(wavs) == 5 * 2 * 2
    assert all(a[k] != c.get(k) for k in wavs if k in c)


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError):
        make_corpus(tmp_path, drop_fraction=1.5)
    with pytest.raises(ConfigError):
        make_corpus(tmp_path, min_duration=3.0, max_duration=2.0)
    with pytest.raises(ConfigError):
        make_corpus(tmp_path, utterances_per_dialog=1)


def _features(x: np.ndarray, sr: int) -> list[float]:
    """Log energy, autocorrelation pitch statistics and spectral centroid of one utterance."""
    fl, hop = int(0.04 * sr), int(0.01 * sr)
    n = 1 + (len(x) - fl) // hop
    frames = x[np.arange(fl)[None, :] + hop * np.arange(n)[:, None]] * np.hanning(fl)
    energy = np.log(np.mean(frames ** 2, axis=1) + 1e-10)
    active = energy > energy.max() - 5.0
    power = np.abs(np.fft.rfft(frames, n=2 * fl, axis=1)) ** 2
    centroid = (power * np.fft.rfftfreq(2 * fl, 1 / sr)).sum(1) / (power.sum(1) + 1e-12)
    ac = np.fft.irfft(power, axis=1)[:, :fl]
    ac = ac / (ac[:, :1] + 1e-12)
    lo, hi = sr // 500, sr // 60
    lag = lo + np.argmax(ac[:, lo:hi], axis=1)
    voiced = active & (ac[np.arange(n), lag] > 0.4)
    lf0 = np.log(sr / lag[voiced]) if voiced.sum() > 2 else np.full(3, np.log(150.0))
    return [energy[active].mean(), energy[active].std(), np.median(lf0),
            np.percentile(lf0, 90) - np.percentile(lf0, 10), centroid[active].mean(),
            active.mean()]


def test_emotion_learnable_from_audio_on_unseen_speakers(corpus):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rows = [r for r in parse(corpus) if r["label"] in FOUR_CLASS]
    X = np.array([_features(*sf.read(str(r["wav"]))) for r in rows])
    y = np.array([FOUR_CLASS[r["label"]] for r in rows])
    session = np.array([r["session"] for r in rows])
    accs = []
    for held_out in range(1, 6):     # leave-one-session-out: test speakers never seen in training
        train, test = session != held_out, session == held_out
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        clf.fit(X[train], y[train])
        accs.append(clf.score(X[test], y[test]))
    print("synthetic 4-class LOSO accuracy per held-out session:", np.round(accs, 3))
    assert np.mean(accs) >= 0.5, accs           # chance is 0.25
    assert min(accs) >= 0.35, accs
