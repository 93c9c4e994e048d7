"""What MLflow tracking costs a run: ``serray finetune`` (per-fold pre-training + LOSO fine-tuning,
tiny sizes) with ``tracking.enabled=false`` and with the default embedded store, side by side.

One ``serray pipeline`` (tracking off) makes the corpus and the features; then the same
``serray finetune`` runs in fresh output directories, alternating off / on ``--rounds`` times (the
machine's load drifts: alternating spreads it over both). Also times ``import mlflow`` in a fresh
interpreter (every process that logs pays it once).

Ends with ``RESULT tracking_overhead ratio=<median s off / median s on> target=0.9`` (higher is
better: tracking costs a run at most ~10 %).

    python bench/tracking.py [--rounds 2] [--dir /tmp/serray-bench-tracking]
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
TINY = ["synthetic.utterances_per_dialog=4", "synthetic.dialogs_per_session=2", "pretrain.epochs=10",
        "finetune.epochs=10", "finetune.folds=[1,2]", "adapter.d_model=32", "adapter.ff_dim=64", "adapter.num_layers=1",
        "adapter.num_clusters=4", "finetune.attention_dim=16", "finetune.hidden_dim=16", "ray.progress_bars=false",
        "finetune.register=false"]


def serray(*args: str) -> float:
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "serray.cli", *args], cwd=REPO, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dir", default="/tmp/serray-bench-tracking")
    args = ap.parse_args()
    base = Path(args.dir)
    shutil.rmtree(base, ignore_errors=True)
    t0 = time.monotonic()
    imp = subprocess.run([sys.executable, "-X", "importtime", "-c", "import mlflow"], capture_output=True, text=True)
    import_s = time.monotonic() - t0
    print(f"import mlflow (fresh interpreter, incl. start-up): {import_s:.2f} s")
    del imp
    prep = serray("pipeline", f"output_dir={base / 'prep'}", *TINY, "tracking.enabled=false")
    print(f"corpus + features (pipeline, tracking off): {prep:.1f} s")
    shared = [f"data.root={base / 'prep' / 'synthetic' / 'IEMOCAP_full_release'}",
              f"data.manifest={base / 'prep' / 'manifest.parquet'}", f"features.dir={base / 'prep' / 'features'}"]
    times = {"off": [], "on": []}
    for r in range(args.rounds):
        for mode in ("off", "on"):
            out = base / f"{mode}{r}"
            s = serray("finetune", f"output_dir={out}", *TINY, *shared, f"tracking.enabled={str(mode == 'on').lower()}")
            times[mode].append(s)
            print(f"round {r + 1} tracking {mode}: {s:.1f} s" + (f" (store {(out / 'mlflow.db').stat().st_size // 1024} KiB)"
                                                                 if mode == "on" else ""))
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    print(f"median: off {off:.1f} s, on {on:.1f} s (+{on - off:.1f} s, {100 * (on / off - 1):+.1f} %)")
    print(f"RESULT tracking_overhead ratio={off / on:.3f} target=0.9")


if __name__ == "__main__":
    main()
