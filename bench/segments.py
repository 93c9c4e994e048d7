#!/usr/bin/env python
"""Long recordings at bounded memory: peak RSS of ``serray predict --segments`` on a 30-minute file.

    python bench/segments.py                 # 30 min vs 1 min, segment.vad=silero (the default)
    python bench/segments.py --minutes 5     # a shorter check
    python bench/segments.py --vad energy

Makes a long synthetic recording (clips of the synthetic corpus joined by 1-3 s of silence, white
noise at -55 dBFS over all of it, 16 kHz 16-bit mono WAV, written block by block) and a 1-minute one,
then runs :func:`serray.segment.segment_file` on each in a fresh child process with a random-init
classifier on the fbank encoder (``make_demo_checkpoint``: the real code path; its labels mean nothing)
and reads the child's peak RSS (``ru_maxrss``, the whole process: Python, torch, Silero VAD, the model).
Beside them, as the contrast, a child that only decodes the 30-minute file whole (``load_audio``).

The bound is :data:`BOUND_MB` (README, docs/segments.md). The last line is
``RESULT segments ratio=<bound / peak RSS of the long run> target=1.0`` (>= 1: under the bound).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

#: The stated bound on the peak RSS of segmenting a recording of any length (MB).
BOUND_MB = 1024.0


def make_recording(path: Path, minutes: float, clips, seed: int = 0) -> float:
    """Clips joined by 1-3 s of silence until ``minutes``, noise over all of it; returns the seconds written."""
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(seed)
    sr, total, i = 16000, int(minutes * 60 * 16000), 0
    noise = 10 ** (-55 / 20)
    with sf.SoundFile(path, "w", sr, 1, subtype="PCM_16") as f:
        written = 0
        while written < total:
            gap = np.zeros(int(rng.uniform(1.0, 3.0) * sr), np.float32)
            for part in (gap, clips[i % len(clips)]):
                part = part[: total - written]
                f.write(part + (noise * rng.standard_normal(len(part))).astype(np.float32))
                written += len(part)
            i += 1
    return written / sr


def child(args) -> None:
    """Runs in a fresh process: segment (or decode whole) one file, print one JSON line."""
    import resource

    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if args.child == "whole":
        from serray.data.audio import load_audio

        x = load_audio(args.file, 16000)
        out = {"seconds": len(x) / 16000}
    else:
        from serray.config import load_config
        from serray.predict import Predictor
        from serray.segment import segment_file, settings_of
        from serray.serve.demo import make_demo_checkpoint

        cfg = load_config(None, [f"segment.vad={args.vad}"])
        ck = make_demo_checkpoint(Path(args.work) / "ck", seed=0, cfg=cfg)
        res = segment_file(Predictor.from_checkpoint(ck), args.file, settings_of(cfg), min_seconds=0.25)
        out = {"seconds": res["duration_s"], "segments": len(res["segments"]),
               "max_buffered_s": res["max_buffered_s"], "dominant": res["aggregate"]["dominant"]}
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    out["peak_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print("CHILD " + json.dumps(out), flush=True)


def run_child(mode: str, path: Path, work: Path, vad: str) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--file", str(path), "--work", str(work), "--vad", vad]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("CHILD ")), None)
    if p.returncode != 0 or line is None:
        sys.exit(f"child {mode} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return json.loads(line[6:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--vad", default="silero", choices=("silero", "energy", "none"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--file", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    import soundfile as sf

    from bench._common import LoadMonitor, load_line
    from serray.data.synthetic import make_corpus

    print(f"# bench/segments.py: {args.minutes:g} min vs 1 min, segment.vad={args.vad}; {load_line()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="serray-bench-segments-") as tmp:
        work = Path(tmp)
        root = make_corpus(work / "IEMOCAP_full_release", seed=0, dialogs_per_session=1, utterances_per_dialog=6)
        wavs = sorted(w for w in root.glob("Session*/sentences/wav/*/*.wav") if not w.name.startswith("._"))
        clips = [sf.read(w, dtype="float32")[0] for w in wavs]
        long_path, short_path = work / "long.wav", work / "short.wav"
        secs = make_recording(long_path, args.minutes, clips, seed=1)
        make_recording(short_path, 1.0, clips, seed=2)
        print(f"# recording: {secs / 60:.1f} min, {long_path.stat().st_size / 2**20:.1f} MB WAV; "
              f"{len(clips)} distinct clips", flush=True)
        rows = {}
        with LoadMonitor() as mon:
            rows["short"] = run_child("segments", short_path, work, args.vad)
            rows["long"] = run_child("segments", long_path, work, args.vad)
        rows["whole"] = run_child("whole", long_path, work, args.vad)
    print(f"# load during the segment runs: {mon.line()}")
    print(f"{'run':<32} {'audio min':>9} {'segments':>8} {'wall s':>7} {'x realtime':>10} {'peak RSS MB':>11}")
    for name, label in (("short", "segments, 1 min"), ("long", f"segments, {args.minutes:g} min"),
                        ("whole", f"decode whole ({args.minutes:g} min), no model")):
        r = rows[name]
        rt = r["seconds"] / r["wall_s"] if r["wall_s"] else float("nan")
        print(f"{label:<32} {r['seconds'] / 60:9.1f} {r.get('segments', '-')!s:>8} {r['wall_s']:7.1f} {rt:10.1f} "
              f"{r['peak_mb']:11.1f}")
    long = rows["long"]
    print(f"# growth from 1 min to {args.minutes:g} min: {long['peak_mb'] - rows['short']['peak_mb']:+.1f} MB; "
          f"most audio held at once: {long['max_buffered_s']} s; bound {BOUND_MB:g} MB")
    print(f"RESULT segments ratio={BOUND_MB / long['peak_mb']:.3f} target=1.0")


if __name__ == "__main__":
    main()
