"""Corpus plug-ins: each parser against the synthetic corpus written in its release layout, folds
speaker-disjoint for every protocol, explicit label maps, and clear errors for bad roots and CSVs."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from serray.data import corpora
from serray.data.corpora.base import LABELS
from serray.errors import ConfigError, DataError

SMALL = {"seed": 0, "dialogs_per_session": 2, "utterances_per_dialog": 6}
LAYOUTS = ("crema-d", "ravdess", "emodb", "msp-podcast", "csv")


def data_cfg(**kw):
    return SimpleNamespace(**{"num_folds": 5, "label_map": {}, "sessions": None, **kw})


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The synthetic corpus's utterances as the IEMOCAP parser reads them (every raw label)."""
    from serray.data.corpora.iemocap import build_manifest
    from serray.data.synthetic import make_corpus

    root = make_corpus(tmp_path_factory.mktemp("source") / "IEMOCAP_full_release", **SMALL)
    return build_manifest(root, keep_unlabelled=True).kept


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    from serray.data.synthetic.layouts import make_layout

    base = tmp_path_factory.mktemp("layouts")
    return {name: make_layout(base / name, name, **SMALL) for name in LAYOUTS}


def parse(name, root, keep_unlabelled=False, **kw):
    return corpora.get(name).build(root, data_cfg(**kw), keep_unlabelled=keep_unlabelled)


def _expected_counts(source: pd.DataFrame, layout: str) -> pd.Series:
    """4-class counts per class the layout's parser must find: the source's labels through the
    layout's file-name map and back through the corpus's default label map."""
    from serray.data.synthetic.layouts import LAYOUT_LABELS

    corpus = corpora.get(layout)
    if layout == "ravdess":
        from serray.data.corpora.ravdess import EMOTION_CODES as codes
    elif layout == "emodb":
        from serray.data.corpora.emodb import LETTERS as codes
    else:
        codes = {}
    raw = source["raw_label"].map(LAYOUT_LABELS[layout]).dropna().map(lambda r: codes.get(r, r))
    return raw.map(corpus.raw_labels).loc[lambda s: s != ""].value_counts().reindex(list(LABELS), fill_value=0)


@pytest.mark.parametrize("name", ["crema-d", "emodb", "msp-podcast", "csv"])
def test_parser_counts_every_class_of_its_layout(name, layouts, source):
    report = parse(name, layouts[name])
    got = report.kept["label"].value_counts().reindex(list(LABELS), fill_value=0)
    assert got.to_dict() == _expected_counts(source, name).to_dict()
    assert set(report.kept["label"]) <= set(LABELS)
    assert report.kept["utt_id"].is_unique and report.kept["duration"].gt(0.5).all()


def test_ravdess_reads_actor_folders_at_any_depth_ignores_song_and_macos_files(layouts):
    report = parse("ravdess", layouts["ravdess"], keep_unlabelled=True)
    df = report.kept
    assert (layouts["ravdess"] / "Audio_Speech_Actors_01-24").is_dir()  # the zip's own top level
    assert report.ignored == {"__MACOSX entries": 1, "song / video files": 1}
    assert df["utt_id"].str.startswith("03-01-").all()
    # actors by number, gender by parity: odd male, even female
    actor = df["speaker"].str.slice(6).astype(int)
    assert (df["gender"] == actor.map(lambda a: "M" if a % 2 else "F")).all()
    assert df["speaker"].nunique() == 10
    # neutral has no strong take
    assert not df[(df["raw_label"] == "neutral") & (df["method"] == "strong")].shape[0]


def test_ravdess_calm_is_dropped_by_default_and_merged_on_request(layouts):
    default = parse("ravdess", layouts["ravdess"])
    calm = sum(n for (g, raw), n in default.dropped.items() if raw == "calm")
    assert calm > 0 and "calm" not in set(default.kept["raw_label"])
    merged = parse("ravdess", layouts["ravdess"], label_map={"calm": "neu"})
    assert (merged.kept["label"] == "neu").sum() == (default.kept["label"] == "neu").sum() + calm
    assert not any(raw == "calm" for (_, raw) in merged.dropped)


