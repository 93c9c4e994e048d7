"""openSMILE's feature sets made for emotion (audEERING's maintained ``opensmile`` package).

* :func:`functionals` -- the utterance-level eGeMAPS v02 (88 features) or ComParE 2016 (6,373)
  functionals: the field's standard baseline with a linear classifier (the ``classical`` arm with
  ``ablate.classical_features: egemaps``, and the reference column of ``serray evaluate``);
* :class:`serray.data.encoders.OpenSmileEncoder` -- their frame-level low-level descriptors (eGeMAPS 25, ComParE 65, at
  100 frames/s) as a frozen encoder (``encoder.name: egemaps`` / ``compare``), so the adapter can be
  tried on features made for emotion.

openSMILE processes each signal alone, so the features of an utterance do not depend on its batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Sequence

import numpy as np

from serray.errors import ConfigError

#: ``encoder.name`` / ``ablate.classical_features`` -> openSMILE feature set name.
FEATURE_SETS: Dict[str, str] = {"egemaps": "eGeMAPSv02", "compare": "ComParE_2016"}
#: Low-level descriptor widths (what the encoder's ``dim`` is without loading openSMILE).
LLD_DIMS: Dict[str, int] = {"egemaps": 25, "compare": 65}
FRAME_RATE = 100.0  # openSMILE's LLDs: 10 ms hop ...
FIRST_FRAME = 800  # ... the first frame needs 50 ms at 16 kHz (measured: 32,000 samples -> 196 frames)


def lld_frames(num_samples: int, sample_rate: int = 16000) -> int:
    """LLD frames openSMILE gives a signal (shorter than one window: 0, it would fill NaN)."""
    first, hop = int(FIRST_FRAME * sample_rate / 16000), int(sample_rate / FRAME_RATE)
    return 0 if num_samples < first else 1 + (num_samples - first) // hop


def smile_for(name: str, level: str):
    """An ``opensmile.Smile`` of feature set ``name`` (``egemaps`` / ``compare``) at ``level``."""
    if name not in FEATURE_SETS:
        raise ConfigError(f"unknown openSMILE feature set {name!r}; known: {', '.join(FEATURE_SETS)}")
    try:
        import opensmile
    except ImportError:  # pragma: no cover - a declared dependency
        raise ConfigError("openSMILE features need the `opensmile` package: pip install opensmile") from None
    return opensmile.Smile(feature_set=getattr(opensmile.FeatureSet, FEATURE_SETS[name]),
                           feature_level=getattr(opensmile.FeatureLevel, level))


def functionals(paths: Sequence[str | Path], name: str = "egemaps", sample_rate: int = 16000) -> np.ndarray:
    """Utterance functionals [N, 88] (eGeMAPS) or [N, 6373] (ComParE) of audio files, float64.

    Files are decoded like everything else in serray (:func:`serray.data.audio.load_audio`: mono,
    ``sample_rate``), then handed to openSMILE as signals.

    Raises:
        AudioError: a file is missing or unreadable.
    """
    from serray.data.audio import load_audio

    smile = smile_for(name, "Functionals")
    rows = [smile.process_signal(load_audio(p, sample_rate), sample_rate).to_numpy()[0] for p in paths]
    x = np.asarray(rows, dtype=np.float64)
    return np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def identity(name: str, sample_rate: int) -> dict:
    return {"encoder": name, "layers": [], "dim": LLD_DIMS[name], "num_layers": 1, "frame_rate": FRAME_RATE,
            "sample_rate": sample_rate}
