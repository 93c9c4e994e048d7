"""Tests for the IEMOCAP manifest parser (serray.data.corpora.iemocap) on the synthetic corpus."""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from serray.cli import main
from serray.data.corpora.base import LABELS, MANIFEST_COLUMNS, read_manifest, write_manifest
from serray.data.corpora.iemocap import build_manifest, label_map
from serray.errors import DataError

# An utterance line of EmoEvaluation/<dialog>.txt, parsed independently of serray's regex.
RAW_LINE = re.compile(r"^\[[\d.]+ - [\d.]+\]\t(\S+)\t(\S+)\t\[")
KEEP = {"neu", "hap", "exc", "sad", "ang"}


def raw_annotations(root: Path) -> pd.DataFrame:
    """Every utterance line of every top-level <dialog>.txt: session, dialog, utt_id, raw label."""
    rows = []
    for s in range(1, 6):
        emo = root / f"Session{s}" / "dialog" / "EmoEvaluation"
        for txt in sorted(emo.glob("Ses*.txt")):
            for line in txt.read_text(encoding="utf-8").splitlines():
                m = RAW_LINE.match(line)
                if m:
                    rows.append({"session": s, "dialog": txt.stem, "utt_id": m[1], "raw": m[2]})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def raw(synthetic_root) -> pd.DataFrame:
    df = raw_annotations(synthetic_root)
    assert len(df) == 5 * 4 * 6
    return df


@pytest.fixture(scope="module")
def report(synthetic_root):
    return build_manifest(synthetic_root)


# ---------------------------------------------------------------- structure


def test_columns_and_dtypes(report):
    df = report.kept
    assert list(df.columns) == MANIFEST_COLUMNS
    for c in ("utt_id", "dialog", "method", "speaker", "gender", "raw_label", "label", "path"):
        assert pd.api.types.is_string_dtype(df[c]) or df[c].dtype == object, c
        assert all(isinstance(v, str) for v in df[c]), c
    assert df["session"].dtype == "int64"
    for c in ("valence", "activation", "dominance", "start", "end", "duration"):
        assert df[c].dtype == "float64", c
    assert df["utt_id"].is_unique
    assert df["utt_id"].is_monotonic_increasing
    assert set(df["label"]) <= set(LABELS)
    assert set(df["method"]) <= {"impro", "script"}
    assert (df["duration"] > 0).all()
    assert ((df["end"] - df["start"] - df["duration"]).abs() < 1e-3).all()
    assert df[["valence", "activation", "dominance"]].apply(lambda c: c.between(1, 5)).all().all()


def test_manifest_parquet_round_trip(report, tmp_path):
    path = write_manifest(report.kept, tmp_path / "sub" / "m.parquet")
    back = read_manifest(path)
    assert list(back.columns) == MANIFEST_COLUMNS
    assert dict(back.dtypes.astype(str)) == dict(report.kept.dtypes.astype(str))
    pd.testing.assert_frame_equal(back, report.kept)


def test_read_manifest_errors(tmp_path):
    with pytest.raises(DataError, match="manifest not found"):
        read_manifest(tmp_path / "nope.parquet")
    pd.DataFrame({"utt_id": ["a"]}).to_parquet(tmp_path / "x.parquet")
    with pytest.raises(DataError, match="missing columns"):
        read_manifest(tmp_path / "x.parquet")


# ---------------------------------------------------------------- counts vs the annotation files


def test_counts_match_annotations(report, raw):
    kept = raw[raw["raw"].isin(KEEP)]
    assert len(report.kept) == len(kept)
    assert set(report.kept["utt_id"]) == set(kept["utt_id"])
    got = report.kept.set_index("utt_id")
    exp = kept.set_index("utt_id")
    assert (got.loc[exp.index, "raw_label"] == exp["raw"]).all()
    assert (got.loc[exp.index, "session"] == exp["session"]).all()
    assert (got.loc[exp.index, "dialog"] == exp["dialog"]).all()
    # 4-class mapping with exc merged into hap
    assert (got["label"] == got["raw_label"].map(label_map(True))).all()
    assert ((got["raw_label"] == "exc") <= (got["label"] == "hap")).all()
    per_session = report.kept.groupby("session").size().to_dict()
    assert per_session == kept.groupby("session").size().to_dict()
    assert report.missing_wav == [] and report.malformed == []


def test_dropped_counts_match_annotations(report, raw):
    dropped = raw[~raw["raw"].isin(KEEP)]
    assert len(dropped) > 0
    expected = Counter(zip(dropped["session"], dropped["raw"]))
    assert report.dropped == dict(expected)
    s = report.summary()
    assert f"dropped (label outside the 4-class setup): {len(dropped)}" in s


