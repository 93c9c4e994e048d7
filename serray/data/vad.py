"""Voice-activity detection and the cutting of a stream into segments, block by block.

Two detectors score fixed frames of 32 ms (512 samples at 16 kHz, 256 at 8 kHz) with a speech
probability:

* :class:`SileroVAD` (``segment.vad=silero``): Silero VAD, a small recurrent network whose weights ship
  inside the ``silero-vad`` package (TorchScript, run with the torch serray already has; no download).
  16 and 8 kHz only.
* :class:`EnergyVAD` (``segment.vad=energy``): no model and no dependency; a frame is speech when its
  level is ``segment.energy_margin_db`` above the noise floor (the lowest frame level of the last
  ``segment.energy_floor_s`` seconds, never below ``segment.energy_min_db`` dBFS).

:class:`RegionTracker` turns frame probabilities into speech regions with hysteresis (start at
``segment.threshold``, end after ``segment.min_silence_s`` below ``threshold - 0.15``, drop regions
shorter than ``segment.min_speech_s``), as Silero's own ``get_speech_timestamps`` does, but streaming.
:class:`Segmenter` keeps only the audio that an open or pending segment still needs and cuts
``(start, end, samples)`` pieces: speech regions padded by ``segment.pad_s`` and split into equal parts
of at most ``segment.window_s``, or (``segment.vad=none``) windows of ``segment.window_s`` every
``segment.hop_s``. Memory: a few windows of audio, whatever the recording's length.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from typing import Deque, List, Optional, Tuple

import numpy as np

from serray.errors import ConfigError

#: ``segment.vad`` values: a detector, or ``none`` for a plain sliding window.
VADS = ("silero", "energy", "none")
#: Frame length of both detectors, in seconds (Silero's fixed window: 512 samples at 16 kHz).
FRAME_SECONDS = 0.032
#: Hysteresis: a region ends below ``threshold - NEG_OFFSET`` (Silero's default).
NEG_OFFSET = 0.15

Piece = Tuple[int, int, np.ndarray]  # (start sample, end sample, samples)
#: Silero's model, one per thread (it carries state from frame to frame, so threads never share one).
_LOADED = threading.local()


def frame_length(sample_rate: int) -> int:
    return int(round(FRAME_SECONDS * sample_rate))


class EnergyVAD:
    """Speech = frame level above a tracked noise floor by ``margin_db`` (a 0/1 "probability")."""

    name = "energy"

    def __init__(self, sample_rate: int, margin_db: float = 12.0, min_db: float = -60.0, floor_s: float = 5.0):
        self.margin_db, self.min_db = float(margin_db), float(min_db)
        self._span = max(1, int(round(floor_s / FRAME_SECONDS)))
        self._levels: Deque[Tuple[int, float]] = deque()  # monotone queue for the running minimum
        self._n = 0

    def scores(self, frames: np.ndarray) -> np.ndarray:
        """``frames [n, frame]`` -> ``[n]`` in {0, 1}."""
        db = 10 * np.log10(np.mean(np.square(frames, dtype=np.float64), axis=1) + 1e-12)
        out = np.zeros(len(db), np.float32)
        q = self._levels
        for i, level in enumerate(db):
            level = max(float(level), self.min_db)
            while q and q[-1][1] >= level:
                q.pop()
            q.append((self._n, level))
            while q[0][0] <= self._n - self._span:
                q.popleft()
            self._n += 1
            out[i] = 1.0 if level > q[0][1] + self.margin_db else 0.0
        return out


class SileroVAD:
    """Silero VAD's speech probability per 32 ms frame (its state carried from frame to frame)."""

    name = "silero"

    def __init__(self, sample_rate: int):
        if sample_rate not in (8000, 16000):
            raise ConfigError(f"segment.vad=silero runs at 8 or 16 kHz; this model's audio is {sample_rate} Hz "
                              "(use segment.vad=energy)")
        try:
            from silero_vad import load_silero_vad
        except ImportError:
            raise ConfigError("segment.vad=silero needs the silero-vad package (pip install silero-vad); "
                              "or use segment.vad=energy, which needs nothing") from None
        import torch

        self.model = getattr(_LOADED, "silero", None)
        if self.model is None:  # loaded once per thread (1-4 s), reused by every recording that thread segments
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
                self.model = _LOADED.silero = load_silero_vad(onnx=False)
        self.model.reset_states()  # the network is recurrent: a new recording starts from a clean state
        self.sample_rate = sample_rate
        self._torch = torch

    def scores(self, frames: np.ndarray) -> np.ndarray:
        out = np.empty(len(frames), np.float32)
        with self._torch.inference_mode():
            x = self._torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32))
            for i in range(len(frames)):
                out[i] = float(self.model(x[i:i + 1], self.sample_rate))
        return out


