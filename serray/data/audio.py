"""Audio I/O shared by featurization, offline prediction and serving.

soundfile reads (WAV/FLAC, any sub-type); torchaudio (usual rates) or a polyphase filter (unusual
rates) resamples. Every way audio can be unusable becomes an :class:`~serray.errors.AudioError`
naming the problem, and the work spent on any input is bounded by its header's rate, channel count
and the caller's ``max_seconds`` before a sample is decoded.
"""

from __future__ import annotations

import io
import math
import struct
from fractions import Fraction
from pathlib import Path
from typing import Optional, Tuple, Union

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


#: Sample rates accepted (Hz). Below 4 kHz there is no speech band left to classify; above 192 kHz
#: nothing records speech. Every accepted rate is resampled at bounded cost (see :func:`resample`).
MIN_SAMPLE_RATE = 4000
MAX_SAMPLE_RATE = 192000
#: Channels accepted (FLAC's own maximum); more is a 400 before any sample is decoded.
MAX_CHANNELS = 8
#: Largest |sample| accepted. Float WAVs hold [-1, 1] (integer-scaled ones up to 32768); the fbank
#: encoder overflows float32 from about 1e15, so anything beyond 1e6 (120 dB over full scale) is refused.
MAX_ABS_SAMPLE = 1e6
#: torchaudio's windowed-sinc resampler builds a kernel of ``new x (orig + 2 width)`` taps for the
#: reduced ratio new/orig; it is used while that stays below this many taps (every usual rate: 8, 11.025,
#: 22.05, 44.1, 48, 96 kHz ...). An unusual rate (e.g. 4001 Hz: 16000 x 4015 taps, ~1 GB and seconds of
#: CPU) goes through a polyphase FIR instead (scipy's ``resample_poly``), whose filter has
#: ``20 x max(up, down)`` taps for the reduced ratio up/down ...
MAX_SINC_KERNEL_TAPS = 4_000_000
#: ... with up and down at most this large: a ratio with larger terms (e.g. 16000/191999) is replaced by
#: the closest fraction within the bound: at most 25 ppm off for 4..192 kHz (80002 Hz, checked for every
#: integer rate), inside the tolerance of a recording clock (typically 50-100 ppm).
MAX_POLYPHASE_TERM = 20_000
#: Frames decoded per read: memory follows the samples really present, never a header's claim.
READ_BLOCK_FRAMES = 1 << 18
_UNKNOWN_LENGTH = (1 << 63) - 1  # libsndfile's frame count when the header does not give one


def _check_header(sr: int, channels: int, frames: int, max_seconds: Optional[float], max_channels: int,
                  min_sample_rate: int, max_sample_rate: int) -> None:
    """Refuse by the header alone: rate, channel count, declared length (nothing decoded yet)."""
    if not min_sample_rate <= sr <= max_sample_rate:
        raise AudioError(f"unsupported sample rate {sr} Hz: accepted are {min_sample_rate}..{max_sample_rate} Hz")
    if not 1 <= channels <= max_channels:
        raise AudioError(f"unsupported channel count {channels}: at most {max_channels} channels are accepted")
    if max_seconds is not None and frames != _UNKNOWN_LENGTH and frames > max_seconds * sr:
        raise AudioError(f"audio too long: its header declares {frames / sr:.1f} s > maximum {max_seconds} s")


def _open(source: AudioSource) -> tuple[sf.SoundFile, str]:
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
        handle = str(source)
    try:
        return sf.SoundFile(handle), what
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as e:
        raise AudioError(f"cannot decode {what} as WAV/FLAC: {e}") from None


def _read_mono(f: sf.SoundFile, what: str, max_frames: Optional[int]) -> np.ndarray:
    """Decode block by block, at most ``max_frames + 1`` frames, checking and mixing down each block.

    Raises on NaN/inf or out-of-range samples in the block where they occur; a decoder error (a
    corrupt or cut stream, a header promising more than the file holds) is an AudioError.
    """
    blocks, total = [], 0
    limit = None if max_frames is None else max_frames + 1  # one more frame tells "too long"
    while limit is None or total < limit:
        want = READ_BLOCK_FRAMES if limit is None else min(READ_BLOCK_FRAMES, limit - total)
        try:
            block = f.read(want, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, ValueError) as e:
            raise AudioError(f"cannot decode {what} as WAV/FLAC: {e}") from None
        if len(block) == 0:
            break
        if not np.isfinite(block).all():
            raise AudioError("audio holds NaN or infinite samples")
        peak = float(np.abs(block).max())
        if peak > MAX_ABS_SAMPLE:
            raise AudioError(f"audio sample magnitude {peak:.3g} is out of range (accepted: |sample| <= "
                             f"{MAX_ABS_SAMPLE:g}; float WAV/FLAC samples are nominally within [-1, 1])")
        blocks.append(block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else block[:, 0].copy())
        total += len(block)
        if len(block) < want:
            break
    if not blocks:
        return np.zeros(0, np.float32)
    return np.ascontiguousarray(np.concatenate(blocks) if len(blocks) > 1 else blocks[0], dtype=np.float32)


