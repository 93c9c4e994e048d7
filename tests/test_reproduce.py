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


# ----------------------------------------------------------------------------------------------------
# issue 34 item 4: a reproduction is a safe, separate run (its own store, its task's metrics, nothing
# written outside --out, the environment compared before hours of training). The pipeline is replaced
# by a stand-in that records the config it was given and writes a metrics.json: no training here.

DIMS = ("valence", "arousal", "dominance")


def _task_metrics(task="categorical", uas=(0.5, 0.625), cccs=(0.4, 0.3)) -> dict:
    if task == "categorical":
        return _metrics(uas=uas)
    folds = []
    for i, ccc in enumerate(cccs):
        f = {"fold": i + 1, **{f"ccc_{d}": ccc for d in DIMS}, "ccc_mean": ccc, "val_ccc_mean": 0.2,
             **{f"pearson_{d}": ccc for d in DIMS}, "task": task}
        if task == "multitask":
            f.update(ua=uas[i], wa=uas[i], macro_f1=uas[i], val_ua=0.4)
        folds.append(f)
    skip = ("fold", "task", "val_ccc_mean", "val_ua")
    mean = {k: sum(f[k] for f in folds) / len(folds) for k in folds[0] if k not in skip}
    return {"folds": folds, "mean": mean, "task": task, "dimensions": list(DIMS)}


def _recorded_run(tmp_path, task="categorical", overrides=(), config_edit=None, prov_edit=None, **metric_kw):
    """A finished run's directory as `serray pipeline` leaves it (the record of this checkout and packages)."""
    import platform

    from omegaconf import OmegaConf

    from serray.config import load_config
    from serray.provenance import git_state, package_versions

    run = tmp_path / "run"
    (run / "finetune").mkdir(parents=True)
    (tmp_path / "schema-defaults.yaml").write_text("{}\n")
    cfg = load_config(tmp_path / "schema-defaults.yaml", [f"output_dir={run}", f"finetune.task={task}", "finetune.folds=[1,2]", *overrides])
    config = OmegaConf.to_container(cfg, resolve=True)
    if config_edit:
        config_edit(config)
    prov = {"git": git_state(), "packages": package_versions(), "python": platform.python_version(), "config": config,
            "manifest": {"sha256": "m"}, "features": {"sha256": "f"}, "seed": 0, "folds": [1, 2]}
    if prov_edit:
        prov_edit(prov)
    metrics = {**_task_metrics(task, **metric_kw), "provenance": prov}
    (run / "finetune" / "metrics.json").write_text(json.dumps(metrics))
    return run, metrics


@pytest.fixture
def fake_pipeline(monkeypatch):
    """``run_pipeline`` replaced: records each config and writes ``finetune.dir/metrics.json`` (the recorded
    metrics, or ``state["metrics"]``)."""
    import serray.pipeline

    state = {"configs": [], "metrics": None}

    def run_pipeline(cfg, echo=print):
        from pathlib import Path

        state["configs"].append(cfg)
        new = dict(state["metrics"] or state["recorded"])
        new["provenance"] = {**state["recorded"]["provenance"], "config": {"output_dir": str(cfg.output_dir)}}
        Path(cfg.finetune.dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.finetune.dir) / "metrics.json").write_text(json.dumps(new))

    monkeypatch.setattr(serray.pipeline, "run_pipeline", run_pipeline)
    return state


def test_reproduce_logs_into_its_own_tracking_store_never_the_recorded_runs(tmp_path, fake_pipeline):
    run, fake_pipeline["recorded"] = _recorded_run(tmp_path)
    recorded_uri = fake_pipeline["recorded"]["provenance"]["config"]["tracking"]["uri"]
    assert recorded_uri == f"sqlite:///{run}/mlflow.db"  # load_config records the store absolute
    again = tmp_path / "again"
    rc, out, err = _run(["reproduce", str(run), "--out", str(again)])
    assert rc == 0, err
    cfg = fake_pipeline["configs"][-1]
    assert cfg.tracking.uri == f"sqlite:///{again}/mlflow.db" and str(run) not in cfg.tracking.uri
    # a store the recorded config named explicitly (a server, another .db) is not the reproduction's either
    run2, fake_pipeline["recorded"] = _recorded_run(tmp_path / "b", overrides=[f"tracking.uri={tmp_path}/shared.db"])
    rc, _, err = _run(["reproduce", str(run2), "--out", str(tmp_path / "again2")])
    assert rc == 0, err
    assert fake_pipeline["configs"][-1].tracking.uri == f"sqlite:///{tmp_path}/again2/mlflow.db"
    # ... unless the user names one on the command line
    rc, _, err = _run(["reproduce", str(run2), "--out", str(tmp_path / "again3"), f"tracking.uri={tmp_path}/mine.db"])
    assert rc == 0 and fake_pipeline["configs"][-1].tracking.uri == f"sqlite:///{tmp_path}/mine.db", err


