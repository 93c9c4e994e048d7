"""Tests of serray.train.ablation_report: build_ablation (schema, numbers) and write_ablation (JSON, MD, PNG)."""

from __future__ import annotations

import json
import re
import struct

import numpy as np
import pandas as pd
import pytest

from serray.data.corpora.base import LABELS
from serray.train import stats
from serray.train.ablation_report import ablation_markdown, build_ablation, write_ablation

SEEDS, FOLDS = (0, 1), (1, 2, 3)


def make_preds(acc, seed, n=30):
    rng = np.random.default_rng(seed)
    truth = np.random.default_rng(99)
    rows = []
    for f in FOLDS:
        y = truth.integers(0, 4, n)
        y[:4] = np.arange(4)
        for s in SEEDS:
            ok = rng.random(n) < acc
            p = np.where(ok, y, (y + rng.integers(1, 4, n)) % 4)
            rows += [(s, f, f"f{f}_u{i:03d}", LABELS[y[i]], LABELS[p[i]]) for i in range(n)]
    return pd.DataFrame(rows, columns=["seed", "fold", "utt_id", "label", "pred"])


def near_copy(preds):
    """``preds`` with two right predictions made wrong and two wrong ones made right (delta about 0)."""
    out = preds.copy()
    right = np.flatnonzero((out["label"] == out["pred"]).to_numpy())
    wrong = np.flatnonzero((out["label"] != out["pred"]).to_numpy())
    for i in right[[3, 60]]:
        out.iloc[i, out.columns.get_loc("pred")] = LABELS[(LABELS.index(out.iloc[i]["label"]) + 1) % 4]
    for i in wrong[[1, 10]]:
        out.iloc[i, out.columns.get_loc("pred")] = out.iloc[i]["label"]
    return out


@pytest.fixture(scope="module")
def arm_preds():
    full = make_preds(0.85, 1)
    return {
        ("full", "finetune", 1.0): full,
        ("random_init", "finetune", 1.0): make_preds(0.45, 2),
        ("none", "finetune", 1.0): make_preds(0.44, 3),
        ("no_local", "finetune", 1.0): near_copy(full),
        ("full", "finetune", 0.1): make_preds(0.6, 5),
        ("random_init", "finetune", 0.1): make_preds(0.35, 6),
        ("oracle", "finetune", 1.0): make_preds(0.95, 7),
        ("full", "frozen", 1.0): make_preds(0.7, 8),
    }


@pytest.fixture(scope="module")
def ablation(arm_preds):
    return build_ablation(arm_preds, "IEMOCAP 4-class, 3-fold LOSO (test)", list(FOLDS), list(SEEDS), n_boot=300)


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])  # IHDR width, height


def test_build_ablation_schema_and_numbers(ablation, arm_preds):
    assert set(ablation) == {"protocol", "folds", "seeds", "arms", "comparisons"}
    assert ablation["folds"] == [1, 2, 3] and ablation["seeds"] == [0, 1]
    keys = [(r["mode"], r["label_fraction"], r["arm"]) for r in ablation["arms"]]
    assert keys == [("finetune", 0.1, "random_init"), ("finetune", 0.1, "full"),
                    ("finetune", 1.0, "none"), ("finetune", 1.0, "random_init"), ("finetune", 1.0, "no_local"),
                    ("finetune", 1.0, "full"), ("finetune", 1.0, "oracle"), ("frozen", 1.0, "full")]
    for r in ablation["arms"]:
        runs = stats.run_metrics(arm_preds[(r["arm"], r["mode"], r["label_fraction"])])
        assert r["runs"] == runs and len(runs) == 6
        for m in ("ua", "wa", "macro_f1"):
            assert r[m] == stats.summarise_runs(runs, m)
    # comparisons only where both arms exist, in the default order
    comps = [(c["a"], c["b"], c["mode"], c["label_fraction"]) for c in ablation["comparisons"]]
    assert comps == [("full", "random_init", "finetune", 0.1), ("full", "random_init", "finetune", 1.0),
                     ("full", "no_local", "finetune", 1.0), ("random_init", "none", "finetune", 1.0),
                     ("full", "none", "finetune", 1.0)]
    arms = {(r["arm"], r["mode"], r["label_fraction"]): r for r in ablation["arms"]}
    for c in ablation["comparisons"]:
        expect = arms[(c["a"], c["mode"], c["label_fraction"])]["ua"]["mean"] - \
            arms[(c["b"], c["mode"], c["label_fraction"])]["ua"]["mean"]
        assert c["delta"] == pytest.approx(expect, abs=1e-12)
        assert c["metric"] == "ua" and c["test"] == stats.RUN_LEVEL_TEST
        assert set(c) >= {"a", "b", "mode", "label_fraction", "metric", "delta", "ci95", "p_value", "test", "verdict",
                          "wins", "losses", "utterance_ci95", "utterance_p", "wilcoxon_p"}
        assert c["verdict"] == stats.verdict(c["p_value"], c["delta"], c["ci95"])
    json.dumps(ablation, allow_nan=False)