def test_crema_d_speakers_genders_and_decoys(layouts):
    report = parse("crema-d", layouts["crema-d"])
    df = report.kept
    demo = pd.read_csv(layouts["crema-d"] / "VideoDemographics.csv", dtype=str)
    sex = dict(zip(demo["ActorID"], demo["Sex"].map({"Male": "M", "Female": "F"})))
    assert (df["gender"] == df["speaker"].map(sex)).all()  # from VideoDemographics.csv, not guessed
    assert df["speaker"].str.fullmatch(r"10\d\d").all()
    assert report.ignored == {"hidden / AppleDouble files": 1}
    assert len(report.malformed) == 1 and "1040_ITH_SAD_X.wav" in report.malformed[0]
    assert {"DIS", "FEA"} >= {raw for (_, raw) in report.dropped}


def test_emodb_letters_speakers_and_folder_alias(layouts, tmp_path):
    report = parse("emodb", layouts["emodb"], keep_unlabelled=True)
    df = report.kept
    from serray.data.corpora.emodb import LETTERS

    assert LETTERS["W"] == "anger" and LETTERS["A"] == "fear"  # A is Angst (fear), W is Wut (anger)
    assert (df["raw_label"] == df["utt_id"].str[5].map(LETTERS)).all()
    assert (df.loc[df["utt_id"].str[5] == "W", "label"] == "ang").all() and (df["utt_id"].str[5] == "W").any()
    assert corpora.get("emodb").raw_labels["fear"] == ""
    male = df["speaker"].isin(["03", "10", "11", "12", "15"])
    assert (df.loc[male, "gender"] == "M").all() and (df.loc[~male, "gender"] == "F").all()
    assert sorted(df["session"].unique()) == list(range(1, 11))  # leave-one-speaker-out: one group per speaker
    assert df.groupby("session")["speaker"].nunique().eq(1).all()
    # the wav_corpus/ redistribution reads the same
    alias = tmp_path / "emodb"
    shutil.copytree(layouts["emodb"], alias)
    (alias / "wav").rename(alias / "wav_corpus")
    assert parse("emodb", alias).kept["utt_id"].tolist() == parse("emodb", layouts["emodb"]).kept["utt_id"].tolist()


def test_msp_podcast_splits_unknown_speakers_withheld_and_missing(layouts, tmp_path):
    report = parse("msp-podcast", layouts["msp-podcast"], keep_unlabelled=True)
    df = report.kept
    labels = pd.read_csv(layouts["msp-podcast"] / "Labels" / "labels_consensus.csv")
    assert report.ignored == {"Test3 turns (labels withheld)": 1}
    assert report.missing_wav == ["MSP-PODCAST_9999_0002"]
    split = dict(zip(labels["FileName"].str[:-4], labels["Split_Set"]))
    assert (df["session"] == df["utt_id"].map(split).map({"Test1": 1, "Development": 2, "Train": 3, "Test2": 4})).all()
    assert set(df["session"]) == {1, 2, 3, 4}
    assert (df["speaker"] == "unknown-Train").sum() == 2 and set(df.loc[df["speaker"] == "unknown-Train", "gender"]) == {""}
    # X (no agreement) and O (other) are never a class
    assert df.loc[df["raw_label"].isin(["X", "O"]), "label"].eq("").all()
    assert df["activation"].between(1, 7).all()  # stored on the release's own 1-7 scale
    # an older release: labels_concensus.json and Validation instead of Development
    old = tmp_path / "msp-old"
    shutil.copytree(layouts["msp-podcast"], old)
    csv = old / "Labels" / "labels_consensus.csv"
    t = pd.read_csv(csv)
    t["Split_Set"] = t["Split_Set"].replace({"Development": "Validation"})
    t.set_index("FileName").to_json(old / "Labels" / "labels_concensus.json", orient="index")
    csv.unlink()
    again = parse("msp-podcast", old, keep_unlabelled=True).kept
    pd.testing.assert_frame_equal(again.drop(columns="path"), df.drop(columns="path"), check_dtype=False)