def test_keep_unlabelled_keeps_every_labelled_utterance(synthetic_root, report, raw):
    r = build_manifest(synthetic_root, keep_unlabelled=True)
    outside = raw[~raw["raw"].isin(KEEP)]
    assert len(outside) > 0 and len(r.kept) == len(raw) == len(report.kept) + len(outside)
    assert set(r.kept["utt_id"]) == set(raw["utt_id"])
    assert list(r.kept.columns) == MANIFEST_COLUMNS and r.kept["utt_id"].is_monotonic_increasing
    got = r.kept.set_index("utt_id")
    # outside the 4-class map: kept with no 4-class label, the raw one kept
    out = got.loc[outside["utt_id"]]
    assert (out["label"] == "").all()
    assert list(out["raw_label"]) == list(outside["raw"])
    assert set(out["raw_label"]) & {"fru", "sur", "xxx", "oth", "fea", "dis"}
    assert (out["speaker"].str.match(r"^Ses0\d_[FM]$")).all() and out["path"].map(lambda p: Path(p).is_file()).all()
    # the 4-class rows are exactly the default manifest
    labelled = r.kept[r.kept["label"] != ""].reset_index(drop=True)
    pd.testing.assert_frame_equal(labelled, report.kept)
    # still reported as outside the 4-class setup, per session and label
    assert r.dropped == report.dropped == dict(Counter(zip(outside["session"], outside["raw"])))
    s = r.summary()
    assert f"label outside the 4-class setup: {len(outside)}, kept with no 4-class label (pre-training only)" in s
    assert "dropped (" not in s
    # the per-class table counts the 4 classes only: same table as the default
    assert s.split("label outside")[0] == report.summary().split("dropped (")[0]
    # the default is unchanged
    assert "" not in set(report.kept["label"]) and not report.unlabelled_kept


def test_keep_unlabelled_without_merge_excited(synthetic_root, raw):
    r = build_manifest(synthetic_root, merge_excited=False, keep_unlabelled=True)
    assert len(r.kept) == len(raw)
    exc = r.kept[r.kept["raw_label"] == "exc"]
    assert len(exc) > 0 and (exc["label"] == "").all()
    assert (r.kept.loc[r.kept["raw_label"] == "hap", "label"] == "hap").all()


def test_speaker_from_last_field(report):
    df = report.kept
    # a male utterance in a female-led dialog: the speaker is the male actor
    cross = df[df["utt_id"].str.match(r"^Ses0\dF_.*_M\d+$")]
    assert len(cross) > 0
    for row in cross.itertuples():
        assert row.speaker == f"Ses{row.session:02d}_M", row.utt_id
        assert row.gender == "M"
    cross_f = df[df["utt_id"].str.match(r"^Ses0\dM_.*_F\d+$")]
    assert len(cross_f) > 0
    assert (cross_f["gender"] == "F").all()
    assert (cross_f["speaker"] == cross_f["session"].map(lambda s: f"Ses{s:02d}_F")).all()
    # 10 speakers in all, 2 per session
    assert df.groupby("session")["speaker"].nunique().tolist() == [2] * 5
    assert (df["speaker"].str.slice(-1) == df["gender"]).all()


def test_merge_excited_false_drops_exc(synthetic_root, report, raw):
    r = build_manifest(synthetic_root, merge_excited=False)
    n_exc = int((raw["raw"] == "exc").sum())
    assert n_exc > 0
    assert "exc" not in set(r.kept["raw_label"])
    assert len(r.kept) == len(report.kept) - n_exc
    assert sum(v for (s, lab), v in r.dropped.items() if lab == "exc") == n_exc
    assert set(r.kept["label"]) <= set(LABELS)


def test_sessions_subset(synthetic_root, report):
    r = build_manifest(synthetic_root, sessions=[2, 4])
    assert set(r.kept["session"]) == {2, 4}
    assert len(r.kept) == int(report.kept["session"].isin([2, 4]).sum())


def test_no_junk_paths(report, synthetic_root):
    for p in report.kept["path"]:
        path = Path(p)
        assert path.is_file()
        assert not path.name.startswith("._")
        assert "/dialog/wav/" not in p
        assert path.parent.parent.parent.name == "sentences" or path.parts[-4] == "sentences"
        assert path.parts[-3:-1] == ("wav", path.stem.rsplit("_", 1)[0])
        assert path.is_absolute()
    # the junk really is there, so the test means something
    assert list(synthetic_root.glob("Session1/sentences/wav/*/._*.wav"))
    assert list(synthetic_root.glob("Session1/dialog/wav/*.wav"))
    assert list(synthetic_root.glob("Session1/dialog/EmoEvaluation/._*.txt"))