def _sinc_kernel_taps(sr: int, target_sr: int) -> int:
    g = math.gcd(sr, target_sr)
    orig, new = sr // g, target_sr // g
    width = math.ceil(6 * orig / (0.99 * min(orig, new)))  # torchaudio's default lowpass width and rolloff
    return new * (orig + 2 * width)


def polyphase_ratio(sr: int, target_sr: int) -> Tuple[int, int]:
    """``(up, down)`` for the polyphase path: target_sr/sr reduced, or the closest fraction whose terms
    stay within :data:`MAX_POLYPHASE_TERM` (rates within 4..192 kHz: at most 25 ppm off)."""
    ratio = Fraction(target_sr, sr)
    if max(ratio.numerator, ratio.denominator) > MAX_POLYPHASE_TERM:
        bound = MAX_POLYPHASE_TERM // max(1, math.ceil(ratio))
        ratio = ratio.limit_denominator(bound)
    return ratio.numerator, ratio.denominator


def resample(mono: np.ndarray, sr: int, target_sr: int) -> np.ndarray:
    """Mono float32 from ``sr`` to ``target_sr`` with bounded cost for any pair of rates.

    torchaudio's windowed sinc for the usual ratios (its kernel is small); otherwise a polyphase FIR
    (``scipy.signal.resample_poly``, Kaiser window, 10 zero crossings each side) whose filter size is
    bounded by :data:`MAX_POLYPHASE_TERM`. Time and memory are O(length) for every accepted rate; both
    keep the band below the lower Nyquist frequency.
    """
    if sr == target_sr or len(mono) == 0:
        return mono
    if _sinc_kernel_taps(sr, target_sr) <= MAX_SINC_KERNEL_TAPS:
        return AF.resample(torch.from_numpy(mono), sr, target_sr).numpy()
    from scipy.signal import resample_poly

    up, down = polyphase_ratio(sr, target_sr)
    return resample_poly(mono, up, down).astype(np.float32)


def to_mono_resampled(data: np.ndarray, sr: int, target_sr: int) -> np.ndarray:
    """[frames, channels] or [frames] float -> mono float32 at ``target_sr``."""
    mono = data.mean(axis=1) if data.ndim == 2 else data
    return resample(np.ascontiguousarray(mono, dtype=np.float32), sr, target_sr)


def audio_header(source: AudioSource) -> Tuple[int, int, int]:
    """``(sample rate, channels, frames)`` from the header alone (frames: libsndfile's count)."""
    f, _ = _open(source)
    with f:
        return int(f.samplerate), int(f.channels), int(f.frames)


def load_audio(source: AudioSource, target_sr: int = 16000, min_seconds: float = 0.0,
               max_seconds: float | None = None, *, max_channels: int = MAX_CHANNELS,
               min_sample_rate: int = MIN_SAMPLE_RATE, max_sample_rate: int = MAX_SAMPLE_RATE) -> np.ndarray:
    """Read audio, mix down to mono, resample to ``target_sr`` and check it.

    Work is bounded before decoding: the header's sample rate, channel count and declared length
    are checked first, then at most ``max_seconds`` (+1 frame) is decoded, in blocks (a header that
    lies about its length costs nothing), and resampling costs O(length) for every accepted rate.

    Args:
        source: a file path or the encoded bytes of a WAV/FLAC file.
        target_sr: output sample rate.
        min_seconds: shorter audio is an error.
        max_seconds: longer audio is an error (None: no limit; decoding still follows the real data).
        max_channels, min_sample_rate, max_sample_rate: header limits.

    Returns:
        float32 mono waveform in [-1, 1]-ish range.

    Raises:
        AudioError: missing, empty, undecodable, non-finite, out-of-range, too short or too long audio,
            an unsupported rate or too many channels.
    """
    f, what = _open(source)
    try:
        with f:
            sr, channels = int(f.samplerate), int(f.channels)
            _check_header(sr, channels, int(f.frames), max_seconds, max_channels, min_sample_rate, max_sample_rate)
            max_frames = None if max_seconds is None else int(math.floor(max_seconds * sr))
            mono = _read_mono(f, what, max_frames)
        n = len(mono)
        if n == 0:
            raise AudioError("empty audio: no samples")
        seconds = n / sr
        if seconds < min_seconds:
            raise AudioError(f"audio too short: {seconds:.3f} s < minimum {min_seconds} s")
        if max_frames is not None and n > max_frames:
            raise AudioError(f"audio too long: more than {max_seconds} s (maximum {max_seconds} s)")
        return resample(mono, sr, target_sr)
    except MemoryError:  # a last line of defence: whatever the file, a clear error
        raise AudioError(f"cannot decode {what}: it needs more memory than is available") from None
