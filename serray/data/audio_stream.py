"""A recording of any length, decoded block by block at bounded memory (``serray predict --segments``,
``POST /segments``).

:func:`open_stream` opens a file path or a readable file object (an HTTP body as it arrives) with the
same checks as :func:`serray.data.audio.load_audio` (the container allowlist from the first bytes, a
data chunk declaring more than the file holds, rate and channel limits from the header), and
:meth:`AudioStream.blocks` yields mono float32 blocks at the model's rate, each checked for NaN / inf /
out-of-range samples as it is decoded. Resampling is block by block with enough context on both sides
that the output equals resampling the whole file (:class:`StreamResampler`), so memory follows the block
size, never the recording's length.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import soundfile as sf

from serray.data.audio import (ALLOWED_FORMATS, MAX_CHANNELS, MAX_SAMPLE_RATE, MAX_SINC_KERNEL_TAPS, MIN_SAMPLE_RATE,
                               AudioTooLong, _UNKNOWN_LENGTH, _Patched, _check_header, check_subtype,
                               _open, _sinc_kernel_taps, check_container, checked_mono, sniff_format, polyphase_ratio, read_block, resample)
from serray.errors import AudioError

#: Seconds of audio decoded per block (at the file's own rate): 2 s of 48 kHz stereo float32 is 0.8 MB.
BLOCK_SECONDS = 2.0
#: Bytes read to check the container before libsndfile sees the stream (as ``load_audio`` does).
HEAD_BYTES = 65536


class StreamResampler:
    """Resample a stream block by block; the concatenated output equals :func:`resample` on the whole.

    Input is cut at multiples of the reduced ratio's input term (so each cut maps to a whole output
    index) and each piece is resampled with ``context`` input samples on both sides, which covers the
    filter's support (torchaudio's sinc kernel, or the polyphase filter of an unusual rate); only the
    outputs of the piece itself are kept. Memory: one block plus twice the context.
    """

    def __init__(self, sr: int, target_sr: int):
        self.sr, self.target_sr = int(sr), int(target_sr)
        self.identity = self.sr == self.target_sr
        if self.identity:
            return
        if _sinc_kernel_taps(self.sr, self.target_sr) <= MAX_SINC_KERNEL_TAPS:
            g = math.gcd(self.sr, self.target_sr)
            self.orig, self.new = self.sr // g, self.target_sr // g
            width = math.ceil(6 * self.orig / (0.99 * min(self.orig, self.new)))
        else:  # the polyphase path of serray.data.audio.resample: up/down, 10 zero crossings each side
            self.new, self.orig = polyphase_ratio(self.sr, self.target_sr)
            width = math.ceil(10 * max(self.new, self.orig) / self.new) + 1
        need = 2 * width + 2 * self.orig + 64
        self.context = self.orig * math.ceil(need / self.orig)
        self._buf = np.zeros(0, np.float32)
        self._buf_start = 0  # absolute input index of _buf[0]
        self._done = 0  # absolute input index up to which output was produced (a multiple of orig)

    def _out(self, i: int) -> int:
        return i * self.new // self.orig  # exact at multiples of orig

    def _piece(self, end: int, final: bool) -> np.ndarray:
        lo = max(0, self._done - self.context)
        hi = len(self._buf) + self._buf_start if final else end + self.context
        chunk = self._buf[lo - self._buf_start: hi - self._buf_start]
        y = resample(np.ascontiguousarray(chunk), self.sr, self.target_sr)
        first = self._out(self._done - lo)
        last = len(y) if final else self._out(end - lo)
        self._done = end
        keep = max(0, self._done - self.context)  # drop input no later piece needs
        self._buf, self._buf_start = self._buf[keep - self._buf_start:], keep
        return y[first:last]

    def push(self, x: np.ndarray) -> np.ndarray:
        if self.identity:
            return x
        self._buf = np.concatenate([self._buf, x]) if len(self._buf) else x
        avail = self._buf_start + len(self._buf)
        end = ((avail - self.context) // self.orig) * self.orig
        if end <= self._done:
            return np.zeros(0, np.float32)
        return self._piece(end, final=False)

    def finish(self) -> np.ndarray:
        if self.identity:
            return np.zeros(0, np.float32)
        end = self._buf_start + len(self._buf)
        if end <= self._done:
            return np.zeros(0, np.float32)
        return self._piece(end, final=True)


class AudioStream:
    """An open recording: ``sample_rate``, ``channels``, ``frames`` (the header's count) and
    :meth:`blocks`. Use as a context manager (closes the decoder)."""

    def __init__(self, f: sf.SoundFile, what: str, target_sr: int, max_seconds: Optional[float] = None):
        self.f, self.what, self.target_sr = f, what, int(target_sr)
        self.sample_rate, self.channels, self.frames = int(f.samplerate), int(f.channels), int(f.frames)
        self.decoded = 0  # frames decoded so far (at the file's rate)
        self.max_seconds = max_seconds  # more decoded audio is an AudioTooLong, whatever the header said

    def __enter__(self) -> "AudioStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.f.close()

    def blocks(self, block_seconds: float = BLOCK_SECONDS) -> Iterator[np.ndarray]:
        """Mono float32 blocks at ``target_sr`` (the last ones may be short or empty-free)."""
        want = max(1, int(block_seconds * self.sample_rate))
        rs = StreamResampler(self.sample_rate, self.target_sr)
        while True:
            block = read_block(self.f, self.what, want)
            if len(block) == 0:
                break
            self.decoded += len(block)
            if self.max_seconds is not None and self.decoded > self.max_seconds * self.sample_rate:
                raise AudioTooLong(f"audio too long: more than {self.max_seconds:g} s decoded "
                                   f"(maximum {self.max_seconds:g} s)")
            out = rs.push(checked_mono(block))
            if len(out):
                yield out
            if len(block) < want:
                break
        tail = rs.finish()
        if len(tail):
            yield tail


def open_stream(source: Union[str, Path, BinaryIO], target_sr: int, *,
                total: Union[int, Callable[[], int], None] = None,
                what: Optional[str] = None, max_channels: int = MAX_CHANNELS, min_sample_rate: int = MIN_SAMPLE_RATE,
                max_sample_rate: int = MAX_SAMPLE_RATE, max_seconds: Optional[float] = None,
                subtypes: Optional[Sequence[str]] = None) -> AudioStream:
    """Open a recording for block-wise decoding (raises AudioError naming the problem).

    ``source``: a path (checked as ``load_audio`` checks it), or a readable, seekable file object whose
    length is ``total`` bytes (e.g. an upload being spooled: reads wait for the bytes to arrive), or a
    callable giving that length (called after the container check, so an unknown length waits for
    the body only once its first bytes were found to be WAV / FLAC).
    ``max_seconds``: longer audio is an :class:`AudioTooLong`, from the header's length before a sample
    is decoded, else as soon as the decoded audio exceeds it. ``subtypes``: sample encodings accepted.
    """
    if isinstance(source, (str, Path)):
        f, name = _open(source)
    else:
        name = what or "the audio stream"
        head = bytearray()
        while len(head) < HEAD_BYTES:
            got = source.read(HEAD_BYTES - len(head))
            if not got:
                break
            head += got
        if not head:
            raise AudioError(f"empty audio: {name} has no bytes")
        sniffed = sniff_format(bytes(head))
        if sniffed not in ALLOWED_FORMATS:  # refused from its first bytes, before its length is known
            raise AudioError(f"cannot decode {name}: unsupported audio format: {sniffed} "
                             f"(accepted: {', '.join(ALLOWED_FORMATS)})")
        if callable(total):
            total = total()
        try:
            _, patch = check_container(bytes(head), total if total is not None else len(head))
        except AudioError as e:
            raise AudioError(f"cannot decode {name}: {e}") from None
        source.seek(0)
        handle = source if patch is None else _Patched(source, patch)
        try:
            f = sf.SoundFile(handle)
        except (sf.LibsndfileError, RuntimeError, ValueError, TypeError, OSError) as e:
            raise AudioError(f"cannot decode {name} as {'/'.join(ALLOWED_FORMATS)}: {e}") from None
    try:
        _check_header(int(f.samplerate), int(f.channels), int(f.frames), None, max_channels, min_sample_rate,
                      max_sample_rate)
        check_subtype(str(f.subtype), subtypes)
        if max_seconds is not None and int(f.frames) != _UNKNOWN_LENGTH and int(f.frames) > max_seconds * int(f.samplerate):
            raise AudioTooLong(f"audio too long: its header declares {int(f.frames) / int(f.samplerate):.1f} s "
                               f"> maximum {max_seconds:g} s")
    except AudioError:
        f.close()
        raise
    return AudioStream(f, name, target_sr, max_seconds)
