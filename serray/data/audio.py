"""Audio I/O shared by featurization, offline prediction and serving.

soundfile reads the containers of :data:`ALLOWED_FORMATS` (WAV incl. WAVE_FORMAT_EXTENSIBLE, RF64,
W64, FLAC; any sub-type), recognised from the file's first bytes before libsndfile sees them: any
other of libsndfile's ~25 formats is refused by name. torchaudio (usual rates) or a polyphase filter
(unusual rates) resamples. Every way audio can be unusable becomes an :class:`~serray.errors.AudioError`
naming the problem, and the work spent on any input is bounded by its header's rate, channel count
and the caller's ``max_seconds`` before a sample is decoded, and does not depend on the samples'
values (denormal samples are flushed to zero as they are decoded).
"""

from __future__ import annotations

import io
import math
import struct
from fractions import Fraction
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import soundfile as sf

from serray.errors import AudioError

AudioSource = Union[str, Path, bytes]


#: Containers decoded. Truncation is detected for every one of them (WAV / RF64 / W64 by their data
#: chunk's declared size, FLAC by its decoder).
ALLOWED_FORMATS = ("WAV", "RF64", "W64", "FLAC")
_W64_RIFF = b"riff\x2e\x91\xcf\x11\xa5\xd6\x28\xdb\x04\xc1\x00\x00"
_W64_WAVE = b"wave\xf3\xac\xd3\x11\x8c\xd1\x00\xc0\x4f\x8e\xdb\x8a"
_W64_DATA = b"data\xf3\xac\xd3\x11\x8c\xd1\x00\xc0\x4f\x8e\xdb\x8a"
_STREAMED = (0, 0xFFFFFFFF)  # a 32-bit data size that a streaming writer could not fill in


def sniff_format(head: bytes) -> str:
    """The container of an audio file from its first bytes: one of :data:`ALLOWED_FORMATS`, or the
    name of another format (to say what was sent), or ``unknown``."""
    if len(head) >= 12 and head[:4] in (b"RIFF", b"RIFX") and head[8:12] == b"WAVE":
        return "WAV"
    if len(head) >= 12 and head[:4] in (b"RF64", b"BW64") and head[8:12] == b"WAVE":
        return "RF64"
    if head[:16] == _W64_RIFF and head[24:40] == _W64_WAVE:
        return "W64"
    if head[:4] == b"fLaC":
        return "FLAC"
    others = [(b"OggS", "Ogg (Vorbis / Opus / FLAC-in-Ogg)"), (b"ID3", "MP3"), (b"caff", "CAF"),
              (b"NIST_1A", "NIST SPHERE"), (b"Creative Voice File", "VOC"), (b".snd", "AU"), (b"wvpk", "WavPack"),
              (b"MThd", "MIDI"), (b"\x1aE\xdf\xa3", "Matroska / WebM"), (b"#!AMR", "AMR")]
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "AIFF"
    if len(head) >= 12 and head[4:8] == b"ftyp":
        return "MP4 / M4A"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        return "MPEG audio (MP3 / AAC)"
    return next((name for magic, name in others if head.startswith(magic)), "unknown")


def check_container(head: bytes, total: int) -> Tuple[str, Optional[Tuple[int, bytes]]]:
    """Check what a file is before it is decoded: ``(format, patch)``.

    Raises AudioError for a format outside :data:`ALLOWED_FORMATS`, and for a WAV / RF64 / W64 whose
    ``data`` chunk declares more bytes than the file holds (an upload or a copy cut short: libsndfile
    would decode the shorter audio it finds). ``patch`` is ``(offset, bytes)`` to apply to the header
    of a *streamed* WAV (a data size of 0 that a streaming writer could not fill in): it marks the
    length unknown, so the audio present is decoded (up to the caller's limit) instead of nothing.

    ``head`` is the start of the file (at least up to the data chunk header), ``total`` its length.
    """
    fmt = sniff_format(head)
    if fmt not in ALLOWED_FORMATS:
        raise AudioError(f"unsupported audio format: {fmt} (accepted: {', '.join(ALLOWED_FORMATS)})")
    if len(head) < 12 and fmt != "FLAC":
        raise AudioError(f"not a complete {fmt} header ({len(head)} bytes)")
    if fmt == "W64":
        pos = 40
        while pos + 24 <= len(head):
            guid, size = head[pos:pos + 16], struct.unpack("<Q", head[pos + 16:pos + 24])[0]
            if guid == _W64_DATA:
                _check_size("W64", size - 24, total - pos - 24)
                return fmt, None
            if size < 24:
                raise AudioError(f"malformed W64: a chunk declares {size} bytes")
            pos += size + (-size % 8)
        return fmt, None
    if fmt == "FLAC":
        return fmt, None
    order = ">" if head[:4] == b"RIFX" else "<"
    pos, ds64 = 12, None
    while pos + 8 <= len(head):
        chunk, size = head[pos:pos + 4], struct.unpack(order + "I", head[pos + 4:pos + 8])[0]
        if chunk == b"ds64" and size >= 24 and pos + 32 <= len(head):
            ds64 = struct.unpack("<Q", head[pos + 16:pos + 24])[0]  # riff size (8), then the data size (8)
        if chunk == b"data":
            present = total - pos - 8
            declared = ds64 if fmt == "RF64" and ds64 is not None and size == 0xFFFFFFFF else size
            if fmt == "WAV" and size in _STREAMED:
                return fmt, ((pos + 4, struct.pack(order + "I", 0xFFFFFFFF)) if size == 0 and present > 0 else None)
            _check_size(fmt, declared, present)
            return fmt, None
        pos += 8 + size + (size & 1)
    return fmt, None