@pytest.mark.parametrize("name", LAYOUTS)
def test_folds_are_speaker_disjoint(name, layouts):
    df = parse(name, layouts[name], keep_unlabelled=True).kept
    per_speaker = df.groupby("speaker")["session"].nunique()
    assert per_speaker.max() == 1, per_speaker[per_speaker > 1]
    groups = corpora.get(name).groups(data_cfg())
    assert set(df["session"]) <= set(groups) | set(corpora.get(name).extra_groups)


def test_speaker_folds_balance_gender_and_refuse_too_many_folds():
    from serray.data.corpora.base import speaker_folds

    spk = {f"s{i}": ("F" if i % 2 else "M") for i in range(10)}
    folds = speaker_folds(spk, 5, "x")
    assert sorted(folds.values()) == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    for g in range(1, 6):
        assert sorted(spk[s] for s, f in folds.items() if f == g) == ["F", "M"]
    with pytest.raises(DataError, match="3 speakers cannot make 5 speaker-disjoint folds"):
        speaker_folds({"a": "", "b": "", "c": ""}, 5, "x")


def test_unknown_label_is_an_error_naming_rows_and_fix(tmp_path, layouts):
    root = layouts["csv"].parent
    df = pd.read_csv(root / "labels.csv")
    df.loc[3, "label"] = "frustrated"
    bad = tmp_path / "bad.csv"
    df.assign(path=[str(root / p) for p in df["path"]]).to_csv(bad, index=False)
    with pytest.raises(DataError, match=r"'frustrated' \(1x, e.g. bad.csv:5\).*data.label_map"):
        parse("csv", bad)
    ok = parse("csv", bad, label_map={"frustrated": ""})
    assert ok.dropped and len(ok.kept) == len(df) - 1


def test_csv_missing_columns_bad_groups_and_no_speaker(tmp_path, layouts):
    root = layouts["csv"].parent
    df = pd.read_csv(root / "labels.csv").assign(path=lambda d: [str(root / p) for p in d["path"]])
    df.drop(columns="label").to_csv(tmp_path / "a.csv", index=False)
    with pytest.raises(DataError, match=r"missing columns \['label'\]"):
        parse("csv", tmp_path / "a.csv")
    df.assign(group=[7] + [1] * (len(df) - 1)).to_csv(tmp_path / "b.csv", index=False)
    with pytest.raises(DataError, match=r"rows 2 have a group that is not an integer in 1..5"):
        parse("csv", tmp_path / "b.csv")
    df.drop(columns="speaker").to_csv(tmp_path / "c.csv", index=False)
    report = parse("csv", tmp_path / "c.csv")
    assert any("NOT speaker-independent" in n for n in report.notes)
    assert "NOT speaker-independent" in report.summary()


def test_root_that_matches_no_layout_says_what_was_expected(tmp_path, layouts):
    (tmp_path / "somefolder").mkdir()
    for name, expected in [("crema-d", "AudioWAV"), ("emodb", "wav/"), ("msp-podcast", "Audios"),
                           ("ravdess", "Actor_NN")]:
        with pytest.raises(DataError, match=expected) as e:
            parse(name, tmp_path)
        assert "somefolder/" in str(e.value)
    with pytest.raises(DataError, match="root not found"):
        parse("crema-d", tmp_path / "nope")
    with pytest.raises(DataError, match="IEMOCAP_full_release tree"):
        corpora.get("iemocap").build(layouts["emodb"], data_cfg())


def test_git_lfs_pointer_files_are_refused_with_the_fix(tmp_path, layouts):
    root = tmp_path / "crema"
    shutil.copytree(layouts["crema-d"], root)
    first = sorted((root / "AudioWAV").glob("1*.wav"))[0]
    first.unlink()
    first.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(DataError, match="Git LFS pointers.*git lfs pull"):
        parse("crema-d", root)


def test_unknown_corpus_lists_the_known_ones():
    from serray.config import load_config

    with pytest.raises(ConfigError, match="unknown corpus 'iemocapp'; known: iemocap, crema-d, ravdess, emodb, "
                                          "msp-podcast, csv"):
        load_config(None, ["data.corpus=iemocapp"])