def build_vad(name: str, sample_rate: int, settings) -> Optional[object]:
    """The detector named by ``segment.vad`` (None for ``none``)."""
    if name == "silero":
        return SileroVAD(sample_rate)
    if name == "energy":
        return EnergyVAD(sample_rate, float(settings["energy_margin_db"]), float(settings["energy_min_db"]),
                         float(settings["energy_floor_s"]))
    if name == "none":
        return None
    raise ConfigError(f"segment.vad must be one of {', '.join(VADS)}, got '{name}'")


class RegionTracker:
    """Frame probabilities -> speech regions ``(first frame, end frame)``, streaming."""

    def __init__(self, threshold: float, min_speech_frames: int, min_silence_frames: int):
        self.threshold, self.neg = threshold, max(0.01, threshold - NEG_OFFSET)
        self.min_speech, self.min_silence = min_speech_frames, min_silence_frames
        self.n = 0
        self.start: Optional[int] = None  # the open region's first frame
        self._silent_since: Optional[int] = None

    def push(self, probs: np.ndarray) -> List[Tuple[int, int]]:
        closed = []
        for p in probs:
            i = self.n
            self.n += 1
            if self.start is None:
                if p >= self.threshold:
                    self.start, self._silent_since = i, None
                continue
            if p >= self.neg:
                self._silent_since = None
            elif self._silent_since is None:
                self._silent_since = i
            if self._silent_since is not None and self.n - self._silent_since >= self.min_silence:
                closed += self._close(self._silent_since)
        return closed

    def _close(self, end: int) -> List[Tuple[int, int]]:
        start, self.start, self._silent_since = self.start, None, None
        return [(start, end)] if end - start >= self.min_speech else []

    def flush(self) -> List[Tuple[int, int]]:
        if self.start is None:
            return []
        return self._close(self._silent_since if self._silent_since is not None else self.n)