# ---------------------------------------------------------------- agreement with torchaudio


def _torchaudio_view(root: Path, dest: Path) -> Path:
    """``dest/IEMOCAP`` laid out as torchaudio expects (``<dest>/IEMOCAP/Session*``).

    The plain way is a symlink ``dest/IEMOCAP -> root``. torchaudio 2.11's IEMOCAP, however, opens
    every ``EmoEvaluation/*.txt`` as text, including the macOS ``._<dialog>.txt`` AppleDouble files
    the release ships, and dies with ``UnicodeDecodeError`` on them. So when that happens we build a
    symlink view without the AppleDouble annotation files (wav folders are linked unchanged).
    """
    from torchaudio.datasets import IEMOCAP

    link = dest / "IEMOCAP"
    link.symlink_to(root, target_is_directory=True)
    try:
        IEMOCAP(str(dest))
        return dest
    except UnicodeDecodeError:
        link.unlink()
    for s in range(1, 6):
        sess = link / f"Session{s}"
        (sess / "dialog" / "EmoEvaluation").mkdir(parents=True)
        (sess / "sentences").symlink_to(root / f"Session{s}" / "sentences", target_is_directory=True)
        for txt in (root / f"Session{s}" / "dialog" / "EmoEvaluation").glob("*.txt"):
            if not txt.name.startswith("._"):
                (sess / "dialog" / "EmoEvaluation" / txt.name).symlink_to(txt)
    return dest


def test_agrees_with_torchaudio(synthetic_root, report, tmp_path):
    from torchaudio.datasets import IEMOCAP

    ds = IEMOCAP(str(_torchaudio_view(synthetic_root, tmp_path)))
    meta = [ds.get_metadata(i) for i in range(len(ds))]
    ta = pd.DataFrame(meta, columns=["path", "sr", "utt_id", "label", "speaker"])
    ta = ta[ta["label"].isin(KEEP)].set_index("utt_id").sort_index()
    ours = report.kept.set_index("utt_id").sort_index()
    assert set(ta.index) == set(ours.index)
    assert (ta["label"] == ours.loc[ta.index, "raw_label"]).all()
    assert (ta["sr"] == 16000).all()
    ours_rel = ours["path"].map(lambda p: str(Path(p).relative_to(synthetic_root)))
    assert ta["path"].iloc[0].startswith("Session")
    assert (ta["path"] == ours_rel.loc[ta.index]).all()
    # torchaudio's "speaker" is the dialog prefix (Ses01F), ours is session + the last field's
    # gender (Ses01_M); they differ by design, but the session must agree.
    assert (ta["speaker"].str.slice(0, 5) == ours.loc[ta.index, "speaker"].str.slice(0, 5)).all()
    assert (ta["speaker"] != ours.loc[ta.index, "speaker"]).all()


# ---------------------------------------------------------------- bad input


def test_missing_root(tmp_path):
    missing = tmp_path / "no" / "IEMOCAP_full_release"
    with pytest.raises(DataError) as e:
        build_manifest(missing)
    assert str(missing) in str(e.value)


def test_root_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        build_manifest(f)


def test_not_an_iemocap_tree(tmp_path):
    (tmp_path / "Session1").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError) as e:
        build_manifest(tmp_path)
    msg = str(e.value)
    assert "not an IEMOCAP_full_release tree" in msg
    assert "Session1/dialog/EmoEvaluation" in msg and "Session1/sentences/wav" in msg
    assert "Session2" in msg
    assert "notes.txt" in msg  # what was found instead


def test_parent_of_the_release_gets_a_hint(synthetic_root):
    with pytest.raises(DataError) as e:
        build_manifest(synthetic_root.parent)
    assert "did you mean" in str(e.value) and str(synthetic_root) in str(e.value)


def test_no_annotation_files(tmp_path):
    for sub in ("dialog/EmoEvaluation", "sentences/wav"):
        (tmp_path / "Session1" / sub).mkdir(parents=True)
    with pytest.raises(DataError, match="no <dialog>.txt"):
        build_manifest(tmp_path, sessions=[1])


def _copy_session1(synthetic_root: Path, dest: Path) -> Path:
    shutil.copytree(synthetic_root / "Session1", dest / "Session1")
    return dest


def test_missing_wav_is_counted_not_fatal(synthetic_root, tmp_path):
    root = _copy_session1(synthetic_root, tmp_path)
    full = build_manifest(root, sessions=[1])
    victim = full.kept.iloc[3]
    Path(victim["path"]).unlink()
    r = build_manifest(root, sessions=[1])
    assert r.missing_wav == [victim["utt_id"]]
    assert len(r.kept) == len(full.kept) - 1
    assert victim["utt_id"] not in set(r.kept["utt_id"])
    assert "wav is missing" in r.summary() and victim["utt_id"] in r.summary()


