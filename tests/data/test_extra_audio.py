"""Tests for serray.data.corpora.extra_audio: extra unlabelled audio (directories, manifest files) -> manifest rows.

No Ray here; the featurization of extra audio is tested in test_featurize.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from serray.config import load_config
from serray.data.corpora.extra_audio import extra_audio_manifest, source_key
from serray.data.corpora.base import MANIFEST_COLUMNS
from serray.errors import ConfigError

#: <speaker>/<chapter>/<file>: samples at 16 kHz (FLAC) ...
LIBRI = {"19/198/19-198-0000.flac": 16000, "19/198/19-198-0001.flac": 24000, "19/227/19-227-0000.flac": 8000,
         "26/495/26-495-0000.flac": 32000}
#: ... and a WAV at another rate (22.05 kHz) one level deeper
WAV_22K = ("103/1240/sub/103-1240-0000.wav", 22050 * 3 // 2)


def write_tone(path: Path, frames: int, sr: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(frames) / sr
    sf.write(path, (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), sr)
    return path


def make_librispeech(root: Path) -> Path:
    """A LibriSpeech-like tree plus the junk real trees hold (AppleDouble, hidden dirs, text files)."""
    for rel, frames in LIBRI.items():
        write_tone(root / rel, frames)
    write_tone(root / WAV_22K[0], WAV_22K[1], sr=22050)
    (root / "19" / "198" / "19-198.trans.txt").write_text("19-198-0000 HELLO\n")
    (root / "19" / "198" / "._19-198-0000.flac").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    write_tone(root / ".cache" / "x.wav", 16000)
    write_tone(root / "19" / ".hidden.flac", 16000)
    return root


@pytest.fixture
def libri(tmp_path) -> Path:
    return make_librispeech(tmp_path / "LibriSpeech" / "train-clean-5")


def test_librispeech_tree(libri):
    df = extra_audio_manifest([str(libri)])
    assert list(df.columns) == MANIFEST_COLUMNS
    key = source_key(libri)
    assert key.startswith("train-clean-5-") and len(key) == len("train-clean-5-") + 8
    expected = sorted([*LIBRI, WAV_22K[0]])
    assert list(df["utt_id"]) == sorted(f"extra/{key}/{r.rsplit('.', 1)[0]}" for r in expected)
    assert df["utt_id"].is_unique and df["utt_id"].is_monotonic_increasing
    assert list(df["path"]) == [str(libri / r) for r in sorted(expected, key=lambda r: r.rsplit(".", 1)[0])]
    assert all(Path(p).is_absolute() for p in df["path"])
    by = df.set_index("utt_id")
    assert by.loc[f"extra/{key}/19/198/19-198-0001", "speaker"] == "extra:19"
    assert by.loc[f"extra/{key}/26/495/26-495-0000", "speaker"] == "extra:26"
    assert by.loc[f"extra/{key}/103/1240/sub/103-1240-0000", "speaker"] == "extra:103"
    assert sorted(set(df["speaker"])) == ["extra:103", "extra:19", "extra:26"]
    # durations from the headers (frames / rate), WAV at 22.05 kHz included
    durations = dict(zip(df["path"], df["duration"]))
    for rel, frames in LIBRI.items():
        assert durations[str(libri / rel)] == pytest.approx(frames / 16000)
    assert durations[str(libri / WAV_22K[0])] == pytest.approx(1.5)
    assert (df["end"] == df["duration"]).all() and (df["start"] == 0.0).all()
    assert (df["session"] == 0).all() and df["session"].dtype == "int64"
    for c in ("gender", "raw_label", "label", "dialog", "method"):
        assert (df[c] == "").all(), c
    assert df[["valence", "activation", "dominance"]].isna().all().all()


def test_manifest_files_txt_and_csv(libri, tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    # .txt: one path per line, relative to the manifest's directory, comments and blank lines skipped
    txt = libri / "subset.txt"
    txt.write_text("# two files\n19/198/19-198-0000.flac\n\n26/495/26-495-0000.flac\n")
    # .csv: a path column (absolute or relative) and an optional speaker column
    outside = write_tone(tmp_path / "elsewhere" / "a.wav", 4000)
    csv = lists / "more.csv"
    pd.DataFrame({"path": [str(libri / "19/227/19-227-0000.flac"), "../elsewhere/a.wav"],
                  "speaker": ["reader19", ""], "text": ["x", "y"]}).to_csv(csv, index=False)
    df = extra_audio_manifest([str(txt), str(csv)])
    kt, kc = source_key(txt), source_key(csv)
    assert kt.startswith("subset-") and kc.startswith("more-")
    rel_outside = str(outside).lstrip("/").rsplit(".", 1)[0]
    rows = df.set_index("utt_id")
    assert sorted(rows.index) == sorted([f"extra/{kt}/19/198/19-198-0000", f"extra/{kt}/26/495/26-495-0000",
                                         f"extra/{kc}/{rel_outside}", f"extra/{kc}/{_rel(libri, lists)}"])
    assert rows.loc[f"extra/{kt}/26/495/26-495-0000", "speaker"] == "extra:26"
    assert rows.loc[f"extra/{kt}/26/495/26-495-0000", "duration"] == pytest.approx(2.0)
    assert rows.loc[f"extra/{kc}/{_rel(libri, lists)}", "speaker"] == "extra:reader19"  # the csv column wins
    assert rows.loc[f"extra/{kc}/{rel_outside}", "path"] == str(outside)
    assert rows.loc[f"extra/{kc}/{rel_outside}", "duration"] == pytest.approx(0.25)
    # a .tsv works the same; the same file through a directory and a list is kept once (first source)
    tsv = libri / "one.tsv"
    tsv.write_text("path\tspeaker\n19/198/19-198-0000.flac\tx\n")
    both = extra_audio_manifest([str(libri), str(tsv)])
    assert len(both) == len(LIBRI) + 1
    assert both["path"].is_unique


def _rel(libri: Path, lists: Path) -> str:
    """utt_id tail of 19/227/19-227-0000.flac listed by an absolute path outside the list's directory."""
    return str(libri / "19/227/19-227-0000").lstrip("/")