@pytest.mark.parametrize("task", ["dimensional", "multitask"])
def test_compare_uses_the_tasks_own_metrics(task):
    from serray.reproduce import compare

    same, ok = compare(_task_metrics(task), _task_metrics(task), 0.0)
    assert ok and "ccc_mean" in same and "ccc_valence" in same and ("ua" in same) == (task == "multitask")
    table, ok = compare(_task_metrics(task), _task_metrics(task, cccs=(0.4, 0.1)), 0.0)  # CCC differs, UA equal
    assert not ok and "**" in next(line for line in table.splitlines() if line.startswith("| fold 2 |"))
    assert "**" not in next(line for line in table.splitlines() if line.startswith("| fold 1 |"))
    assert compare(_task_metrics(task), _task_metrics(task, cccs=(0.4, 0.1)), 0.25)[1]
    if task == "multitask":  # UA differs, CCC equal
        assert not compare(_task_metrics(task), _task_metrics(task, uas=(0.5, 0.7)), 0.0)[1]
    # a record that holds none of the task's metrics agrees with nothing
    empty = {"folds": [{"fold": 1}], "mean": {}, "task": task, "dimensions": list(DIMS)}
    assert not compare(empty, empty, 0.0)[1]


def test_reproduce_of_a_dimensional_run_fails_when_the_ccc_differs(tmp_path, fake_pipeline):
    run, fake_pipeline["recorded"] = _recorded_run(tmp_path, task="dimensional")
    fake_pipeline["metrics"] = _task_metrics("dimensional", cccs=(0.4, 0.2))
    rc, out, _ = _run(["reproduce", str(run), "--out", str(tmp_path / "again")])
    assert rc == 1 and "NOT reproduced" in out and "every metric agrees" not in out
    assert "**" in next(line for line in out.splitlines() if line.startswith("| fold 2 |"))
    fake_pipeline["metrics"] = None  # the same CCC: reproduced
    rc, out, _ = _run(["reproduce", str(run), "--out", str(tmp_path / "again")])
    assert rc == 0 and "every metric agrees" in out and "ccc_mean" in out


def _env_registry(config):
    config["registry"]["dir"] = "${oc.env:SERRAY_TEST_ELSEWHERE}/registry"


