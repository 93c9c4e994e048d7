"""Tables of the recipe study (docs/results.md): front ends, the pre-trained body, epoch selection.

Each study is one ``serray ablate`` output directory; this script reads its arms' test predictions and
selected-epoch validation scores from the run directories (so studies made by earlier code are
compared with today's statistics: both scopes, serray.train.stats), and the reference arms' summaries
from its ``ablation.json``. Usage::

    python docs/results/recipe_study.py [--arms none,random_init,full] [--modes finetune] \\
        [--fractions 1] [--json OUT.json] LABEL=DIR [LABEL=DIR ...]

prints one Markdown table: per study and mode, each arm's test UA and validation UA (mean ± sd over the
seed x fold runs) and the paired comparisons full - random_init, full - none and full - classical at
both scopes (these test groups: run-level sign-flip; new test groups: fold-level sign-flip, with the
smallest p its fold count allows), and ``full`` / ``random_init`` − ``classical`` when ``--arms`` names it.

``--across ARM`` compares one arm between studies instead (the same corpus, seeds and folds; e.g. two
epoch-selection schemes or two EMA schedules): each study's ARM against the first study's ARM, paired
by (seed, fold) run and test utterance, at both scopes::

    python docs/results/recipe_study.py --across full --modes finetune,frozen A=DIR_A L=DIR_L

``--arms random_init,classical`` pairs the reference arm too (its runs' predictions, written by
``serray ablate`` under ``ablation/classical/``), so ``random_init`` − ``classical`` and ``full`` −
``classical`` get both scopes. ``LABEL=DIR:ARM`` takes another arm from that study (e.g. the random-init arm beside a longer pre-training
of ``full``), and ``--seeds 0,1`` keeps the seeds two studies share.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from serray.train.ablation import REFERENCE_ARMS, reference_dir
from serray.train.ablation_report import build_ablation
from serray.train.stats import scoped_verdicts

COMPARISONS = (("full", "random_init"), ("full", "none"), ("random_init", "none"), ("full", "classical"),
               ("random_init", "classical"))


def _run_dir(out: Path, arm: str, mode: str, fraction: float, seed: int, main_seed: int = 0) -> Path:
    """Where ``serray ablate`` put one arm x mode x fraction x seed run (serray.train.ablation.arm_overrides)."""
    frac = f"frac{fraction:g}"
    if arm in REFERENCE_ARMS:
        return Path(reference_dir(out, arm, fraction, seed))
    if arm == "none":
        return out / "ablation" / "none" / frac / f"seed{seed}"
    if arm == "full" and seed == main_seed and mode == "finetune" and fraction == 1.0:
        return out / "finetune"
    return out / "ablation" / arm / mode / frac / f"seed{seed}"


def collect(out: Path, arms, modes, fractions, only_seeds=None):
    """``({(arm, mode, fraction): predictions}, {(arm, mode, fraction): {(seed, fold): val_ua}}, ablation.json)``;
    ``only_seeds``: keep these seeds (``summary["seeds"]`` is narrowed to them)."""
    summary = json.loads((out / "ablation" / "ablation.json").read_text())
    if only_seeds is not None:
        summary["seeds"] = [s for s in summary["seeds"] if s in only_seeds]
    seeds, folds = summary["seeds"], summary["folds"]
    preds, val = {}, {}
    for arm in arms:
        for mode in modes:
            for frac in fractions:
                frames, v = [], {}
                for s in seeds:
                    d = _run_dir(out, arm, mode if arm not in ("none",) + REFERENCE_ARMS else "finetune", frac, s)
                    for k in folds:
                        if arm in REFERENCE_ARMS and not (d / f"fold{k}" / "predictions.csv").is_file():
                            raise SystemExit(f"{out}: no per-utterance runs of the {arm} arm ({d / f'fold{k}'}); "
                                             "rerun its `serray ablate` command with today's code to write them")
                        p = pd.read_csv(d / f"fold{k}" / "predictions.csv")
                        frames.append(p.assign(seed=s, fold=k)[["seed", "fold", "utt_id", "label", "pred"]])
                        record = "reference.json" if arm in REFERENCE_ARMS else "fold_result.json"
                        v[(s, k)] = json.loads((d / f"fold{k}" / record).read_text())["val_ua"]
                preds[(arm, mode, frac)] = pd.concat(frames, ignore_index=True)
                val[(arm, mode, frac)] = v
    return preds, val, summary


def _json_default(o):
    """numpy scalars as Python numbers, anything else as its string (for json.dumps)."""
    return o.item() if isinstance(o, np.generic) else str(o)


def _pm(s) -> str:
    return "n/a" if not s or s.get("mean") is None else f"{100 * s['mean']:.2f} ± {100 * s['sd']:.2f}"


def _cmp(c) -> str:
    if c is None:
        return "-"
    said = scoped_verdicts(c)
    ci = c["ci95"]
    fold = (f"folds {c['folds_ahead']}/{c['n_folds']}, p {c['fold_p_value']:.3f} (floor {c['fold_p_min']:.3f}): "
            f"{said['fold_verdict']}")
    return (f"{100 * c['delta']:+.2f} [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}], p {c['p_value']:.3f}, "
            f"{c['wins']}/{c['n_runs']} runs: {said['verdict']}; {fold}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("studies", nargs="+", help="LABEL=DIR of a `serray ablate` output_dir")
    ap.add_argument("--arms", default="none,random_init,full")
    ap.add_argument("--modes", default="finetune")
    ap.add_argument("--fractions", default="1")
    ap.add_argument("--json", default=None, help="write every number here too")
    ap.add_argument("--seeds", default=None, help="with --across: only these seeds (e.g. 0,1), for studies of "
                                                   "different seed counts")
    ap.add_argument("--across", default=None, metavar="ARM",
                    help="compare this arm between the studies (each against the first) instead of arms within each")
    args = ap.parse_args(argv)
    arms, modes = args.arms.split(","), args.modes.split(",")
    fractions = [float(f) for f in args.fractions.split(",")]
    if args.across:
        return across(args.across, modes, fractions, args.studies, args.json,
                      [int(x) for x in args.seeds.split(",")] if args.seeds else None)
    rows, record = [], {}
    paired_ref = "classical" in arms  # the reference's own runs are paired; else its summary from ablation.json
    head = ("| study | mode | labels | " + " | ".join(f"{a} UA % (val)" for a in arms)
            + ("" if paired_ref else " | classical UA %") + " | "
            + " | ".join(f"{a} − {b}: points [95 % CI], run-level p; fold level" for a, b in COMPARISONS
                         if a in arms and b in arms) + ("" if paired_ref else " | full − classical (run-level)") + " |")
    rows += [head, "|" + "---|" * (head.count("|") - 1)]
    for spec in args.studies:
        label, path = spec.split("=", 1)
        preds, val, summary = collect(Path(path), arms, modes, fractions)
        ab = build_ablation(preds, summary.get("protocol", ""), summary["folds"], summary["seeds"],
                            comparisons=[c for c in COMPARISONS if c[0] in arms and c[1] in arms],
                            n_boot=2000, arm_val=val)
        record[label] = {"dir": path, "ablation": ab,
                         "reference": [a for a in summary["arms"] if a["arm"] in ("classical", "oracle")],
                         "reference_comparisons": [c for c in summary.get("comparisons", []) if c["b"] == "classical"]}
        for mode in modes:
            for frac in fractions:
                cells = []
                for a in arms:
                    e = next(x for x in ab["arms"] if (x["arm"], x["mode"], x["label_fraction"]) == (a, mode, frac))
                    cells.append(f"{_pm(e['ua'])} ({_pm(e.get('val_ua'))})")
                ref = next((x for x in summary["arms"] if x["arm"] == "classical" and x["label_fraction"] == frac), None)
                comps = [next((c for c in ab["comparisons"] if (c["a"], c["b"], c["mode"], c["label_fraction"]) ==
                               (a, b, mode, frac)), None) for a, b in COMPARISONS if a in arms and b in arms]
                vs = next((c for c in summary.get("comparisons", []) if (c["a"], c["b"], c["label_fraction"]) ==
                           ("full", "classical", frac) and c["mode"] == mode), None)
                vs_text = "-" if vs is None else (f"{100 * vs['delta']:+.2f} [{100 * vs['ci95'][0]:+.2f}, "
                                                  f"{100 * vs['ci95'][1]:+.2f}], p {vs['p_value']:.3f}")
                ref_cell = "" if paired_ref else f" | {_pm(ref['ua']) if ref else '-'}"
                rows.append(f"| {label} | {mode} | {frac:g} | " + " | ".join(cells) + ref_cell + " | "
                            + " | ".join(_cmp(c) for c in comps) + ("" if paired_ref else f" | {vs_text}") + " |")
    print("\n".join(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1, default=_json_default))
    return 0


def across(arm: str, modes, fractions, studies, json_out=None, only_seeds=None) -> int:
    """One arm in several studies: each study's arm against the first study's, both scopes (module docstring)."""
    labels, preds, val, seeds, folds = [], {}, {}, None, None
    for spec in studies:
        label, path = spec.split("=", 1)
        path, _, own_arm = path.partition(":")  # LABEL=DIR:ARM compares another arm of that study
        p, v, summary = collect(Path(path), [own_arm or arm], modes, fractions, only_seeds)
        if seeds is not None and (summary["seeds"], summary["folds"]) != (seeds, folds):
            raise SystemExit(f"{label}: seeds {summary['seeds']} / folds {summary['folds']} differ from the first "
                             f"study's {seeds} / {folds}: nothing to pair")
        seeds, folds = summary["seeds"], summary["folds"]
        labels.append(label)
        for (_, mode, frac), df in p.items():
            preds[(label, mode, frac)] = df
            val[(label, mode, frac)] = v[(own_arm or arm, mode, frac)]
    comparisons = [(b, labels[0]) for b in labels[1:]]
    ab = build_ablation(preds, "", folds, seeds, comparisons=comparisons, n_boot=2000, arm_val=val)
    head = (f"| {arm}: study | mode | labels | UA % | val UA % | Δ vs {labels[0]}: points [95 % CI], run-level p; "
            "fold level |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for mode in modes:
        for frac in fractions:
            for label in labels:
                e = next(x for x in ab["arms"] if (x["arm"], x["mode"], x["label_fraction"]) == (label, mode, frac))
                c = next((c for c in ab["comparisons"] if (c["a"], c["mode"], c["label_fraction"]) == (label, mode, frac)),
                         None)
                rows.append(f"| {label} | {mode} | {frac:g} | {_pm(e['ua'])} | {_pm(e.get('val_ua'))} | "
                            f"{'' if label == labels[0] else _cmp(c)} |")
    print("\n".join(rows))
    if json_out:
        Path(json_out).write_text(json.dumps({"arm": arm, "studies": dict(s.split("=", 1) for s in studies),
                                              "ablation": ab}, indent=1,
                                             default=_json_default))
    return 0


if __name__ == "__main__":
    sys.exit(main())