def test_build_ablation_rejects_runs_outside_protocol(arm_preds):
    with pytest.raises(ValueError, match="outside seeds"):
        build_ablation({("full", "finetune", 1.0): arm_preds[("full", "finetune", 1.0)]}, "p", [1, 2], [0, 1])
    with pytest.raises(ValueError, match="\\(arm, mode, label_fraction\\)"):
        build_ablation({"full": arm_preds[("full", "finetune", 1.0)]}, "p", list(FOLDS), list(SEEDS))


def test_build_ablation_custom_comparisons_and_metric(arm_preds):
    sub = {k: v for k, v in arm_preds.items() if k[1] == "finetune" and k[2] == 1.0}
    abl = build_ablation(sub, "p", list(FOLDS), list(SEEDS), comparisons=[("oracle", "full"), ("full", "absent")],
                         metric="macro_f1", n_boot=100)
    assert [(c["a"], c["b"], c["metric"]) for c in abl["comparisons"]] == [("oracle", "full", "macro_f1")]


def test_write_ablation_files_and_markdown_numbers(ablation, tmp_path):
    paths = write_ablation(ablation, tmp_path / "out")
    assert set(paths) == {"json", "md", "png"}
    assert json.loads(paths["json"].read_text()) == ablation
    assert paths["json"].read_text().startswith('{\n  "protocol"')  # indent 2

    md = paths["md"].read_text()
    assert md == ablation_markdown(ablation)
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    arm_rows = {tuple(c.strip() for c in line.strip("|").split("|")[:3]): line for line in rows}
    full = next(r for r in ablation["arms"] if (r["arm"], r["mode"], r["label_fraction"]) == ("full", "finetune", 1.0))
    cells = [c.strip() for c in arm_rows[("full", "finetune", "1")].strip("|").split("|")]
    ua_mean, ua_sd = (float(x) for x in re.fullmatch(r"([\d.]+) ± ([\d.]+)", cells[3]).groups())
    assert ua_mean == pytest.approx(round(100 * full["ua"]["mean"], 2), abs=1e-9)
    assert ua_sd == pytest.approx(round(100 * full["ua"]["sd"], 2), abs=1e-9)
    f1_mean = float(cells[5].split(" ± ")[0])
    assert f1_mean == pytest.approx(round(100 * full["macro_f1"]["mean"], 2), abs=1e-9)
    assert cells[6] == "6"

    comp = ablation["comparisons"][1]  # full vs random_init, finetune, 1.0: a large gain
    line = next(r for r in rows if r.startswith("| full | random_init | finetune | 1 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert float(cells[5]) == pytest.approx(round(100 * comp["delta"], 2), abs=1e-9)
    lo, hi = (float(x) for x in re.fullmatch(r"\[([-+\d.]+), ([-+\d.]+)\]", cells[6]).groups())
    assert (lo, hi) == pytest.approx((round(100 * comp["ci95"][0], 2), round(100 * comp["ci95"][1], 2)), abs=1e-9)
    assert lo > 0 and cells[7] == f"{comp['p_value']:.3f}" == "0.031"  # 6 runs, all ahead: 2 / 2^6
    assert cells[8] == "6/6" and cells[9] == "beats"

    # the reading: the clear gain is stated, the null comparison (full vs no_local) is not claimed
    assert (f"**full** beats **random_init** on these test groups (finetune, label fraction 1) by "
            f"{100 * comp['delta']:.2f} points") in md
    # three folds: no claim about new test groups is possible (2 / 2^3 = 0.25), and the report says so
    assert comp["n_folds"] == 3 and comp["fold_p_min"] == 0.25 and comp["fold_verdict"] == "not testable with 3 folds"
    assert cells[13] == "not testable with 3 folds" and "for new test groups it cannot be established with 3 folds" in md
    nl = next(c for c in ablation["comparisons"] if c["b"] == "no_local")
    assert nl["verdict"] == "not established" and nl["p_value"] > 0.05
    assert "full vs no_local (finetune, label fraction 1" in md and "**full** beats **no_local**" not in md
    assert "Caution: the test sets are small (30 utterances per run)" in md

    w, h = _png_size(paths["png"])
    assert paths["png"].stat().st_size > 5_000
    assert w >= 1400  # two panels (12 in at 120 dpi): several label fractions give the label-efficiency curve


def test_validation_ua_is_summarised_beside_the_test_metrics(arm_preds):
    one = {k: v for k, v in arm_preds.items() if k == ("full", "finetune", 1.0) or k == ("none", "finetune", 1.0)}
    val = {("full", "finetune", 1.0): {(s, f): 0.5 + 0.01 * f + 0.1 * s for s in SEEDS for f in FOLDS}}
    abl = build_ablation(one, "p", list(FOLDS), list(SEEDS), n_boot=100, arm_val=val)
    full = next(r for r in abl["arms"] if r["arm"] == "full")
    assert full["val_ua"]["mean"] == pytest.approx(np.mean(list(val[("full", "finetune", 1.0)].values())))
    assert [r["val_ua"] for r in full["runs"]] == [val[("full", "finetune", 1.0)][(r["seed"], r["fold"])] for r in full["runs"]]
    md = ablation_markdown(abl)
    assert "val UA %" in md and f"| {100 * full['val_ua']['mean']:.2f} ± " in md
    assert "sd: sample standard deviation, n − 1" in md


def test_write_ablation_single_fraction(arm_preds, tmp_path):
    one = {k: v for k, v in arm_preds.items() if k[2] == 1.0}
    abl = build_ablation(one, "p", list(FOLDS), list(SEEDS), n_boot=100)
    paths = write_ablation(abl, tmp_path)
    assert paths["png"].stat().st_size > 5_000
    w, h = _png_size(paths["png"])
    assert w <= 900  # one panel (7 in at 120 dpi)
    assert "| full | frozen | 1 |" in paths["md"].read_text()


def test_write_ablation_nan_and_numpy_become_json(tmp_path):
    abl = {"protocol": "p", "folds": [np.int64(1)], "seeds": [0],
           "arms": [{"arm": "full", "mode": "finetune", "label_fraction": 1.0,
                     "ua": {"mean": np.float64(0.5), "sd": float("nan"), "ci95": [None, None]},
                     "wa": {"mean": 0.5, "sd": 0.0, "ci95": [None, None]},
                     "macro_f1": {"mean": None, "sd": None, "ci95": [None, None]},
                     "runs": [{"seed": 0, "fold": 1, "ua": 0.5, "wa": 0.5, "macro_f1": None, "n_test": 4}]}],
           "comparisons": []}
    paths = write_ablation(abl, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["arms"][0]["ua"] == {"mean": 0.5, "sd": None, "ci95": [None, None]}
    assert data["folds"] == [1]
    md = paths["md"].read_text()
    assert "| full | finetune | 1 | 50.00 ± n/a | 50.00 ± 0.00 | n/a | 1 |" in md
    assert "No paired comparisons were made." in md
    assert paths["png"].stat().st_size > 5_000


def test_an_interrupted_ablation_is_a_clear_error_that_counts_what_is_missing(tmp_path):
    """Ctrl-C (or a lost node) ends the Tune sweep early: collecting the results then says how much is
    missing and how to resume, and counts a finished run as finished."""
    from serray.config import load_config
    from serray.errors import SerrayError
    from serray.train.ablation import _collect, arm_config
    from serray.train.finetune import finetune_hash

    cfg = load_config(None, [f"output_dir={tmp_path}", "ablate.arms=[none,full]", "ablate.label_fractions=[1.0]",
                             "ablate.modes=[finetune]"])
    with pytest.raises(SerrayError, match=r"incomplete: 4 of 4 .*\(the first: none, finetune, labels x1, seed 0, "
                                          r"fold 1\).*Rerun the same command"):
        _collect(cfg, [0], [1, 2])
    done = arm_config(cfg, "none", "finetune", 1.0, 0)
    fold_dir = tmp_path / "ablation" / "none" / "frac1" / "seed0" / "fold1"
    assert done.finetune.dir == str(fold_dir.parent)
    fold_dir.mkdir(parents=True)
    (fold_dir / "fold_result.json").write_text(json.dumps({"config_hash": finetune_hash(done)}))
    with pytest.raises(SerrayError, match=r"incomplete: 3 of 4 .*\(the first: none, finetune, labels x1, seed 0, fold 2\)"):
        _collect(cfg, [0], [1, 2])