def test_reproduce_refuses_a_recorded_config_that_reads_the_environment(tmp_path, fake_pipeline, monkeypatch):
    """Through the installed `serray` command: exit 2, one message, nothing written; --allow-env reads it."""
    import os
    import shutil
    import sys
    from pathlib import Path

    elsewhere = tmp_path / "elsewhere"
    run, fake_pipeline["recorded"] = _recorded_run(tmp_path, config_edit=_env_registry)
    again = tmp_path / "again"
    exe = shutil.which("serray", path=str(Path(sys.executable).parent)) or shutil.which("serray")
    env = {**os.environ, "SERRAY_TEST_ELSEWHERE": str(elsewhere)}
    proc = subprocess.run([exe, "reproduce", str(run), "--out", str(again)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "registry.dir" in proc.stderr and "reads the environment" in proc.stderr and "--allow-env" in proc.stderr
    assert not again.exists() and not elsewhere.exists()
    rc, _, err = _run(["reproduce", str(run), "--out", str(again), f"registry.dir={again}/registry"])  # the user's own
    assert rc == 0 and fake_pipeline["configs"][-1].registry.dir == f"{again}/registry", err
    fake_pipeline["configs"].clear()
    monkeypatch.setenv("SERRAY_TEST_ELSEWHERE", str(elsewhere))
    rc, _, err = _run(["reproduce", str(run), "--out", str(again), "--allow-env"])  # read: now it writes outside
    assert rc == 2 and "registry.dir" in err and "outside --out" in err and "--allow-outside" in err
    assert not fake_pipeline["configs"]
    rc, _, err = _run(["reproduce", str(run), "--out", str(again), "--allow-env", "--allow-outside"])
    assert rc == 0, err
    assert fake_pipeline["configs"][-1].registry.dir == f"{elsewhere}/registry"


@pytest.mark.parametrize("key", ["registry.dir", "export.dir", "features.dir", "pretrain.dir", "data.manifest"])
def test_reproduce_refuses_to_write_outside_out(tmp_path, fake_pipeline, key):
    from omegaconf import OmegaConf

    elsewhere = tmp_path / "elsewhere" / key.replace(".", "_")
    corpus = tmp_path / "corpus"  # a real corpus read where it lies: fine
    corpus.mkdir()
    run, fake_pipeline["recorded"] = _recorded_run(
        tmp_path, overrides=[f"{key}={elsewhere}", f"data.root={corpus}", "synthetic.enabled=false"])
    again = tmp_path / "again"
    rc, _, err = _run(["reproduce", str(run), "--out", str(again)])
    assert rc == 2 and key in err and "outside --out" in err and "Traceback" not in err
    assert not again.exists() and not fake_pipeline["configs"]
    rc, _, err = _run(["reproduce", str(run), "--out", str(again), f"{key}={again}/mine"])  # the user's own choice
    assert rc == 0, err
    assert str(fake_pipeline["configs"][-1].data.root) == str(corpus)
    rc, _, err = _run(["reproduce", str(run), "--out", str(tmp_path / "again2"), "--allow-outside"])
    if key in ("registry.dir", "pretrain.dir"):  # the recorded run's own results: still never reused
        assert rc == 2 and "would reuse its results" in err
    else:
        assert rc == 0, err
        assert str(OmegaConf.select(fake_pipeline["configs"][-1], key)) == str(elsewhere)


def test_reproduce_says_what_differs_from_the_recorded_environment_before_running(tmp_path, fake_pipeline):
    def older(prov):
        prov["git"] = {"commit": "0" * 40, "dirty": True}
        prov["packages"] = {**prov["packages"], "torch": "0.0.1", "ray": "0.0.2"}

    run, fake_pipeline["recorded"] = _recorded_run(tmp_path, prov_edit=older)
    rc, out, err = _run(["reproduce", str(run), "--out", str(tmp_path / "again")])
    assert rc == 0
    notice = err[:err.index("reproducing")] if "reproducing" in err else err
    assert "git commit: " + "0" * 40 in notice and "torch: 0.0.1 ->" in notice and "ray: 0.0.2 ->" in notice
    assert "uncommitted changes" in notice and "--strict" in notice
    fake_pipeline["configs"].clear()
    rc, out, err = _run(["reproduce", str(run), "--out", str(tmp_path / "again2"), "--strict"])
    assert rc == 2 and "--strict" in err and "torch: 0.0.1 ->" in err and "Traceback" not in err
    assert not fake_pipeline["configs"] and not (tmp_path / "again2").exists()
    # the same commit and packages: no notice, and --strict runs
    same, fake_pipeline["recorded"] = _recorded_run(tmp_path / "same")
    from serray.provenance import git_state

    rc, out, err = _run(["reproduce", str(same), "--out", str(tmp_path / "again3"), "--strict"])
    if git_state().get("dirty"):  # a checkout with uncommitted changes is never strictly the recorded code
        assert rc == 2 and "uncommitted changes" in err
    else:
        assert rc == 0 and "differs" not in err, err


def test_reproduce_names_the_code_of_folds_reused_from_another_run(tmp_path, fake_pipeline):
    """A record whose run commit matches this checkout but whose fold 2 was reused from a run of older
    code (``fold_code``): the notice names that fold's commit, and ``--strict`` refuses (before, only the
    run-level commit was compared, so the reused fold's code went unseen)."""
    from serray.provenance import code_record

    def reused(prov):
        now = code_record()
        prov["git"], prov["packages"] = now["git"], {**prov["packages"], **now["packages"]}
        prov["fold_code"] = {"1": now, "2": {**now, "git": {"commit": "1" * 40, "dirty": False}}}
        prov["folds_other_code"] = [2]

    run, fake_pipeline["recorded"] = _recorded_run(tmp_path, prov_edit=reused)
    rc, out, err = _run(["reproduce", str(run), "--out", str(tmp_path / "again"), "--strict"])
    assert rc == 2 and "fold 2 (trained by its own run) git commit: " + "1" * 40 in err, err
    assert "folds [2]" in err and "Traceback" not in err
