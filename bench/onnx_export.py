#!/usr/bin/env python
"""ONNX export: parity with torch per clip length, and the int8 trade-off (accuracy change, speed-up).

    python bench/onnx_export.py                         # trains runs/bench-onnx first when it holds no model
    python bench/onnx_export.py --run runs/default      # a finished `serray pipeline` output_dir
    python bench/onnx_export.py --threads 1 --rounds 5

1. The model: the newest registry entry of ``--run`` (made when missing with ``serray pipeline
   finetune.folds=[1]``: the default recipe, one fold), exported with ``serray export --format onnx
   --int8``.
2. Parity: random clips (a gliding tone in noise, random level) of 0.5 to 30 s, ``--clips`` per
   length, each through the torch path (``Predictor.predict_waveforms``: torchaudio's Kaldi fbank ->
   classifier) and the graph (onnxruntime): max |probability difference| per length.
3. Accuracy: every 4-class utterance of the entry's test session(s) (never seen in training) through
   torch, the float graph and the int8 graph: UA / WA of each, how many labels int8 changes and its
   max |probability difference| to the float graph; then how many labels int8 changes over every
   4-class utterance of the corpus (agreement, not accuracy: most were training data).
4. Speed: the same utterances one at a time (batch 1, as ``serray predict --onnx`` runs), ``--threads``
   threads for torch and onnxruntime alike, ``--rounds`` rounds with the order of the three rotated;
   the median round's seconds per clip.

The last line is ``RESULT onnx_int8 ratio=<float graph s / int8 graph s> target=1.0`` (int8 should be
no slower than the float graph on this CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LENGTHS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


def clip(seconds: float, rng: np.random.Generator, sr: int = 16000) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    f0 = rng.uniform(90, 300)
    return (rng.uniform(0.05, 0.5) * np.sin(2 * np.pi * f0 * t * (1 + 0.2 * np.sin(3 * t)))
            + rng.uniform(0.001, 0.05) * rng.normal(size=len(t))).astype(np.float32)


def serray(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "serray.cli", *args], check=True, cwd=REPO)


def ua_wa(labels, preds, classes) -> tuple[float, float]:
    labels, preds = np.asarray(labels), np.asarray(preds)
    recalls = [float(np.mean(preds[labels == c] == c)) for c in classes if (labels == c).any()]
    return float(np.mean(recalls)), float(np.mean(preds == labels))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default=str(REPO / "runs" / "bench-onnx"))
    ap.add_argument("--clips", type=int, default=3, help="random clips per length (parity)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    run = Path(args.run).resolve()
    if not list((run / "registry").glob("*/entry.json")):
        print(f"no model in {run}: training one (serray pipeline finetune.folds=[1])", flush=True)
        serray("pipeline", f"output_dir={run}", "finetune.folds=[1]", "ray.progress_bars=false")
    import pandas as pd
    import torch

    from serray.config import load_config
    from serray.predict import Predictor
    from serray.predict_onnx import OnnxPredictor
    from serray.train.registry import list_entries, resolve_model

    newest = list_entries(run / "registry")[-1]["id"]
    out = run / "export"
    serray("export", "--format", "onnx", newest, f"output_dir={run}", "--out", str(out / "model.onnx"), "--int8")
    torch.set_num_threads(args.threads)
    cfg = load_config(None, [f"output_dir={run}", f"serve.model={newest}"])
    path, entry = resolve_model(cfg)
    torch_p = Predictor.from_checkpoint(path)
    fp32, int8 = OnnxPredictor(out / "model.onnx", args.threads), OnnxPredictor(out / "model.int8.onnx", args.threads)
    print(f"entry {entry['id']} (test folds {entry.get('folds')}, model of fold {entry.get('model_fold')}); "
          f"graph {(out / 'model.onnx').stat().st_size / 2**20:.2f} MB, int8 {(out / 'model.int8.onnx').stat().st_size / 2**20:.2f} MB; "
          f"{args.threads} thread(s), {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")

    rng = np.random.default_rng(0)
    print("\nparity, torch vs float graph (max |dp| over clips):")
    parity = {}
    for s in LENGTHS:
        d = 0.0
        for _ in range(args.clips):
            w = clip(s, rng)
            d = max(d, float(np.abs(torch_p.predict_waveforms([w])[0] - fp32.predict_input(w)).max()))
        parity[s] = d
        print(f"  {s:5.1f} s: {d:.2e}")

    fold = int(entry.get("model_fold") or cfg.finetune.folds[0])
    manifest = pd.read_parquet(cfg.data.manifest)
    test = manifest[(manifest["session"] == fold) & manifest["label"].isin(torch_p.labels)]
    wavs = [fp32.load(p) for p in test["path"]]
    runners = {"torch": lambda w: torch_p.predict_waveforms([w])[0], "onnx": fp32.predict_input,
               "onnx-int8": int8.predict_input}
    probs = {k: np.stack([f(w) for w in wavs]) for k, f in runners.items()}
    labels = list(test["label"])
    print(f"\naccuracy on the {len(wavs)} test utterances of session {fold} "
          f"({sum(len(w) for w in wavs) / 16000:.0f} s of audio):")
    scores = {}
    for k, p in probs.items():
        preds = [torch_p.labels[i] for i in p.argmax(1)]
        scores[k] = ua_wa(labels, preds, torch_p.labels)
        print(f"  {k:9s} UA {100 * scores[k][0]:6.2f} %  WA {100 * scores[k][1]:6.2f} %")
    changed = int((probs["onnx-int8"].argmax(1) != probs["onnx"].argmax(1)).sum())
    print(f"  int8 vs float graph: {changed} of {len(wavs)} labels changed, max |dp| "
          f"{np.abs(probs['onnx-int8'] - probs['onnx']).max():.3f}, UA change "
          f"{100 * (scores['onnx-int8'][0] - scores['onnx'][0]):+.2f} points")

    every = manifest[manifest["label"].isin(torch_p.labels)]
    agree = [int(np.argmax(fp32.predict_input(w)) == np.argmax(int8.predict_input(w)))
             for w in (fp32.load(p) for p in every["path"])]
    print(f"  int8 vs float graph on all {len(agree)} four-class utterances of the corpus (training sessions too: "
          f"agreement, not accuracy): {len(agree) - sum(agree)} labels changed")

    times = {k: [] for k in runners}
    order = list(runners)
    for r in range(args.rounds):
        for k in order[r % 3:] + order[: r % 3]:
            t0 = time.perf_counter()
            for w in wavs:
                runners[k](w)
            times[k].append((time.perf_counter() - t0) / len(wavs))
    med = {k: float(np.median(v)) for k, v in times.items()}
    print("\nseconds per clip, batch 1 (median of rounds): " + ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in med.items()))
    print(f"  float graph vs torch: {med['torch'] / med['onnx']:.2f}x; int8 vs float graph: {med['onnx'] / med['onnx-int8']:.2f}x")
    (out / "bench.json").write_text(json.dumps({"parity": parity, "scores": scores, "int8_changed": changed, "int8_changed_all": len(agree) - sum(agree),
                                                "n_all": len(agree),
                                                "n": len(wavs), "seconds_per_clip": med, "threads": args.threads,
                                                "load_average": os.getloadavg()[0]}, indent=2))
    print(f"RESULT onnx_int8 ratio={med['onnx'] / med['onnx-int8']:.2f} target=1.0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
