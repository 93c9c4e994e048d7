"""Each corpus's own classes (``data.classes``): the label space per corpus, the manifest that records it,
the synthetic corpora that carry every class of their layout, and the errors a wrong setting gets."""

from __future__ import annotations

import json
from collections import Counter

import pandas as pd
import pytest

from serray.config import load_config
from serray.data import corpora
from serray.data.corpora.base import LABELS, label_space, native_classes
from serray.errors import ConfigError, DataError


def test_each_corpus_has_its_own_classes_in_one_vocabulary():
    got = {name: native_classes(corpora.get(name)) for name in corpora.NAMES}
    assert got["iemocap"] == LABELS  # the field's IEMOCAP setup (EmoBox, SUPERB ER)
    assert got["crema-d"] == ("neu", "hap", "sad", "ang", "fea", "dis")
    assert got["emodb"] == ("neu", "hap", "sad", "ang", "fea", "dis", "bor")
    assert got["ravdess"] == ("neu", "hap", "sad", "ang", "fea", "dis", "sur", "cal")
    assert got["msp-podcast"] == ("neu", "hap", "sad", "ang", "fea", "dis", "sur", "con")
    assert got["csv"] == ()  # a CSV's classes are its own labels
    # the four keep their index in every native set
    assert all(g[:4] == LABELS for name, g in got.items() if g)


def test_a_csv_s_own_labels_are_its_classes():
    space = label_space(corpora.get("csv"), {"classes": "native"}, found=["happy", "Fear", "bored", "neutral", "excited"])
    assert space.classes == ("neu", "hap", "fea", "bor", "excited")
    assert space.mapping["Fear"] == "fea" and space.mapping["excited"] == "excited"
    merged = label_space(corpora.get("csv"), {"classes": "native", "label_map": {"excited": "hap"}},
                         found=["happy", "excited", "sad"])
    assert merged.classes == ("hap", "sad")


def test_a_list_keeps_its_classes_and_order_and_drops_the_rest():
    space = label_space(corpora.get("crema-d"), {"classes": ["ang", "neu", "fea"]})
    assert space.classes == ("ang", "neu", "fea")
    assert space.mapping == {"NEU": "neu", "HAP": "", "SAD": "", "ANG": "ang", "FEA": "fea", "DIS": ""}
    with pytest.raises(DataError, match=r"lists \['cal'\], which no label of CREMA-D reaches"):
        label_space(corpora.get("crema-d"), {"classes": ["neu", "cal"]})
    with pytest.raises(DataError, match="maps to one of"):
        label_space(corpora.get("crema-d"), {"classes": ["neu", "ang"], "label_map": {"DIS": "fea"}})


def test_native_label_map_can_merge_a_class():
    space = label_space(corpora.get("ravdess"), {"classes": "native", "label_map": {"calm": "neu"}})
    assert "cal" not in space.classes and space.mapping["calm"] == "neu" and len(space.classes) == 7


def test_the_four_class_default_is_unchanged():
    for name in corpora.NAMES:
        corpus = corpora.get(name)
        space = label_space(corpus, {})
        assert space.classes == LABELS and space.mapping == dict(corpus.raw_labels)


@pytest.mark.parametrize("value, message", [("all", "one of four, native"), (["neu"], "at least two"),
                                            (["neu", "neu"], "distinct")])
def test_a_wrong_classes_setting_is_a_config_error(tmp_path, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"output_dir={tmp_path}", f"data.classes={json.dumps(value)}"])


def test_label_map_targets_are_checked_against_the_classes(tmp_path):
    with pytest.raises(ConfigError, match="data.classes=native or a list takes other classes"):
        load_config(None, [f"output_dir={tmp_path}", "data.corpus=ravdess", "data.label_map={calm: cal}"])
    cfg = load_config(None, [f"output_dir={tmp_path}", "data.corpus=ravdess", "data.classes=native",
                             "data.label_map={calm: neu}"])
    assert cfg.data.classes == "native"