def _check_size(fmt: str, declared: int, present: int) -> None:
    if declared > present:
        raise AudioError(f"truncated {fmt}: its data chunk declares {declared} bytes but only {present} are present")


class _Patched(io.RawIOBase):
    """A read-only file that serves ``path`` with a few header bytes replaced (a streamed WAV's
    unknown data size), without copying the file."""

    def __init__(self, path, patch: Tuple[int, bytes]):
        self._f = open(path, "rb") if isinstance(path, (str, Path)) else path  # a path, or a readable file object
        self._at, self._bytes = patch

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def readinto(self, b) -> int:
        start = self._f.tell()
        n = self._f.readinto(b)
        lo, hi = max(start, self._at), min(start + n, self._at + len(self._bytes))
        if lo < hi:
            b[lo - start:hi - start] = self._bytes[lo - self._at:hi - self._at]
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


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
_TINY = np.finfo(np.float32).tiny  # the smallest normal float32: below it, a sample is flushed to zero


#: Sample encodings served (``serve``: ``POST /predict``, ``POST /segments``): linear PCM and float, and
#: G.711 (u-law / A-law: a per-sample table, as cheap as PCM; telephone recordings use it). Codecs inside
#: a WAV (GSM 6.10, IMA / MS ADPCM, G.721 / G.723, ...) are refused: their decoders are not what a
#: server should run on a stranger's bytes, and none of them is a format speech corpora ship.
SERVED_SUBTYPES = ("PCM_S8", "PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE", "ULAW", "ALAW")


class AudioTooLong(AudioError):
    """Audio longer than a caller's limit (the server answers it with 413, not 400)."""


def check_subtype(subtype: str, allowed: Optional[Sequence[str]]) -> None:
    """Refuse a sample encoding outside ``allowed`` (None: any that libsndfile decodes)."""
    if allowed is not None and subtype not in allowed:
        raise AudioError(f"unsupported sample encoding {subtype}: accepted are linear PCM, float and G.711 "
                         f"({', '.join(allowed)})")


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
    try:
        if isinstance(source, (bytes, bytearray)):
            if len(source) == 0:
                raise AudioError("empty audio: no bytes")
            _, patch = check_container(bytes(source[:65536]), len(source))
            if patch is not None:
                source = bytearray(source)
                source[patch[0]:patch[0] + len(patch[1])] = patch[1]
            handle = io.BytesIO(source)
        else:
            if not Path(source).is_file():
                raise AudioError(f"audio file not found: {source}")
            with open(source, "rb") as f:
                head = f.read(65536)
            if not head:
                raise AudioError(f"empty audio: {what} has no bytes")
            _, patch = check_container(head, Path(source).stat().st_size)
            handle = str(source) if patch is None else _Patched(str(source), patch)
    except OSError as e:  # the file exists but cannot be read (permissions, an I/O error of the disk or mount)
        raise AudioError(f"cannot read {what}: {e.strerror or e}") from None
    except AudioError as e:
        if str(e).startswith(("unsupported audio format", "not a complete")):
            raise AudioError(f"cannot decode {what}: {e}") from None
        raise
    try:
        return sf.SoundFile(handle), what
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError, OSError) as e:
        raise AudioError(f"cannot decode {what} as {'/'.join(ALLOWED_FORMATS)}: {e}") from None


def checked_mono(block: np.ndarray) -> np.ndarray:
    """A decoded ``[frames, channels]`` float32 block -> mono float32, refusing NaN/inf and out-of-range
    samples (AudioError) and flushing denormals to zero."""
    if not np.isfinite(block).all():
        raise AudioError("audio holds NaN or infinite samples")
    peak = float(np.abs(block).max())
    if peak > MAX_ABS_SAMPLE:
        raise AudioError(f"audio sample magnitude {peak:.3g} is out of range (accepted: |sample| <= "
                         f"{MAX_ABS_SAMPLE:g}; float WAV/FLAC samples are nominally within [-1, 1])")
    mono = block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else block[:, 0].copy()
    mono[np.abs(mono) < _TINY] = 0.0  # denormals: arithmetic on them (resampling) is 10-100x slower
    return mono


def read_block(f: sf.SoundFile, what: str, frames: int) -> np.ndarray:
    """Up to ``frames`` frames ``[frames, channels]`` float32; a decoder or I/O error is an AudioError."""
    try:
        return f.read(frames, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError) as e:
        raise AudioError(f"cannot decode {what} as {'/'.join(ALLOWED_FORMATS)}: {e}") from None
    except OSError as e:
        raise AudioError(f"cannot read {what}: {e.strerror or e}") from None


def _read_mono(f: sf.SoundFile, what: str, max_frames: Optional[int]) -> np.ndarray:
    """Decode block by block, at most ``max_frames + 1`` frames, checking and mixing down each block.

    Raises on NaN/inf or out-of-range samples in the block where they occur; a decoder error (a
    corrupt or cut stream, a header promising more than the file holds) is an AudioError.
    """
    blocks, total = [], 0
    limit = None if max_frames is None else max_frames + 1  # one more frame tells "too long"
    while limit is None or total < limit:
        want = READ_BLOCK_FRAMES if limit is None else min(READ_BLOCK_FRAMES, limit - total)
        block = read_block(f, what, want)
        if len(block) == 0:
            break
        blocks.append(checked_mono(block))
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
        import torch  # here, not at import: decoding alone (``serray predict --onnx``) needs no torch
        import torchaudio.functional as AF

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
               min_sample_rate: int = MIN_SAMPLE_RATE, max_sample_rate: int = MAX_SAMPLE_RATE,
               subtypes: Optional[Sequence[str]] = None) -> np.ndarray:
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
        subtypes: sample encodings accepted (None: any; the server passes :data:`SERVED_SUBTYPES`).

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
            check_subtype(str(f.subtype), subtypes)
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
