"""Several labelled corpora in one run (``data.corpus: pooled``): ids that cannot collide, speakers kept
per corpus, the shared label space, the two protocols, and the errors a wrong pool gets."""

from __future__ import annotations

import pytest

from serray.config import load_config
from serray.data.corpora.base import LABELS
from serray.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """Two layouts of the built-in corpus with different voices (seeds), balanced over their own classes."""
    from serray.data.synthetic.layouts import make_layout, native_classes

    base = tmp_path_factory.mktemp("pool")
    kw = {"dialogs_per_session": 2, "utterances_per_dialog": 6}
    return {"crema-d": make_layout(base / "CREMA-D", "crema-d", seed=1, classes=native_classes("crema-d"), **kw),
            "ravdess": make_layout(base / "RAVDESS", "ravdess", seed=2, classes=native_classes("ravdess"), **kw)}


def _data(trees, **kw):
    return {"corpus": "pooled", "root": "/nowhere", "num_folds": 3, "merge_excited": True,
            "corpora": [{"corpus": "crema-d", "root": str(trees["crema-d"])},
                        {"corpus": "ravdess", "root": str(trees["ravdess"])}], **kw}


def test_leave_one_corpus_out_keeps_ids_speakers_and_groups_per_corpus(trees):
    from serray.data.corpora.pooled import build

    report = build(None, _data(trees, protocol="leave_one_corpus_out"))
    df = report.kept
    assert df["utt_id"].is_unique and report.group_name == "corpus"
    crema, rav = df[df["utt_id"].str.startswith("crema-d__")], df[df["utt_id"].str.startswith("ravdess__")]
    assert len(crema) + len(rav) == len(df) and len(crema) and len(rav)
    assert set(crema["session"]) == {1} and set(rav["session"]) == {2}  # fold group k is corpus k
    assert crema["speaker"].str.startswith("crema-d:").all() and rav["speaker"].str.startswith("ravdess:").all()
    assert report.classes == LABELS and set(df["label"]) <= set(LABELS)


def test_pooled_folds_deal_the_speakers_of_every_corpus(trees):
    from serray.data.corpora.pooled import build

    df = build(None, _data(trees)).kept
    assert sorted(set(df["session"])) == [1, 2, 3]
    assert (df.groupby("speaker")["session"].nunique() == 1).all()  # a speaker in one fold group only
    per_fold = df.assign(corpus=df["speaker"].str.split(":").str[0]).groupby("session")["corpus"].nunique()
    assert (per_fold == 2).all()  # each fold tests speakers of both corpora


def test_the_shared_label_space(trees):
    from serray.data.corpora.pooled import build

    native = build(None, _data(trees, classes="native"))
    # CREMA-D's six are all in RAVDESS's eight: the intersection; surprise and calm are left out, and said so
    assert native.classes == ("neu", "hap", "sad", "ang", "fea", "dis")
    assert any("['cal', 'sur']" in n for n in native.notes)
    listed = build(None, _data(trees, classes=["neu", "ang", "cal"]))
    assert listed.classes == ("neu", "ang", "cal") and any("crema-d has no ['cal']" in n for n in listed.notes)
    assert set(listed.kept.loc[listed.kept["utt_id"].str.startswith("crema-d__"), "label"]) <= {"neu", "ang"}
    with pytest.raises(DataError, match="none of the pooled corpora has"):
        build(None, _data(trees, classes=["neu", "bor"]))


@pytest.mark.parametrize("corpora, message", [
    ("[{corpus: crema-d}]", "at least two corpora"),
    ("[{corpus: crema-d}, {corpus: msp-podcast}]", "official test sets"),
    ("[{corpus: crema-d}, {corpus: pooled}]", "not another pool"),
    ("[{corpus: crema-d}, {corpus: emodb, speakers: 3}]", "unknown keys"),
])
def test_a_wrong_pool_is_a_config_error(tmp_path, corpora, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"output_dir={tmp_path}", "data.corpus=pooled", f"data.corpora={corpora}"])


def test_corpora_without_pooled_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="set data.corpus=pooled"):
        load_config(None, [f"output_dir={tmp_path}", "data.corpora=[{corpus: crema-d}, {corpus: emodb}]"])


def test_the_built_in_members_get_their_own_roots(tmp_path):
    from serray.data.corpora.pooled import members

    cfg = load_config(None, [f"output_dir={tmp_path}", "data.corpus=pooled",
                             "data.corpora=[{corpus: crema-d}, {corpus: emodb}, {corpus: crema-d}]"])
    got = members(cfg.data)
    assert [m["key"] for m in got] == ["crema-d1", "emodb", "crema-d3"]
    assert len({m["root"] for m in got}) == 3 and all(m["root"].startswith(f"{tmp_path}/synthetic/pooled/") for m in got)


def test_the_keys_are_set_from_a_yaml_file_too(tmp_path, trees):
    """data.corpora, data.protocol and data.classes as a user's YAML file sets them."""
    from serray.data.corpora import build_manifest
    from serray.data.corpora.base import class_setting

    path = tmp_path / "pool.yaml"
    path.write_text(f"""output_dir: {tmp_path}/run
synthetic:
  enabled: false
data:
  corpus: pooled
  protocol: leave_one_corpus_out
  classes: [neu, ang, fea]
  corpora:
    - {{corpus: crema-d, root: {trees['crema-d']}}}
    - {{corpus: ravdess, root: {trees['ravdess']}, label_map: {{calm: neu}}}}
""")
    cfg = load_config(str(path), [])
    assert class_setting(cfg.data) == ("neu", "ang", "fea") and cfg.data.sessions == [1, 2]
    report = build_manifest(cfg)
    df = report.kept
    calm = df[df["raw_label"] == "calm"]
    assert len(calm) and (calm["label"] == "neu").all()  # the member's own label map
    assert report.classes == ("neu", "ang", "fea") and set(df["label"]) <= {"neu", "ang", "fea", ""}
