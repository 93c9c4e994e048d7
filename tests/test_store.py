"""A feature store that knows what it holds, driven as a user drives it (``serray pipeline`` on release-shaped
trees): two corpora in one ``output_dir``, an edited label map, a changed ``data.num_folds``. Each gives the
right rows or a clear error, never a mixture.
"""

from __future__ import annotations

import contextlib
import io
import json

import pandas as pd
import pytest

FAST = ["finetune.mode=none", "finetune.epochs=1", "finetune.attention_dim=16", "finetune.hidden_dim=16",
        "finetune.register=false", "ray.progress_bars=false", "tracking.enabled=false", "synthetic.enabled=false"]


def _run(*args):
    from serray.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue() + err.getvalue()


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    from serray.data.synthetic.layouts import make_layout

    base = tmp_path_factory.mktemp("trees")
    kw = {"seed": 0, "dialogs_per_session": 2, "utterances_per_dialog": 4}
    return {name: make_layout(base / name, name, **kw) for name in ("emodb", "crema-d")}


def _tested(run) -> dict:
    return {int(f["fold"]): f for f in json.loads((run / "finetune" / "metrics.json").read_text())["folds"]}


@pytest.mark.slow
@pytest.mark.ray
def test_two_corpora_in_one_output_dir_are_refused_before_anything_is_replaced(ray_session, trees, tmp_path):
    run = tmp_path / "run"
    rc, text = _run("pipeline", f"output_dir={run}", "data.corpus=emodb", f"data.root={trees['emodb']}",
                    "finetune.folds=[1]", *FAST)
    assert rc == 0, text
    manifest = (run / "manifest.parquet").read_bytes()
    rc, text = _run("pipeline", f"output_dir={run}", "data.corpus=crema-d", f"data.root={trees['crema-d']}", *FAST)
    assert rc != 0 and "holds features of data.corpus=emodb" in text and "not of data.corpus=crema-d" in text
    assert (run / "manifest.parquet").read_bytes() == manifest  # the first corpus's run is left as it was
    # featurize alone says the same
    assert _run("manifest", "--root", str(trees["crema-d"]), "--out", str(tmp_path / "other.parquet"),
                "data.corpus=crema-d")[0] == 0
    rc, text = _run("featurize", f"output_dir={run}", "data.corpus=crema-d", f"data.root={trees['crema-d']}",
                    f"data.manifest={tmp_path / 'other.parquet'}", *FAST)
    assert rc != 0 and "One feature store holds one corpus" in text


@pytest.mark.slow
@pytest.mark.ray
def test_labels_and_folds_come_from_the_current_manifest(ray_session, trees, tmp_path):
    """An edited label map (EmoDB's boredom merged into neutral) reaches training although the rows were
    stored before it; five speaker folds of CREMA-D become three without mixing the old groups."""
    run = tmp_path / "emodb"
    assert _run("manifest", "--root", str(trees["emodb"]), "--out", str(tmp_path / "m.parquet"), "data.corpus=emodb")[0] == 0
    m = pd.read_parquet(tmp_path / "m.parquet")
    fold = int(m[m["raw_label"] == "boredom"]["session"].value_counts().idxmax())  # a speaker with boredom turns
    rc, text = _run("pipeline", f"output_dir={run}", "data.corpus=emodb", f"data.root={trees['emodb']}",
                    f"finetune.folds=[{fold}]", *FAST)
    assert rc == 0, text
    before = _tested(run)[fold]
    rc, text = _run("pipeline", f"output_dir={run}", "data.corpus=emodb", f"data.root={trees['emodb']}",
                    f"finetune.folds=[{fold}]", "data.label_map={boredom: neu}", *FAST)
    assert rc == 0, text
    manifest = pd.read_parquet(run / "manifest.parquet")
    boredom = manifest[(manifest["raw_label"] == "boredom") & (manifest["session"] == fold)]
    after = _tested(run)[fold]
    assert len(boredom) > 0 and after["n_test"] == before["n_test"] + len(boredom)
    preds = pd.read_csv(run / "finetune" / f"fold{fold}" / "predictions.csv").set_index("utt_id")
    assert (preds.loc[boredom["utt_id"], "label"] == "neu").all()

    run = tmp_path / "cremad"
    for k in (5, 3):
        rc, text = _run("pipeline", f"output_dir={run}", "data.corpus=crema-d", f"data.root={trees['crema-d']}",
                        f"data.num_folds={k}", "finetune.folds=[1]", *FAST)
        assert rc == 0, text
        manifest = pd.read_parquet(run / "manifest.parquet")
        four = manifest[manifest["label"].isin(["neu", "hap", "sad", "ang"])]
        assert _tested(run)[1]["n_test"] == int((four["session"] == 1).sum())
        preds = pd.read_csv(run / "finetune" / "fold1" / "predictions.csv")
        assert set(manifest.set_index("utt_id").loc[preds["utt_id"], "session"]) == {1}
