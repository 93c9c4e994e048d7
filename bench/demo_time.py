"""Does the README's first command still take about as long with the new recipe?

Times ``serray pipeline`` on the built-in corpus (corpus, manifest, featurization, per-fold pre-training,
fine-tuning and registration: what the README's first command runs after the install) in fresh output
directories, with the shipped defaults and with the front end of the previous release (:data:`PREVIOUS`:
an 80-bin fbank front end; the other keys it pins are at their shipped values, so a later change of
them is timed too), alternating ``--rounds`` times (the machine's load drifts: alternating spreads it
over both). Ends with

    RESULT demo_time ratio=<median s previous / median s shipped> target=0.8

(higher is better: the shipped demo may take at most 25 % longer than the previous one).

    python bench/demo_time.py [--rounds 1] [--dir /tmp/serray-bench-demo-time]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: the previous release's defaults for the keys this recipe changed (docs/results.md)
PREVIOUS = ["encoder.name=fbank", "finetune.epoch_selection=val", "finetune.select_smooth=1",
            "adapter.ema_decay=0.996", "adapter.ema_decay_end=0.9999", "adapter.ema_layers_only=false"]


def pipeline(out: Path, *overrides: str) -> float:
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "serray.cli", "pipeline", f"output_dir={out}", "tracking.enabled=false",
                    *overrides], cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--dir", default="/tmp/serray-bench-demo-time")
    args = ap.parse_args()
    base = Path(args.dir)
    shutil.rmtree(base, ignore_errors=True)
    times = {"previous": [], "shipped": []}
    for r in range(args.rounds):
        for name, overrides in (("previous", PREVIOUS), ("shipped", [])):
            s = pipeline(base / f"{name}{r}", *overrides)
            times[name].append(s)
            print(f"round {r + 1}, {name} recipe: {s:.0f} s", flush=True)
    prev, new = statistics.median(times["previous"]), statistics.median(times["shipped"])
    print(f"median: previous {prev:.0f} s, shipped {new:.0f} s ({100 * (new / prev - 1):+.0f} %)")
    print(f"RESULT demo_time ratio={prev / new:.3f} target=0.8")


if __name__ == "__main__":
    main()
