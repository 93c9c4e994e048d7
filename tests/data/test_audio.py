"""Tests for serray.data.audio.load_audio: formats, resampling, and every way audio can be unusable."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from serray.data.audio import load_audio, to_mono_resampled
from serray.errors import AudioError

SR = 16000


def tone(seconds: float = 1.0, sr: int = SR, freq: float = 220.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def wav_bytes(data: np.ndarray, sr: int = SR, subtype: str = "PCM_16", fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, data, sr, subtype=subtype, format=fmt)
    return buf.getvalue()


def write(tmp_path, name: str, data: np.ndarray, sr: int = SR, subtype: str = "PCM_16", fmt: str = "WAV"):
    p = tmp_path / name
    sf.write(str(p), data, sr, subtype=subtype, format=fmt)
    return p


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize("subtype, atol", [
    ("PCM_16", 1 / 32768 + 1e-6),
    ("PCM_U8", 1 / 128 + 1e-6),
    ("PCM_32", 1e-6),
    ("FLOAT", 0.0),
])
def test_wav_subtypes_same_rate(tmp_path, subtype, atol):
    x = tone(1.0)
    p = write(tmp_path, f"{subtype}.wav", x, subtype=subtype)
    assert sf.info(str(p)).subtype == subtype
    y = load_audio(p)
    assert y.dtype == np.float32 and y.ndim == 1
    assert len(y) == len(x)
    np.testing.assert_allclose(y, x, atol=atol, rtol=0)


def test_str_path_accepted(tmp_path):
    x = tone(0.5)
    p = write(tmp_path, "a.wav", x)
    np.testing.assert_allclose(load_audio(str(p)), x, atol=1e-4)


def test_flac(tmp_path):
    x = tone(1.0)
    p = write(tmp_path, "a.flac", x, subtype="PCM_16", fmt="FLAC")
    y = load_audio(p)
    assert len(y) == len(x)
    np.testing.assert_allclose(y, x, atol=1 / 32768 + 1e-6)


def test_stereo_is_mixed_down(tmp_path):
    left, right = tone(1.0, freq=220), tone(1.0, freq=330, amp=0.25)
    p = write(tmp_path, "st.wav", np.stack([left, right], axis=1), subtype="FLOAT")
    assert sf.info(str(p)).channels == 2
    y = load_audio(p)
    assert y.ndim == 1 and len(y) == len(left)
    np.testing.assert_allclose(y, (left + right) / 2, atol=1e-6)


@pytest.mark.parametrize("sr", [8000, 44100, 22050, 48000])
def test_resampled_to_16k(tmp_path, sr):
    seconds = 1.3
    x = tone(seconds, sr=sr, freq=300)
    p = write(tmp_path, f"{sr}.wav", x, sr=sr)
    y = load_audio(p)
    expected = len(x) * SR / sr
    assert abs(len(y) - expected) <= 1, (len(y), expected)
    # a 300 Hz tone stays a 300 Hz tone of about the same level
    spec = np.abs(np.fft.rfft(y))
    peak_hz = np.argmax(spec) * SR / len(y)
    assert abs(peak_hz - 300) < 5
    assert np.sqrt(np.mean(y[1000:-1000] ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.05)


def test_stereo_44k1(tmp_path):
    x = tone(1.0, sr=44100)
    p = write(tmp_path, "st44.wav", np.stack([x, x], axis=1), sr=44100)
    y = load_audio(p)
    assert y.ndim == 1 and abs(len(y) - len(x) * SR / 44100) <= 1


def test_target_rate_parameter(tmp_path):
    x = tone(1.0)
    y = load_audio(write(tmp_path, "a.wav", x), target_sr=8000)
    assert abs(len(y) - 8000) <= 1


def test_bytes_input():
    x = tone(0.7)
    y = load_audio(wav_bytes(x))
    np.testing.assert_allclose(y, x, atol=1 / 32768 + 1e-6)
    y2 = load_audio(bytearray(wav_bytes(x, fmt="FLAC")))
    np.testing.assert_allclose(y2, x, atol=1 / 32768 + 1e-6)
    y3 = load_audio(wav_bytes(x, sr=8000))
    assert abs(len(y3) - 2 * len(x)) <= 1


def test_to_mono_resampled_1d_and_2d():
    x = tone(0.5)
    np.testing.assert_array_equal(to_mono_resampled(x, SR, SR), x)
    np.testing.assert_array_equal(to_mono_resampled(x[:, None], SR, SR), x)


def test_synthetic_corpus_file_loads(synthetic_root):
    wav = next(synthetic_root.glob("Session1/sentences/wav/*/Ses*.wav"))
    y = load_audio(wav)
    assert len(y) == sf.info(str(wav)).frames
    assert np.isfinite(y).all() and np.abs(y).max() <= 1.0


# ---------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    p = tmp_path / "nope.wav"
    with pytest.raises(AudioError) as e:
        load_audio(p)
    assert "not found" in str(e.value) and str(p) in str(e.value)


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(AudioError, match="not found"):
        load_audio(tmp_path)


def test_empty_bytes():
    with pytest.raises(AudioError, match="empty"):
        load_audio(b"")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.wav"
    p.write_bytes(b"")
    with pytest.raises(AudioError) as e:
        load_audio(p)
    assert str(p) in str(e.value)


def test_non_audio_bytes(tmp_path):
    junk = b"this is definitely not a RIFF file\n" * 20
    with pytest.raises(AudioError, match="cannot decode audio bytes"):
        load_audio(junk)
    p = tmp_path / "junk.wav"
    p.write_bytes(junk)
    with pytest.raises(AudioError) as e:
        load_audio(p)
    assert "cannot decode" in str(e.value) and str(p) in str(e.value)


def test_appledouble_file_is_not_audio(synthetic_root):
    junk = next(synthetic_root.glob("Session1/sentences/wav/*/._*.wav"))
    with pytest.raises(AudioError, match="cannot decode"):
        load_audio(junk)


def test_wav_with_no_samples():
    with pytest.raises(AudioError, match="truncated|no samples"):
        load_audio(wav_bytes(np.zeros(0, np.float32)))


def test_truncated_header():
    full = wav_bytes(tone(1.0))
    with pytest.raises(AudioError, match="cannot decode"):
        load_audio(full[:20])  # cut inside the fmt chunk


def test_truncated_header_only():
    """Header intact, data chunk cut to nothing: soundfile reads 0 frames -> 'no samples'."""
    full = wav_bytes(tone(1.0))
    assert full[36:40] == b"data"
    with pytest.raises(AudioError, match="truncated|no samples"):
        load_audio(full[:44])


@pytest.mark.parametrize("keep_fraction", [0.5, 0.1])
def test_truncated_in_the_middle_is_refused(keep_fraction, tmp_path):
    """libsndfile would return the samples present; serray refuses a clip cut short (bytes and files),
    so offline prediction and the HTTP endpoint agree."""
    full = wav_bytes(tone(1.0))
    cut = full[: 44 + int(keep_fraction * (len(full) - 44))]
    with pytest.raises(AudioError, match="truncated WAV: its data chunk declares 32000 bytes"):
        load_audio(cut)
    p = tmp_path / "cut.wav"
    p.write_bytes(cut)
    with pytest.raises(AudioError, match="truncated WAV"):
        load_audio(p)


def test_streamed_wav_with_unknown_data_size_is_accepted():
    """Writers that stream without seeking back leave the data size 0 or 0xFFFFFFFF: not truncation."""
    x = tone(0.5)
    full = bytearray(wav_bytes(x))
    full[40:44] = b"\xff\xff\xff\xff"
    y = load_audio(bytes(full))
    assert len(y) == len(x)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples(tmp_path, bad):
    x = tone(0.5)
    x[100] = bad
    p = write(tmp_path, "nan.wav", x, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN or infinite"):
        load_audio(p)


def test_too_short():
    x = tone(0.05)
    with pytest.raises(AudioError) as e:
        load_audio(wav_bytes(x), min_seconds=0.1)
    assert "too short" in str(e.value) and "0.050" in str(e.value)
    assert len(load_audio(wav_bytes(x), min_seconds=0.05)) == len(x)  # the boundary is allowed


def test_too_long():
    x = tone(2.0)
    with pytest.raises(AudioError) as e:
        load_audio(wav_bytes(x), max_seconds=1.5)
    assert "too long" in str(e.value) and "1.5" in str(e.value)
    assert len(load_audio(wav_bytes(x), max_seconds=2.0)) == len(x)


def test_length_limits_use_source_rate():
    """Limits are in seconds of the source, whatever its sample rate."""
    x = tone(0.5, sr=8000)
    with pytest.raises(AudioError, match="too short"):
        load_audio(wav_bytes(x, sr=8000), min_seconds=0.6)
    with pytest.raises(AudioError, match="too long"):
        load_audio(wav_bytes(x, sr=8000), max_seconds=0.4)


# ---------------------------------------------------------------- bounded work (header limits, decoding, resampling)


from serray.data.audio import (MAX_ABS_SAMPLE, MAX_CHANNELS, MAX_SAMPLE_RATE, MIN_SAMPLE_RATE,  # noqa: E402
                               audio_header, polyphase_ratio, resample)


def _peak_mb(fn):
    """(result, peak MB of Python/numpy allocations, seconds) of fn()."""
    import time
    import tracemalloc

    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        out = fn()
    finally:
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return out, peak, seconds


def _lying_flac(frames: int = (1 << 36) - 1) -> bytes:
    """A valid 1 s stereo FLAC whose STREAMINFO claims ``frames`` samples (36-bit field)."""
    data = bytearray(wav_bytes(np.stack([tone(1.0), tone(1.0)], axis=1), fmt="FLAC"))
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO first
    data[21] = (data[21] & 0xF0) | ((frames >> 32) & 0x0F)
    data[22:26] = (frames & 0xFFFFFFFF).to_bytes(4, "big")
    return bytes(data)


@pytest.mark.parametrize("sr, ok", [(MIN_SAMPLE_RATE - 1, False), (MIN_SAMPLE_RATE, True), (4001, True),
                                    (MAX_SAMPLE_RATE, True), (MAX_SAMPLE_RATE + 1, False)])
def test_sample_rate_limits(sr, ok):
    data = wav_bytes(tone(0.3, sr=sr, freq=300), sr=sr)
    if ok:
        y = load_audio(data)
        assert abs(len(y) - 0.3 * SR) <= 1
    else:
        with pytest.raises(AudioError, match=f"unsupported sample rate {sr} Hz"):
            load_audio(data)
    assert len(load_audio(data, min_sample_rate=sr, max_sample_rate=sr)) > 0  # limits are parameters


@pytest.mark.parametrize("channels, ok", [(MAX_CHANNELS, True), (MAX_CHANNELS + 1, False)])
def test_channel_limit(channels, ok):
    data = wav_bytes(np.stack([tone(0.3)] * channels, axis=1), subtype="PCM_16")
    if ok:
        np.testing.assert_allclose(load_audio(data), tone(0.3), atol=1e-4)
    else:
        with pytest.raises(AudioError, match=f"channel count {channels}"):
            load_audio(data)


def test_unusual_rate_is_resampled_correctly_at_bounded_cost():
    """4001 Hz (coprime with 16 kHz): torchaudio's kernel would be 16000 x 4015 taps (~1 GB, seconds of
    CPU); the polyphase path keeps the tone, the level and the length, in under 50 MB."""
    sr = 4001
    x = tone(0.5, sr=sr, freq=300)
    y, peak_mb, seconds = _peak_mb(lambda: load_audio(wav_bytes(x, sr=sr, subtype="FLOAT")))
    assert len(y) == int(np.ceil(len(x) * SR / sr))
    assert peak_mb < 50, peak_mb  # memory, not time, is the bound asserted (time depends on the machine's load)
    spec = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spec) * SR / len(y) - 300) < 5
    assert np.sqrt(np.mean(y[800:-800] ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.05)


def test_polyphase_ratio_is_exact_or_within_25_ppm():
    for sr in (4001, 7919, 12345, 15999, 80002, 100003, 191999):
        up, down = polyphase_ratio(sr, SR)
        assert max(up, down) <= 20000
        assert abs(up / down * sr / SR - 1) <= 25.0001e-6, sr
    assert polyphase_ratio(4001, SR) == (16000, 4001)  # exact when the terms are small enough


def test_usual_rates_keep_torchaudio():
    import torch
    import torchaudio.functional as AF

    x = tone(0.5, sr=44100)
    np.testing.assert_array_equal(resample(x, 44100, SR), AF.resample(torch.from_numpy(x), 44100, SR).numpy())


def test_header_longer_than_max_seconds_is_refused_before_decoding(tmp_path):
    """A silent 8-channel FLAC of 2 minutes is ~50 KB and would decode to 123 MB of float32 (30 min at
    48 kHz: 715 KB -> 2.8 GB, measured before the header check existed)."""
    p = tmp_path / "silent8.flac"
    with sf.SoundFile(str(p), "w", 16000, 8, format="FLAC", subtype="PCM_16") as f:
        f.write(np.zeros((16000 * 120, 8), np.float32))
    assert p.stat().st_size < 100_000
    assert audio_header(p) == (16000, 8, 16000 * 120)
    out, peak_mb, seconds = _peak_mb(lambda: _raises(lambda: load_audio(p, max_seconds=30)))
    assert isinstance(out, AudioError) and "header declares 120.0 s > maximum 30" in str(out)
    assert peak_mb < 5, peak_mb  # nothing decoded


def _raises(fn):
    try:
        fn()
    except AudioError as e:
        return e
    return None


def test_no_max_seconds_still_decodes_the_real_data_only(tmp_path):
    """Without a limit, memory follows the samples really present (mono, in blocks), not channels x frames."""
    p = tmp_path / "silent8.flac"
    with sf.SoundFile(str(p), "w", 16000, 8, format="FLAC", subtype="PCM_16") as f:
        f.write(np.zeros((16000 * 60, 8), np.float32))
    y, peak_mb, _ = _peak_mb(lambda: load_audio(p))
    assert len(y) == 16000 * 60
    assert peak_mb < 20, peak_mb  # 60 s mono float32 = 3.7 MB (+ one block); all 8 channels would be 30 MB


def test_flac_header_lying_about_its_length():
    """STREAMINFO claims 2^36 frames (a 512 GiB allocation for a plain sf.read): a clear error either way."""
    data = _lying_flac()
    with pytest.raises(AudioError, match="header declares"):
        load_audio(data, max_seconds=30)
    err, peak_mb, _ = _peak_mb(lambda: _raises(lambda: load_audio(data)))  # no limit: decodes what is there
    assert peak_mb < 50, peak_mb
    if err is not None:
        assert "cannot decode" in str(err) or "memory" in str(err)


def test_max_seconds_counts_decoded_frames_too():
    """A header may understate; decoding stops one frame past the limit."""
    x = tone(2.0)
    full = bytearray(wav_bytes(x))
    full[40:44] = b"\xff\xff\xff\xff"  # unknown data size: libsndfile counts from the file length
    with pytest.raises(AudioError, match="too long"):
        load_audio(bytes(full), max_seconds=1.0)
    assert len(load_audio(bytes(full), max_seconds=2.0)) == len(x)


@pytest.mark.parametrize("scale, ok", [(MAX_ABS_SAMPLE, True), (MAX_ABS_SAMPLE * 1.01, False), (1e15, False)])
def test_sample_magnitude_limit(tmp_path, scale, ok):
    """Finite but huge float samples (x1e15) overflow the encoder to NaN: refused before any work."""
    x = tone(0.5) / 0.5 * scale  # peak exactly `scale`
    p = write(tmp_path, "big.wav", x.astype(np.float32), subtype="FLOAT")
    if ok:
        assert np.isfinite(load_audio(p)).all()
    else:
        with pytest.raises(AudioError, match="out of range"):
            load_audio(p)
