"""Does the shipped recipe reach the field's standard baseline on the built-in corpus?

Runs (or, with ``--reuse``, reads) ``serray ablate`` on the built-in synthetic corpus with the shipped
defaults: arms none / random_init / full and the classical reference on openSMILE's eGeMAPS functionals
+ logistic regression, every fold, ``--seeds`` seeds. Both sides are scored on the same folds, seeds
and test utterances in the same run. Prints the arms, the paired comparisons at both scopes (these
test groups, new test groups) and ends with

    RESULT recipe_vs_egemaps ratio=<best neural arm's mean UA / eGeMAPS + LR's mean UA> target=1.0

(higher is better; the issue's target: the best neural arm at or above the field's baseline).

    python bench/recipe.py [--seeds 3] [--dir /tmp/serray-bench-recipe] [--reuse] [key=value ...]

About 20 min on a 2-core machine at the defaults (the corpus, featurization, 15 pre-trainings and 45
fine-tunings); 2026-12-07: ratio 0.983 (docs/results.md, the shipped recipe with fewer labels).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NEURAL = ("none", "random_init", "full")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/serray-bench-recipe")
    ap.add_argument("--reuse", action="store_true", help="read the ablation already in --dir (rerun it if incomplete)")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides (e.g. encoder.name=fbank)")
    args = ap.parse_args()
    out = Path(args.dir)
    result = out / "ablation" / "ablation.json"
    if not (args.reuse and result.is_file()):
        cmd = [sys.executable, "-m", "serray.cli", "ablate", f"output_dir={out}", "ablate.arms=[none,random_init,full,classical]",
               "ablate.classical_features=egemaps", "ablate.modes=[finetune]", "ablate.label_fractions=[1.0]",
               f"ablate.seeds={args.seeds}", "tracking.enabled=false", *args.overrides]
        print("$ " + " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, cwd=REPO, check=True)
    ab = json.loads(result.read_text())
    ua = {a["arm"]: a["ua"]["mean"] for a in ab["arms"] if a["mode"] == "finetune" and a["label_fraction"] == 1.0}
    print(f"encoder {ab.get('encoder')}, folds {ab['folds']}, seeds {ab['seeds']}")
    for arm in (*NEURAL, "classical"):
        if arm in ua:
            print(f"  {arm:<12} UA {100 * ua[arm]:6.2f} %")
    for c in ab["comparisons"]:
        if c["mode"] == "finetune" and c["label_fraction"] == 1.0:
            ci = c.get("ci95") or (float("nan"), float("nan"))
            print(f"  {c['a']} - {c['b']}: {100 * c['delta']:+.2f} points [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]; "
                  f"these test groups p={c['p_value']:.3f} "
                  f"({c['verdict']}); new test groups p={c.get('fold_p_value', float('nan')):.3f} "
                  f"({c.get('fold_verdict', 'n/a')})")
    best = max(NEURAL, key=lambda a: ua.get(a, float("-inf")))
    print(f"best neural arm: {best}")
    print(f"RESULT recipe_vs_egemaps ratio={ua[best] / ua['classical']:.3f} target=1.0")


if __name__ == "__main__":
    main()