class Segmenter:
    """Audio blocks in, ``(start, end, samples)`` pieces out, holding only the audio still needed.

    Args:
        vad: a detector (:func:`build_vad`), or None for windows of ``window_s`` every ``hop_s``.
        sample_rate: of the blocks.
        window_s: the longest piece; a longer speech region is split into equal parts.
        hop_s: the window step without a detector.
        threshold, min_speech_s, min_silence_s, pad_s: the region rules (module docstring).
    """

    def __init__(self, vad, sample_rate: int, window_s: float, hop_s: float, threshold: float = 0.5,
                 min_speech_s: float = 0.25, min_silence_s: float = 0.3, pad_s: float = 0.1):
        self.vad, self.sr = vad, int(sample_rate)
        self.window = max(1, int(round(window_s * self.sr)))
        self.hop = max(1, int(round(hop_s * self.sr)))
        self.pad = int(round(pad_s * self.sr))
        self.frame = frame_length(self.sr)
        self.tracker = RegionTracker(threshold, max(1, math.ceil(min_speech_s / FRAME_SECONDS)),
                                     max(1, math.ceil(min_silence_s / FRAME_SECONDS)))
        self.n = 0  # samples received
        self._chunks: Deque[np.ndarray] = deque()
        self._kept_from = 0  # absolute sample index of the first kept sample
        self._kept = 0  # samples kept
        self._rest = np.zeros(0, np.float32)  # samples not yet scored (less than a frame)
        self._pending: Deque[Tuple[int, int]] = deque()  # closed regions waiting for their end padding
        self._last_end = 0  # no piece starts before the end of the previous region
        self._cursor: Optional[int] = None  # where the unemitted part of the open region starts
        self._cursor_region: Optional[int] = None  # the first frame of the region the cursor belongs to
        self._next_window = 0  # the sliding window's next start
        self.max_kept = 0  # the most samples held at once (the memory bound, tested)

    # ------------------------------------------------------------------ audio kept

    def _append(self, block: np.ndarray) -> None:
        self._chunks.append(block)
        self._kept += len(block)
        self.n += len(block)
        self.max_kept = max(self.max_kept, self._kept)

    def _cut(self, a: int, b: int) -> np.ndarray:
        out, pos = [], self._kept_from
        for c in self._chunks:
            lo, hi = max(a, pos), min(b, pos + len(c))
            if lo < hi:
                out.append(c[lo - pos: hi - pos])
            pos += len(c)
            if pos >= b:
                break
        return np.concatenate(out) if len(out) > 1 else (out[0].copy() if out else np.zeros(0, np.float32))

    def _drop_before(self, keep: int) -> None:
        while self._chunks and self._kept_from + len(self._chunks[0]) <= keep:
            c = self._chunks.popleft()
            self._kept_from += len(c)
            self._kept -= len(c)

    # ------------------------------------------------------------------ pieces

    def _piece(self, a: int, b: int) -> Piece:
        return a, b, self._cut(a, b)

    def _split(self, a: int, b: int) -> List[Piece]:
        k = max(1, math.ceil((b - a) / self.window))
        edges = [a + (b - a) * i // k for i in range(k + 1)]
        return [self._piece(lo, hi) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]

    def _regions_ready(self, final: bool) -> List[Piece]:
        out = []
        while self._pending:
            a, b = self._pending[0]
            if not final and b > self.n:
                break
            self._pending.popleft()
            out += self._split(a, min(b, self.n))
        return out

    def _on_regions(self, regions: List[Tuple[int, int]]) -> None:
        for fs, fe in regions:
            own = self._cursor is not None and self._cursor_region == fs  # the part not yet emitted
            start = self._cursor if own else max(self._last_end, fs * self.frame - self.pad)
            end = fe * self.frame + self.pad
            self._cursor = None
            self._pending.append((start, end))
            self._last_end = end

    def _open_region(self) -> List[Piece]:
        """A long region still open: emit whole windows while at least two windows of it are held."""
        if self.tracker.start is None:
            self._cursor = None  # a region that closed too short to keep leaves nothing behind
            return []
        if self._cursor is None or self._cursor_region != self.tracker.start:
            self._cursor = max(self._last_end, self.tracker.start * self.frame - self.pad)
            self._cursor_region = self.tracker.start
        out = []
        confirmed = self.tracker.n * self.frame
        while confirmed - self._cursor >= 2 * self.window:
            out.append(self._piece(self._cursor, self._cursor + self.window))
            self._cursor += self.window
        return out

    def feed(self, block: np.ndarray) -> List[Piece]:
        """Pieces complete once ``block`` (mono float32, the next samples) is added."""
        if len(block) == 0:
            return []
        self._append(block)
        if self.vad is None:
            out = []
            while self._next_window + self.window <= self.n:
                out.append(self._piece(self._next_window, self._next_window + self.window))
                self._next_window += self.hop
            self._drop_before(min(self._next_window, self.n - self.window))  # finish() may need the last window
            return out
        x = np.concatenate([self._rest, block]) if len(self._rest) else block
        usable = len(x) // self.frame * self.frame
        self._rest = x[usable:]
        if usable:
            self._on_regions(self.tracker.push(self.vad.scores(x[:usable].reshape(-1, self.frame))))
        out = self._regions_ready(final=False) + self._open_region()
        keep = self.tracker.n * self.frame - self.pad - self.frame  # the next region's start padding
        if self._pending:
            keep = min(keep, self._pending[0][0])
        if self._cursor is not None:
            keep = min(keep, self._cursor)
        self._drop_before(max(0, keep))
        return out

    def finish(self) -> List[Piece]:
        """The remaining pieces at the end of the recording."""
        if self.vad is None:
            covered = self._next_window - self.hop + self.window if self._next_window else 0
            if self.n > covered:
                a = max(0, self.n - self.window)
                return [self._piece(a, self.n)]
            return []
        if len(self._rest):  # the last partial frame: scored padded with zeros
            frame = np.zeros(self.frame, np.float32)
            frame[:len(self._rest)] = self._rest
            self._on_regions(self.tracker.push(self.vad.scores(frame[None])))
        self._on_regions(self.tracker.flush())
        return self._regions_ready(final=True)
