"""MSP-Podcast at its real size: the manifest of a 100,000-turn tree in the release layout.

Writes ``Audios/`` with N tiny WAVs (0.25 s each: the parser's cost is per file, not per second of
audio) and ``Labels/labels_consensus.csv`` with N rows (10 classes, 4 splits, ~1,500 speakers,
a few Unknown), then, each in a fresh child process (its own peak memory):

* ``parser``: ``serray.data.corpora`` builds the manifest (label map, splits, speakers, each file's
  existence and header);
* ``floor``: the least any parser must do, read the label CSV and every file's header with
  soundfile, nothing else.

Prints the parse time, rows per second and peak RSS of each, and ends with
``RESULT manifest_msp_podcast ratio=<floor s / parser s> target=0.5`` (higher is better: the parser
costs at most twice the header reads it cannot avoid).

    python bench/manifest_scale.py [--n 100000] [--dir /tmp/msp-bench]
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CLASSES = "AHSNUFDCOX"
SPLITS = ("Train", "Train", "Train", "Development", "Test1", "Test2")


def make_tree(root: Path, n: int) -> None:
    import numpy as np
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, (0.1 * np.sin(np.arange(4000) / 8)).astype("float32"), 16000, format="WAV", subtype="PCM_16")
    wav = buf.getvalue()
    audio = root / "Audios"
    audio.mkdir(parents=True)
    lines = ["FileName,EmoClass,EmoAct,EmoVal,EmoDom,SpkrID,Gender,Split_Set"]
    for i in range(n):
        name = f"MSP-PODCAST_{i // 1000:04d}_{i % 1000:04d}.wav"
        (audio / name).write_bytes(wav)
        split = SPLITS[(i // 64) % len(SPLITS)]  # blocks of turns, as podcasts are
        spk = (i // 64) % 1500
        unknown = i % 97 == 0
        lines.append(f"{name},{CLASSES[i % 10]},{1 + i % 7}.0,{1 + (i * 3) % 7}.0,{1 + (i * 5) % 7}.0,"
                     f"{'Unknown' if unknown else spk},{'Unknown' if unknown else ('Male' if spk % 2 else 'Female')},"
                     f"{split}")
    (root / "Labels").mkdir()
    (root / "Labels" / "labels_consensus.csv").write_text("\n".join(lines) + "\n")


def _child(kind: str, root: str, q) -> None:
    t0 = time.perf_counter()
    if kind == "parser":
        from types import SimpleNamespace

        from serray.data import corpora

        report = corpora.get("msp-podcast").build(root, SimpleNamespace(label_map={}), keep_unlabelled=True)
        rows = len(report.kept)
    else:
        import pandas as pd
        import soundfile as sf

        labels = pd.read_csv(Path(root) / "Labels" / "labels_consensus.csv", dtype=str)
        rows = 0
        for name in labels["FileName"]:
            sf.info(str(Path(root) / "Audios" / name))
            rows += 1
    q.put({"kind": kind, "seconds": time.perf_counter() - t0, "rows": rows,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def measure(kind: str, root: Path) -> dict:
    q = mp.get_context("spawn").Queue()
    p = mp.get_context("spawn").Process(target=_child, args=(kind, str(root), q))
    p.start()
    out = q.get()
    p.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dir", default=None, help="where to write the tree (default: a temporary directory)")
    args = ap.parse_args()
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="serray-msp-bench-"))
    root = base / "MSP-Podcast"
    try:
        if not (root / "Labels" / "labels_consensus.csv").is_file():
            t0 = time.perf_counter()
            make_tree(root, args.n)
            print(f"tree: {args.n} turns written in {time.perf_counter() - t0:.1f} s")
        # floor first, then the parser, then the floor again (page cache warm for both)
        floor = [measure("floor", root), None]
        parser = measure("parser", root)
        floor[1] = measure("floor", root)
        best_floor = min(f["seconds"] for f in floor)
        for r in (floor[1], parser):
            print(json.dumps(r))
            print(f"{r['kind']}: {r['rows']} rows in {r['seconds']:.1f} s ({r['rows'] / r['seconds']:.0f} rows/s), "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB")
        print(f"RESULT manifest_msp_podcast ratio={best_floor / parser['seconds']:.2f} target=0.5")
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