def test_ids_stable_when_sources_are_edited(libri, tmp_path):
    other = tmp_path / "other.v2"
    write_tone(other / "spk" / "u1.wav", 16000)
    write_tone(other / "top.wav", 16000)  # directly in the source: the source's name is the speaker
    one = extra_audio_manifest([str(libri)])
    two = extra_audio_manifest([str(other), str(libri)])
    assert set(one["utt_id"]) < set(two["utt_id"])
    assert len(two) == len(one) + 2
    rows = two.set_index("path")
    assert rows.loc[str(other / "top.wav"), "speaker"] == "extra:other.v2"
    assert rows.loc[str(other / "spk" / "u1.wav"), "speaker"] == "extra:spk"
    assert rows.loc[str(other / "top.wav"), "utt_id"] == f"extra/{source_key(other)}/top"


def test_unreadable_header_kept_with_nan_duration(tmp_path):
    write_tone(tmp_path / "a" / "ok.wav", 16000)
    (tmp_path / "a" / "bad.flac").write_bytes(b"not audio at all" * 10)
    df = extra_audio_manifest([str(tmp_path / "a")])
    d = dict(zip(df["path"].map(lambda p: Path(p).name), df["duration"]))
    assert d["ok.wav"] == pytest.approx(1.0) and math.isnan(d["bad.flac"])


# ---------------------------------------------------------------- bad input -> ConfigError


def test_missing_directory(tmp_path):
    with pytest.raises(ConfigError, match=r"pretrain.extra_audio: .*nope does not exist"):
        extra_audio_manifest([str(tmp_path / "nope")])


def test_directory_without_audio(tmp_path):
    d = tmp_path / "empty"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "notes.txt").write_text("x")
    (d / "sub" / "._a.wav").write_bytes(b"junk")  # AppleDouble junk is not audio
    with pytest.raises(ConfigError) as e:
        extra_audio_manifest([str(d)])
    assert str(d) in str(e.value) and "holds no audio files" in str(e.value)


def test_manifest_listing_missing_files(libri):
    lst = libri / "broken.lst"
    lst.write_text("19/198/19-198-0000.flac\ngone/1.flac\ngone/2.flac\ngone/3.flac\ngone/4.flac\n")
    with pytest.raises(ConfigError) as e:
        extra_audio_manifest([str(lst)])
    msg = str(e.value)
    assert str(lst) in msg and "lists 4 of 5 files that do not exist" in msg
    assert "gone/1.flac, gone/2.flac, gone/3.flac ..." in msg and "gone/4.flac" not in msg
    assert f"relative to {libri}" in msg


def test_bad_manifest_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ConfigError, match="lists no audio files"):
        extra_audio_manifest([str(empty)])
    nocol = tmp_path / "x.csv"
    nocol.write_text("file,speaker\na.wav,1\n")
    with pytest.raises(ConfigError, match=r"no 'path' column \(columns: file, speaker\)"):
        extra_audio_manifest([str(nocol)])
    audio = write_tone(tmp_path / "one.wav", 1600)
    with pytest.raises(ConfigError, match="is a file but not a manifest"):
        extra_audio_manifest([str(audio)])


def test_config_keys(libri, tmp_path, monkeypatch):
    cfg = load_config(None, [f"output_dir={tmp_path}"])
    assert cfg.pretrain.use_unlabelled is True and list(cfg.pretrain.extra_audio) == []
    monkeypatch.chdir(libri.parent)
    cfg = load_config(None, [f"output_dir={tmp_path}", "pretrain.extra_audio=[train-clean-5]",
                             "pretrain.use_unlabelled=false"])
    assert list(cfg.pretrain.extra_audio) == [str(libri)]  # made absolute
    assert cfg.pretrain.use_unlabelled is False
    with pytest.raises(ConfigError, match=r"pretrain.extra_audio: .*missing does not exist"):
        load_config(None, [f"output_dir={tmp_path}", f"pretrain.extra_audio=[{libri},{tmp_path}/missing]"])
    with pytest.raises(ConfigError, match="must be a local path"):
        load_config(None, [f"output_dir={tmp_path}", "pretrain.extra_audio=[s3://bucket/audio]"])