@pytest.fixture(scope="module")
def crema(tmp_path_factory):
    """The built-in corpus in the CREMA-D layout, balanced over its six classes (what `serray pipeline
    data.corpus=crema-d data.classes=native` makes)."""
    from serray.data.synthetic.layouts import make_layout, native_classes as layout_classes

    root = tmp_path_factory.mktemp("crema") / "CREMA-D"
    return make_layout(root, "crema-d", seed=0, dialogs_per_session=2, utterances_per_dialog=8,
                       classes=layout_classes("crema-d"))


def _manifest(tmp_path, root, *extra):
    from serray.cli import main

    out = tmp_path / "manifest.parquet"
    assert main(["manifest", "--root", str(root), "--out", str(out), "data.corpus=crema-d", *extra]) == 0
    return out


def test_the_manifest_records_its_classes_and_training_refuses_another_setting(crema, tmp_path, capsys):
    from serray.data.corpora.base import manifest_classes

    path = _manifest(tmp_path, crema, "data.classes=native")
    printed = capsys.readouterr().out
    assert "fea" in printed and "dis" in printed  # the summary table counts every class
    df = pd.read_parquet(path)
    counts = Counter(df["label"])
    assert set(counts) == {"neu", "hap", "sad", "ang", "fea", "dis"}
    assert min(counts.values()) >= 0.6 * max(counts.values())  # balanced: the extra classes are not a remainder
    assert manifest_classes(path) == (("neu", "hap", "sad", "ang", "fea", "dis"), "native")
    native = load_config(None, [f"output_dir={tmp_path}", "data.corpus=crema-d", "data.classes=native",
                                f"data.manifest={path}"])
    assert corpora.classes_of(native) == ("neu", "hap", "sad", "ang", "fea", "dis")
    four = load_config(None, [f"output_dir={tmp_path}", "data.corpus=crema-d", f"data.manifest={path}"])
    with pytest.raises(DataError, match=r"holds the classes of data.classes=native .* asks for data.classes=four"):
        corpora.classes_of(four)
    # the four-class manifest is written as it always was (no metadata) and refuses a native run
    path4 = _manifest(tmp_path, crema)
    assert manifest_classes(path4) == (LABELS, "four")
    assert corpora.classes_of(load_config(None, [f"output_dir={tmp_path}", "data.corpus=crema-d",
                                                  f"data.manifest={path4}"])) == LABELS
    with pytest.raises(DataError, match="build it again"):
        corpora.classes_of(load_config(None, [f"output_dir={tmp_path}", "data.corpus=crema-d", "data.classes=native",
                                               f"data.manifest={path4}"]))


#: sha256 over (path, bytes) of every file make_corpus(seed=3, dialogs_per_session=2, utterances_per_dialog=10)
#: wrote before ``classes`` existed (commit a84232a): the four-class corpus stays byte for byte what it was.
FOUR_CLASS_DIGEST = "72176c0f307893a6af88b2dc3bbd8c1cd3e18b86334e7ffbbfcae08e4e95efe9"


def _digest(root) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_the_default_synthetic_corpus_does_not_change_with_the_class_option(tmp_path):
    """``classes=None`` (and the four listed) write the corpus of the code before the option, byte for byte:
    the extra classes' own voice profiles are used only for the labels a corpus balances over."""
    from serray.data.synthetic import make_corpus

    kw = {"seed": 3, "dialogs_per_session": 2, "utterances_per_dialog": 10}
    assert _digest(make_corpus(tmp_path / "a", **kw)) == FOUR_CLASS_DIGEST
    assert _digest(make_corpus(tmp_path / "b", classes=["neu", "hap", "sad", "ang"], **kw)) == FOUR_CLASS_DIGEST
    assert _digest(make_corpus(tmp_path / "c", classes=["neu", "hap", "sad", "ang", "fea", "dis"], **kw)) != FOUR_CLASS_DIGEST
    with pytest.raises(ConfigError, match="raw labels among"):
        make_corpus(tmp_path / "d", classes=["neu", "bor"], **kw)