def test_config_resolves_groups_and_folds_from_the_protocol():
    from serray.config import load_config

    assert list(load_config(None, []).data.sessions) == [1, 2, 3, 4, 5]
    emodb = load_config(None, ["data.corpus=emodb"])
    assert list(emodb.data.sessions) == list(range(1, 11)) and list(emodb.finetune.folds) == list(range(1, 11))
    msp = load_config(None, ["data.corpus=msp-podcast", "finetune.val_split=group", "finetune.val_groups=[2]"])
    assert list(msp.data.sessions) == [1, 2, 3] and list(msp.finetune.folds) == [1]
    assert list(load_config(None, ["data.corpus=crema-d", "data.num_folds=4"]).finetune.folds) == [1, 2, 3, 4]
    with pytest.raises(ConfigError, match="data.sessions: 6 is not a fold of CREMA-D"):
        load_config(None, ["data.corpus=crema-d", "data.sessions=[1,6]", "finetune.folds=[1]"])
    with pytest.raises(ConfigError, match="must not test a validation group"):
        load_config(None, ["data.corpus=msp-podcast", "finetune.val_split=group", "finetune.val_groups=[1]"])


def test_group_validation_split_uses_the_development_set():
    from serray.train.finetune import split_fold

    rows = pd.DataFrame({"utt_id": [f"u{i}" for i in range(12)], "label": list(LABELS) * 3,
                         "speaker": [f"s{i % 6}" for i in range(12)], "session": [1, 1, 2, 2, 3, 3] * 2})
    sp = split_fold(rows, 1, 0.15, seed=0, val_split="group", val_groups=[2])
    assert set(sp["val"]["session"]) == {2} and set(sp["train"]["session"]) == {3} and set(sp["test"]["session"]) == {1}
    with pytest.raises(ValueError, match="val_groups"):
        split_fold(rows, 2, 0.15, seed=0, val_split="group", val_groups=[2])


def test_label_map_is_set_from_the_command_line_and_from_yaml_and_checked_at_load(tmp_path, layouts, capsys):
    """``data.label_map`` as a user sets it: the RAVDESS calm merge through ``serray manifest`` on the command
    line and from a YAML file (it was an "unknown config key 'data.label_map.calm'"), and a class outside the
    four refused when the config loads, naming the key."""
    import yaml

    from serray.cli import main

    root = layouts["ravdess"]
    default = parse("ravdess", root)
    calm = sum(n for (g, raw), n in default.dropped.items() if raw == "calm")
    neu = int((default.kept["label"] == "neu").sum())
    out = tmp_path / "m.parquet"
    assert main(["manifest", "--root", str(root), "--out", str(out), "data.corpus=ravdess",
                 "data.label_map={calm: neu}"]) == 0
    assert int((pd.read_parquet(out)["label"] == "neu").sum()) == neu + calm > neu
    cfg_file = tmp_path / "ravdess.yaml"
    cfg_file.write_text(yaml.safe_dump({"data": {"corpus": "ravdess", "label_map": {"calm": "neu"}}}))
    out2 = tmp_path / "m2.parquet"
    assert main(["manifest", "--config", str(cfg_file), "--root", str(root), "--out", str(out2)]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(out), pd.read_parquet(out2))
    capsys.readouterr()
    assert main(["manifest", "--root", str(root), "--out", str(out), "data.corpus=ravdess",
                 "data.label_map={calm: relaxed}"]) != 0
    assert "data.label_map: 'calm' -> 'relaxed'" in capsys.readouterr().err


def test_official_test_sets_are_never_validation_or_shared_pretraining_data():
    """MSP-Podcast's Test1 / Test2 are test-only groups: a config that would validate or pre-train the
    shared adapter on one is refused when it loads, naming the key."""
    from serray.config import load_config

    msp = ["data.corpus=msp-podcast", "data.sessions=[1,2,3,4]", "finetune.folds=[4]",
           "finetune.val_split=group"]
    with pytest.raises(ConfigError, match=r"finetune.val_groups \[1\] holds MSP-Podcast's official test sets \[1, 4\]"):
        load_config(None, [*msp, "finetune.val_groups=[1]"])
    with pytest.raises(ConfigError, match=r"pretrain.sessions .* would be pre-trained on test audio"):
        load_config(None, [*msp, "finetune.val_groups=[2]", "pretrain.per_fold=false", "pretrain.sessions=[1,2,3,4]"])
    cfg = load_config(None, [*msp, "finetune.val_groups=[2]"])
    from serray.train.folds import training_groups

    assert training_groups(cfg, 4) == [2, 3] and training_groups(cfg, 1) == [2, 3]