def test_malformed_line_is_reported(synthetic_root, tmp_path):
    root = _copy_session1(synthetic_root, tmp_path)
    txt = sorted((root / "Session1" / "dialog" / "EmoEvaluation").glob("Ses*.txt"))[0]
    txt.write_text(txt.read_text() + "\n[1.0 - oops]\tSes01F_impro01_F999\tneu\n")
    r = build_manifest(root, sessions=[1])
    assert len(r.malformed) == 1 and txt.name in r.malformed[0]
    assert "malformed" in r.summary()


@pytest.mark.parametrize("numbers, words", [
    ("[1.0 - 2.0]\t{utt}\tneu\t[1.5.5, 2.0, 3.0]", "malformed number '1.5.5'"),  # float() would raise
    ("[1.0 - 2.0]\t{utt}\tneu\t[2.5, -, 3.0]", "malformed number '-'"),
    ("[3.0 - 2.0]\t{utt}\tneu\t[2.5, 2.0, 3.0]", "end 2.0 is not after start 3.0"),  # negative duration
    ("[2.0 - 2.0]\t{utt}\tneu\t[2.5, 2.0, 3.0]", "end 2.0 is not after start 2.0"),
])
def test_malformed_numbers_are_reported_and_counted_like_a_missing_wav(synthetic_root, tmp_path, numbers, words):
    """A label line that matches the layout but holds bad numbers: skipped and reported, never a crash
    (valence 1.5.5 used to raise ValueError out of build_manifest; end < start gave a negative duration)."""
    root = _copy_session1(synthetic_root, tmp_path)
    full = build_manifest(root, sessions=[1])
    victim = full.kept.iloc[0]
    ann = root / "Session1" / "dialog" / "EmoEvaluation" / f"{victim['dialog']}.txt"
    lines = ann.read_text().splitlines()
    i = next(k for k, l in enumerate(lines) if l.startswith("[") and f"\t{victim['utt_id']}\t" in l)
    lines[i] = numbers.format(utt=victim["utt_id"])
    ann.write_text("\n".join(lines) + "\n")
    r = build_manifest(root, sessions=[1])
    assert len(r.malformed) == 1 and words in r.malformed[0] and f"{ann}:{i + 1}" in r.malformed[0]
    assert victim["utt_id"] not in set(r.kept["utt_id"]) and len(r.kept) == len(full.kept) - 1
    assert (r.kept["duration"] > 0).all()
    assert "malformed utterance lines (skipped): 1" in r.summary()


# ---------------------------------------------------------------- CLI


def test_cli_manifest(synthetic_root, report, raw, tmp_path, capsys):
    """pretrain.use_unlabelled (default true): every labelled utterance; the table counts the 4 classes."""
    out = tmp_path / "m" / "manifest.parquet"
    rc = main(["manifest", "--root", str(synthetic_root), "--out", str(out), f"output_dir={tmp_path}"])
    assert rc == 0
    assert out.is_file()
    df = read_manifest(out)
    assert len(df) == len(raw) > len(report.kept)
    assert int((df["label"] != "").sum()) == len(report.kept)
    stdout = capsys.readouterr().out
    assert "kept utterances per session x class" in stdout
    assert f"manifest: {len(raw)} utterances -> {out}" in stdout
    assert f"label outside the 4-class setup: {len(raw) - len(report.kept)}, kept" in stdout
    # the table: header with the 4 classes and a total row
    header = next(line for line in stdout.splitlines() if "neu" in line and "ang" in line)
    assert header.split()[-5:] == ["neu", "hap", "sad", "ang", "total"]
    total_line = next(line for line in stdout.splitlines() if line.startswith("total"))
    assert int(total_line.split()[-1]) == len(report.kept)


def test_cli_manifest_without_unlabelled(synthetic_root, report, tmp_path, capsys):
    out = tmp_path / "manifest.parquet"
    assert main(["manifest", "--root", str(synthetic_root), "--out", str(out), f"output_dir={tmp_path}",
                 "pretrain.use_unlabelled=false"]) == 0
    pd.testing.assert_frame_equal(read_manifest(out), report.kept)
    assert f"manifest: {len(report.kept)} utterances -> {out}" in capsys.readouterr().out


def test_cli_manifest_missing_root(tmp_path, capsys):
    rc = main(["manifest", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "m.parquet")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "error:" in err and str(tmp_path / "nope") in err and "Traceback" not in err
