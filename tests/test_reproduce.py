"""Provenance records and ``serray reproduce``'s reading and comparing, without running anything
(the end-to-end reproduction of the tiny pipeline is in ``tests/test_pipeline.py``, on its fixture)."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess

import pytest


def _run(args) -> tuple[int, str, str]:
    from serray.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(args)
    return rc, out.getvalue(), err.getvalue()


def _metrics(provenance=None, uas=(0.5, 0.625)) -> dict:
    folds = [{"fold": i + 1, "ua": ua, "wa": ua, "macro_f1": ua, "val_ua": 0.4} for i, ua in enumerate(uas)]
    out = {"folds": folds, "mean": {"ua": sum(uas) / len(uas), "wa": sum(uas) / len(uas), "macro_f1": sum(uas) / len(uas)}}
    if provenance is not None:
        out["provenance"] = provenance
    return out


def test_a_run_without_provenance_says_what_is_missing(tmp_path):
    run = tmp_path / "old"
    (run / "finetune").mkdir(parents=True)
    (run / "finetune" / "metrics.json").write_text(json.dumps(_metrics()))
    rc, _, err = _run(["reproduce", str(run)])
    assert rc == 2 and "no provenance record" in err and "git, config, packages, manifest, features, seed, folds" in err
    (run / "finetune" / "metrics.json").write_text(json.dumps(_metrics({"git": {}, "config": {"output_dir": "/x"},
                                                                         "manifest": {}, "features": {}, "folds": [1]})))
    rc, _, err = _run(["reproduce", str(run)])
    assert rc == 2 and "lacks packages, seed" in err
    rc, _, err = _run(["reproduce", str(tmp_path / "nowhere")])
    assert rc == 2 and "does not exist" in err
    (run / "finetune" / "metrics.json").write_text("{not json")
    rc, _, err = _run(["reproduce", str(run)])
    assert rc == 2 and "unreadable" in err and "Traceback" not in err


def test_compare_marks_the_fold_beyond_the_tolerance():
    from serray.reproduce import compare

    table, ok = compare(_metrics(uas=(0.5, 0.625)), _metrics(uas=(0.5, 0.625)), 0.0)
    assert ok and "**" not in table
    table, ok = compare(_metrics(uas=(0.5, 0.625)), _metrics(uas=(0.5, 0.655)), 0.0)
    row = next(line for line in table.splitlines() if line.startswith("| fold 2 |"))
    assert not ok and "**" in row and "| 3 **" in row
    assert "**" not in next(line for line in table.splitlines() if line.startswith("| fold 1 |"))
    assert compare(_metrics(uas=(0.5, 0.625)), _metrics(uas=(0.5, 0.655)), 0.05)[1]
    assert not compare(_metrics(uas=(0.5, 0.625)), _metrics(uas=(0.5,)), 1.0)[1]  # a fold went missing


def test_moved_moves_paths_under_the_old_output_dir_only():
    from serray.reproduce import moved

    cfg = {"output_dir": "/r/run", "data": {"root": "/corpora/iemocap", "manifest": "/r/run/manifest.parquet"},
           "pretrain": {"extra_audio": ["/r/run2/x", "/r/run/extra"]}, "seed": 3}
    assert moved(cfg, "/r/run", "/r/new") == {
        "output_dir": "/r/new", "data": {"root": "/corpora/iemocap", "manifest": "/r/new/manifest.parquet"},
        "pretrain": {"extra_audio": ["/r/run2/x", "/r/new/extra"]}, "seed": 3}


def test_git_state_of_a_checkout_and_of_a_plain_directory(tmp_path):
    from serray.provenance import git_state

    plain = git_state(tmp_path)
    assert plain["commit"] is None and plain["dirty"] is None and "not a git checkout" in plain["reason"]
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "a.txt").write_text("1")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "a"], check=True)
    clean = git_state(repo)
    assert len(clean["commit"]) == 40 and clean["dirty"] is False
    (repo / "untracked.txt").write_text("x")
    assert git_state(repo)["dirty"] is False  # untracked files (runs/, data) do not count
    (repo / "a.txt").write_text("2")
    assert git_state(repo) == {"commit": clean["commit"], "dirty": True}


def test_manifest_hash_follows_the_rows_not_where_the_files_lie(tmp_path):
    import pandas as pd

    from serray.provenance import manifest_record

    df = pd.DataFrame({"utt_id": ["b", "a"], "session": [1, 2], "speaker": ["x", "y"], "label": ["neu", "sad"],
                       "duration": [1.0, 2.5], "path": ["/one/b.wav", "/one/a.wav"]})
    df.to_parquet(tmp_path / "m1.parquet")
    df.assign(path=["/two/b.wav", "/two/a.wav"]).iloc[::-1].to_parquet(tmp_path / "m2.parquet")
    df.assign(label=["neu", "ang"]).to_parquet(tmp_path / "m3.parquet")
    h = [manifest_record(tmp_path / f"m{i}.parquet")["sha256"] for i in (1, 2, 3)]
    assert h[0] == h[1] != h[2] and manifest_record(tmp_path / "m1.parquet")["rows"] == 2
    missing = manifest_record(tmp_path / "none.parquet")
    assert missing["sha256"] is None and "unreadable" in missing["reason"]


@pytest.mark.parametrize("where", ["run", "inside"])
def test_reproduce_refuses_to_write_into_the_recorded_run(tmp_path, where):
    from serray.provenance import REQUIRED

    run = tmp_path / "run"
    (run / "finetune").mkdir(parents=True)
    prov = {k: {} for k in REQUIRED} | {"config": {"output_dir": str(run)}, "seed": 0, "folds": [1]}
    (run / "finetune" / "metrics.json").write_text(json.dumps(_metrics(prov)))
    rc, _, err = _run(["reproduce", str(run), "--out", str(run if where == "run" else run / "again")])
    assert rc == 2 and "must lie outside the recorded run's output_dir" in err


def test_reproduce_names_what_an_evaluation_or_a_sweep_is(tmp_path):
    from serray.provenance import REQUIRED

    prov = {k: {} for k in REQUIRED} | {"config": {"output_dir": str(tmp_path / "x")}, "seed": 0, "folds": [1]}
    run = tmp_path / "ev"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"model": "20261203-x", "target": {}, "provenance": prov}))
    rc, _, err = _run(["reproduce", str(run)])
    assert rc == 2 and "comes from `serray evaluate`" in err
    (run / "metrics.json").write_text(json.dumps({**_metrics(prov), "selection": "nested"}))
    rc, _, err = _run(["reproduce", str(run)])
    assert rc == 2 and "comes from a sweep" in err


def test_reproduce_refuses_a_config_file_it_would_not_use(tmp_path):
    """The run's own recorded config is what reproduce runs: a --config used to be accepted and ignored."""
    from serray.provenance import REQUIRED

    run = tmp_path / "run"
    (run / "finetune").mkdir(parents=True)
    prov = {k: {} for k in REQUIRED} | {"config": {"output_dir": str(run)}, "seed": 0, "folds": [1]}
    (run / "finetune" / "metrics.json").write_text(json.dumps(_metrics(prov)))
    rc, _, err = _run(["reproduce", str(run), "--config", "configs/iemocap.yaml", "--out", str(tmp_path / "new")])
    assert rc == 2 and "--config configs/iemocap.yaml would not be used" in err and "Traceback" not in err
    assert not (tmp_path / "new").exists()
