"""The stored feature rows themselves: decoding, the session of a file, per-session statistics.

numpy (and :mod:`serray.storage`) only: the Ray Data tasks of the statistics pass import this module,
and importing :mod:`serray.data.features.featurize` (torch, torchaudio, the encoders) would add seconds to every
fresh worker's first task.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional
from urllib.parse import urlsplit

import numpy as np

from serray import storage


def decode_feature(buf: bytes, num_frames: int, dim: int, num_layers: int = 1) -> np.ndarray:
    """The stored bytes of one row -> float16 array [T, D] (or [L, T, D] when L > 1)."""
    arr = np.frombuffer(buf, dtype=np.float16)
    return arr.reshape(num_frames, dim) if num_layers == 1 else arr.reshape(num_layers, num_frames, dim)


def session_of(path: str) -> Optional[int]:
    """The session of a file under ``session=<n>/``."""
    key, _, value = Path(urlsplit(path).path if storage.is_uri(path) else path).parent.name.partition("=")
    return int(value) if key == "session" and value.isdigit() else None


def partial_sums(batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Per-session frame count, and per dimension ([L, D], float64) the count of defined values, their sum
    and sum of squares, of one batch of stored rows. A NaN (a descriptor with no value in an utterance,
    e.g. F0 where nothing is voiced: :func:`serray.data.features.opensmile.clean_llds`) is left out."""
    acc: Dict[int, list] = {}
    for path, b, t, d, l in zip(batch["path"], batch["feat"], batch["num_frames"], batch["dim"], batch["num_layers"]):
        t, d, l = int(t), int(d), int(l)
        x = decode_feature(b, t, d, l).astype(np.float64).reshape(l, t, d)
        ok = np.isfinite(x)
        x = np.where(ok, x, 0.0)
        a = acc.setdefault(session_of(str(path)), [0, 0.0, 0.0, 0.0])
        a[0] += t
        a[1] = a[1] + x.sum(1)
        a[2] = a[2] + (x * x).sum(1)
        a[3] = a[3] + ok.sum(1)
    keys = sorted(acc)
    return {"session": np.array(keys, dtype=np.int64), "frames": np.array([acc[k][0] for k in keys], dtype=np.int64),
            "sum": np.stack([acc[k][1] for k in keys]), "sumsq": np.stack([acc[k][2] for k in keys]),
            "count": np.stack([acc[k][3] for k in keys]).astype(np.float64)}


def reduce_partials(rows) -> Dict[str, dict]:
    """Sum per-batch partials (rows of :func:`partial_sums`) into per-session statistics."""
    out: Dict[str, dict] = {}
    for part in rows:
        o = out.setdefault(str(int(part["session"])), {"frames": 0, "sum": 0.0, "sumsq": 0.0, "count": 0.0})
        o["frames"] += int(part["frames"])
        for k in ("sum", "sumsq", "count"):
            o[k] = o[k] + np.asarray(part[k], dtype=np.float64)
    return {k: {"frames": v["frames"], "sum": v["sum"].tolist(), "sumsq": v["sumsq"].tolist(),
                "count": np.asarray(v["count"]).astype(np.int64).tolist()} for k, v in out.items()}
