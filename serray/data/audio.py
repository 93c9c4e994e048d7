"""Audio I/O shared by featurization, offline prediction and serving.

soundfile reads (WAV/FLAC, any sub-type); torchaudio only resamples. Every way audio can be
unusable becomes an :class:`~serray.errors.AudioError` naming the problem.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Union

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from serray.errors import AudioError

AudioSource = Union[str, Path, bytes]


def check_complete_wav(head: bytes, total: int) -> None:
    """Refuse a RIFF/WAVE file whose ``data`` chunk declares more bytes than the file holds.

    libsndfile decodes such a file (an upload or a copy cut short) as the shorter audio it finds; a
    prediction on part of the clip is not what was asked for. ``head`` is the start of the file (at
    least up to the data chunk header), ``total`` its full length. A declared size of 0 or
    0xFFFFFFFF (streaming writers) means "unknown" and is accepted; other formats (FLAC, RF64, W64)
    are left to the decoder, which detects their truncation itself.
    """
    if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
        return
    order = "<" if head[:4] == b"RIFF" else ">"
    pos = 12
    while pos + 8 <= len(head):
        chunk, size = head[pos:pos + 4], struct.unpack(order + "I", head[pos + 4:pos + 8])[0]
        if chunk == b"data":
            present = total - pos - 8
            if size not in (0, 0xFFFFFFFF) and size > present:
                raise AudioError(f"truncated WAV: its data chunk declares {size} bytes but only {present} are present")
            return
        pos += 8 + size + (size & 1)


def _read(source: AudioSource) -> tuple[np.ndarray, int]:
    what = "audio bytes" if isinstance(source, (bytes, bytearray)) else str(source)
    if isinstance(source, (bytes, bytearray)):
        if len(source) == 0:
            raise AudioError("empty audio: no bytes")
        check_complete_wav(bytes(source[:65536]), len(source))
        handle = io.BytesIO(source)
    else:
        if not Path(source).is_file():
            raise AudioError(f"audio file not found: {source}")
        with open(source, "rb") as f:
            check_complete_wav(f.read(65536), Path(source).stat().st_size)
        handle = source
    try:
        data, sr = sf.read(handle, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as e:
        raise AudioError(f"cannot decode {what} as WAV/FLAC: {e}") from None
    return data, sr


def to_mono_resampled(data: np.ndarray, sr: int, target_sr: int) -> np.ndarray:
    """[frames, channels] or [frames] float -> mono float32 at ``target_sr``."""
    mono = data.mean(axis=1) if data.ndim == 2 else data
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    if sr != target_sr:
        mono = AF.resample(torch.from_numpy(mono), sr, target_sr).numpy()
    return mono


def load_audio(source: AudioSource, target_sr: int = 16000, min_seconds: float = 0.0,
               max_seconds: float | None = None) -> np.ndarray:
    """Read audio, mix down to mono, resample to ``target_sr`` and check it.

    Args:
        source: a file path or the encoded bytes of a WAV/FLAC file.
        target_sr: output sample rate.
        min_seconds: shorter audio is an error.
        max_seconds: longer audio is an error (None: no limit).

    Returns:
        float32 mono waveform in [-1, 1]-ish range.

    Raises:
        AudioError: missing, empty, undecodable, non-finite, too short or too long audio.
    """
    data, sr = _read(source)
    if data.shape[0] == 0:
        raise AudioError("empty audio: no samples")
    if not np.isfinite(data).all():
        raise AudioError("audio holds NaN or infinite samples")
    seconds = data.shape[0] / sr
    if seconds < min_seconds:
        raise AudioError(f"audio too short: {seconds:.3f} s < minimum {min_seconds} s")
    if max_seconds is not None and seconds > max_seconds:
        raise AudioError(f"audio too long: {seconds:.1f} s > maximum {max_seconds} s")
    return to_mono_resampled(data, sr, target_sr)