def test_csv_blank_speakers_split_speakers_and_colliding_ids_are_errors_naming_rows(tmp_path, layouts):
    """No silent degradation in a labelled CSV: one blank speaker cell used to make every file its own speaker
    (a log warning; metrics.json still said speaker-grouped); a speaker in two groups failed mid-training
    with an AssertionError; paths whose ids collide (a/b.wav vs a__b.wav, x.wav vs x.flac) lost rows."""
    root = layouts["csv"].parent
    df = pd.read_csv(root / "labels.csv").assign(path=lambda d: [str(root / p) for p in d["path"]])
    df.assign(speaker=[""] + list(df["speaker"][1:])).to_csv(tmp_path / "blank.csv", index=False)
    with pytest.raises(DataError, match=r"rows 2 have no speaker"):
        parse("csv", tmp_path / "blank.csv")
    spk = df["speaker"].iloc[0]
    groups = [1 + (i % 5) for i in range(len(df))]
    df.assign(group=groups).to_csv(tmp_path / "split.csv", index=False)
    with pytest.raises(DataError, match=rf"speakers \[.*'{spk}'.*\] appear in more than one group \(rows 2, "):
        parse("csv", tmp_path / "split.csv")
    first = Path(df["path"].iloc[0])
    twin = first.with_suffix(".flac")
    import soundfile as sf

    x, sr = sf.read(first)
    sf.write(twin, x, sr)
    collide = pd.concat([df, df.iloc[:1].assign(path=str(twin))], ignore_index=True)
    collide.to_csv(tmp_path / "collide.csv", index=False)
    with pytest.raises(DataError, match=r"2 files get the same utterance id .*line 2\).*\.flac' \(line "):
        parse("csv", tmp_path / "collide.csv")
    nested = tmp_path / "a" / "b.wav"
    nested.parent.mkdir()
    flat = tmp_path / "a__b.wav"
    for p in (nested, flat):
        sf.write(p, x, sr)
    rel = pd.concat([df, df.iloc[:2].assign(path=["a/b.wav", "a__b.wav"], speaker="x")], ignore_index=True)
    rel.to_csv(tmp_path / "rel.csv", index=False)
    n = len(df)
    with pytest.raises(DataError, match=rf"'a/b.wav' \(line {n + 2}\), 'a__b.wav' \(line {n + 3}\)"):
        parse("csv", tmp_path / "rel.csv")


def test_dialog_validation_outside_iemocap_and_an_empty_validation_part_are_errors(layouts):
    """val_split=dialog on a corpus without dialogs gave an empty validation set (epochs chosen on nothing)."""
    from serray.config import load_config
    from serray.train.folds import split_fold

    with pytest.raises(ConfigError, match="val_split=dialog needs a corpus with dialogs"):
        load_config(None, ["data.corpus=crema-d", "finetune.val_split=dialog"])
    rows = parse("crema-d", layouts["crema-d"]).kept
    rows = rows[rows["label"] != ""].assign(dialog="")
    with pytest.raises(DataError, match="fold 1: the validation part .* is empty"):
        split_fold(rows, 1, 0.15, 0, "dialog")


def test_a_blank_msp_podcast_class_is_an_unlabelled_turn_not_an_error(tmp_path, layouts):
    """A blank EmoClass in any split used to refuse the whole corpus and suggest an invalid override."""
    root = tmp_path / "msp"
    shutil.copytree(layouts["msp-podcast"], root)
    csv = root / "Labels" / "labels_consensus.csv"
    t = pd.read_csv(csv, dtype=str, keep_default_na=False)
    t.loc[5, "EmoClass"] = ""
    t.to_csv(csv, index=False)
    report = parse("msp-podcast", root, keep_unlabelled=True)
    turn = t.loc[5, "FileName"][:-4]
    assert report.kept.set_index("utt_id").loc[turn, "label"] == ""
