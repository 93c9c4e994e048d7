"""A default chosen on the corpus it is reported on, scored nested (docs/protocol.md, "Nothing is selected on test data").

Per fold k, the candidate with the best validation UA on fold k (mean over seeds) is taken, and its test UA
on fold k (mean over seeds) is the nested score; printed beside the default's mean test UA. The gap is the
optimism of choosing the default on this corpus. Usage::

    python docs/results/nested_choice.py --arm full --mode finetune --default egemaps \\
        fbank=RUNS/demo_fbank fbank_pitch=RUNS/demo_fbank_pitch egemaps=RUNS/demo_egemaps
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe_study import collect  # noqa: E402  (this folder's study reader)

from serray.train.metrics import classification_metrics  # noqa: E402


def per_run(out: Path, arm: str, mode: str):
    """``({(seed, fold): test UA}, {(seed, fold): validation UA})`` of one arm of one study."""
    preds, val, _ = collect(out, [arm], [mode], [1.0])
    df = preds[(arm, mode, 1.0)]
    test = {key: classification_metrics(g["label"], g["pred"])["ua"] for key, g in df.groupby(["seed", "fold"])}
    return test, val[(arm, mode, 1.0)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("studies", nargs="+", help="NAME=DIR of a `serray ablate` output_dir, one per candidate")
    ap.add_argument("--arm", default="full")
    ap.add_argument("--mode", default="finetune")
    ap.add_argument("--default", required=True, help="the candidate chosen as the default")
    args = ap.parse_args(argv)
    runs = {name: per_run(Path(d), args.arm, args.mode) for name, d in (s.split("=", 1) for s in args.studies)}
    folds = sorted({k for (_, k) in runs[args.default][0]})
    chosen, tests = [], []
    for k in folds:
        val = {n: np.mean([v for (_, f), v in r[1].items() if f == k]) for n, r in runs.items()}
        best = max(val, key=val.get)
        chosen.append(best)
        tests.append(np.mean([t for (_, f), t in runs[best][0].items() if f == k]))
    default = np.mean(list(runs[args.default][0].values()))
    print(f"{args.arm} / {args.mode}: nested {100 * np.mean(tests):.2f} % UA (per fold: {', '.join(chosen)}); "
          f"the default {args.default}: {100 * default:.2f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
