"""The crafted inputs of the "nothing lost, nothing leaked" review, each with its answer and a time and
memory bound (fast tier, no Ray).

Decode: every format libsndfile knows but serray does not accept is refused by name from its first
bytes; truncated containers are refused alike; a streamed WAV is decoded; denormal samples cost what
ordinary ones do. Config: values that used to be accepted and then crashed are one-line errors when
the config loads. Secrets: URIs with credentials holding any character never reach a message, a saved
config or a log line. The bounds are generous (a loaded 2-core machine) and are what a
content-dependent cost would break: the denormal file took 3.1-3.3 s against 0.05 s before.
"""

from __future__ import annotations

import io
import struct
import time
import tracemalloc

import numpy as np
import pytest
import soundfile as sf

from serray.config import load_config
from serray.data.audio import load_audio
from serray.errors import AudioError, ConfigError


def _encoded(fmt: str, subtype: str = "PCM_16", seconds: float = 1.0, rate: int = 16000) -> bytes:
    x = (0.1 * np.sin(np.arange(int(seconds * rate)) / 10)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def _streamed() -> bytes:
    wav = _encoded("WAV")
    at = wav.find(b"data")
    return wav[:4] + struct.pack("<I", 0) + wav[8:at + 4] + struct.pack("<I", 0) + wav[at + 8:]


def _bounded(fn, seconds: float, mb: float):
    """``fn()``'s result (or exception) after checking its wall time and peak Python allocation."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        out, err = fn(), None
    except Exception as e:  # the answer under test
        out, err = None, e
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < seconds, f"took {elapsed:.2f} s (bound {seconds} s)"
    assert peak / 2**20 < mb, f"peak {peak / 2**20:.1f} MB (bound {mb} MB)"
    return out, err


REFUSED = [  # name, bytes, words of the error
    ("MP3 / MPEG frame", b"\xff\xfb\x90\x64" + bytes(4000), "unsupported audio format: MPEG audio"),
    ("ID3-tagged MP3", b"ID3\x04\x00" + bytes(4000), "unsupported audio format: MP3"),
    ("Ogg Vorbis", _encoded("OGG", "VORBIS"), "unsupported audio format: Ogg"),
    ("AIFF", _encoded("AIFF"), "unsupported audio format: AIFF"),
    ("CAF", _encoded("CAF"), "unsupported audio format: CAF"),
    ("NIST SPHERE", _encoded("NIST"), "unsupported audio format: NIST"),
    ("VOC", _encoded("VOC"), "unsupported audio format: VOC"),
    ("AU", _encoded("AU"), "unsupported audio format: AU"),
    ("truncated WAV", _encoded("WAV")[:20000], "truncated WAV"),
    ("truncated RF64", _encoded("RF64")[:20000], "truncated RF64"),
    ("truncated W64", _encoded("W64")[:20000], "truncated W64"),
    ("truncated FLAC", _encoded("FLAC")[:3000], "cannot decode"),
    ("empty", b"", "empty audio"),
    ("text", b"hello " * 1000, "unsupported audio format: unknown"),
]


@pytest.mark.parametrize("name, data, words", REFUSED, ids=[r[0] for r in REFUSED])
def test_a_format_outside_the_allowlist_or_a_cut_container_is_refused_cheaply(name, data, words):
    _, err = _bounded(lambda: load_audio(data, 16000, 0.1, 30), seconds=1.0, mb=20)
    assert isinstance(err, AudioError) and words in str(err), (name, err)


@pytest.mark.parametrize("fmt", ["WAV", "RF64", "W64", "FLAC"])
def test_every_allowed_container_decodes(fmt):
    out, err = _bounded(lambda: load_audio(_encoded(fmt), 16000, 0.1, 30), seconds=1.0, mb=20)
    assert err is None and len(out) == 16000


def test_a_streamed_wav_is_decoded_up_to_the_limit():
    out, err = _bounded(lambda: load_audio(_streamed(), 16000, 0.1, 30), seconds=1.0, mb=20)
    assert err is None and len(out) == 16000
    _, err = _bounded(lambda: load_audio(_streamed(), 16000, 0.1, 0.5), seconds=1.0, mb=20)
    assert isinstance(err, AudioError) and "too long" in str(err)


def test_denormal_samples_cost_what_ordinary_samples_cost():
    """A 10 MB float WAV at 97,860 Hz: denormal samples took 3.1-3.3 s to decode, ordinary ones 0.05 s."""
    n = 10_000_000 // 4
    files = {}
    for name, x in (("denormal", np.full(n, 1e-40, np.float32)),
                    ("ordinary", (0.1 * np.random.default_rng(0).standard_normal(n)).astype(np.float32))):
        buf = io.BytesIO()
        sf.write(buf, x, 97860, format="WAV", subtype="FLOAT")
        files[name] = buf.getvalue()
    times = {}
    for name, data in files.items():
        t0 = time.perf_counter()
        _, err = _bounded(lambda: load_audio(data, 16000, 0.1, 60), seconds=2.0, mb=120)
        times[name] = time.perf_counter() - t0
        assert err is None
    assert times["denormal"] < 5 * times["ordinary"] + 0.2, times


CONFIG = [  # override, words of the one-line error
    ("features.num_cpus=0", "features.num_cpus must be > 0"),
    ("serve.min_seconds=0", "serve.min_seconds must be >= 0.025"),
    ("tune.num_samples=-1", "tune.num_samples must be >= 1"),
    ("tune.reduction_factor=1", "tune.reduction_factor must be >= 2"),
    ("tune.grace_period=0", "tune.grace_period must be >= 1"),
    ("adapter.w_cluster=nan", "adapter.w_cluster must be >= 0"),
    ("adapter.kmeans_decay=2", "adapter.kmeans_decay must be in [0, 1)"),
    ("adapter.ema_decay_end=0.5", "adapter.ema_decay (0.996) must be <= adapter.ema_decay_end (0.5)"),
    ("pretrain.sessions=[7]", "pretrain.sessions: [7] not in data.sessions"),
    ("synthetic.sample_rate=0", "synthetic.sample_rate must be >= 1000"),
    ("synthetic.preset=unknown", "synthetic.preset must be demo or benchmark"),
    ("tune.scheduler_metric=test_ua", "tune.scheduler_metric=test_ua is not reported"),
]


@pytest.mark.parametrize("override, words", CONFIG, ids=[c[0] for c in CONFIG])
def test_a_value_that_used_to_crash_later_is_a_one_line_error_at_load(override, words):
    _, err = _bounded(lambda: load_config(None, [override]), seconds=2.0, mb=50)
    assert isinstance(err, ConfigError) and words in str(err) and str(err).count("\n") == 0, err


@pytest.mark.parametrize("secret", ["SECRET/WITH/SLASHES", "p@ss:w?rd#1", "a&b=c"])
def test_no_secret_reaches_a_message_a_saved_config_or_a_log_line(secret, tmp_path):
    import logging

    from serray import storage
    from serray.config import to_yaml

    uri = f"s3://KEYID9:{secret}@bucket/f?secret_key={secret}&region=eu"
    cfg = load_config(None, [f"output_dir={tmp_path}", f"features.dir={uri}"])
    record = logging.LogRecord("serray", logging.INFO, __file__, 1, "%s", (uri,), None)
    storage.RedactingFilter().filter(record)
    for shown in (storage.redact(uri), storage.describe(uri), to_yaml(cfg), record.getMessage()):
        assert "KEYID9" not in shown and secret not in shown, shown


# ---------------------------------------------------------------------------- POST /segments


def _silence_flac(seconds: float, rate: int = 8000) -> bytes:
    """A FLAC of digital silence written block by block (tens of bytes a second: the work it asks is
    not its size)."""
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", rate, 1, format="FLAC", subtype="PCM_16") as f:
        block = np.zeros(rate * 60, np.int16)
        for _ in range(int(seconds // 60)):
            f.write(block)
    return buf.getvalue()


def _segments(body: bytes, length: bool = True, **settings):
    """(status, answer) of POST /segments for ``body`` sent in 64 kB chunks, no server."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from serray.segment import settings_of
    from serray.serve.demo import LevelModel
    from serray.serve.parsing import RequestError
    from serray.serve.segments import segments_answer

    s = {"segments_max_body_mb": 4.0, "segments_body_timeout_s": 30.0, "segments_max_seconds": 60.0,
         "min_seconds": 0.25, "max_channels": 8, "min_sample_rate": 4000, "max_sample_rate": 192000, **settings}

    class Body:
        headers = {"content-type": "audio/wav", **({"content-length": str(len(body))} if length else {})}

        async def stream(self):
            for i in range(0, len(body), 65536):
                yield body[i:i + 65536]

    svc = SimpleNamespace(predictor=LevelModel(), settings=s)
    pool = ThreadPoolExecutor(1)

    async def go():
        loop = asyncio.get_running_loop()
        return await segments_answer(Body(), svc, settings_of(load_config(None, ["segment.vad=energy"])), s,
                                     lambda fn: loop.run_in_executor(pool, fn))

    try:
        return asyncio.run(go())
    except RequestError as e:
        return e.status, e.message
    finally:
        pool.shutdown()


SEGMENTS = [  # name, body, with Content-Length, status, words
    ("20 min of FLAC silence in a few kB", _silence_flac(1200), True, 413, "serve.segments_max_seconds"),
    ("the same, chunked", _silence_flac(1200), False, 413, "serve.segments_max_seconds"),
    ("streamed WAV, length unknown, past the cap", _streamed()[:44] + bytes(2 * 16000 * 70), False, 413,
     "serve.segments_max_seconds"),
    ("GSM 6.10 inside a WAV", _encoded("WAV", "GSM610", rate=8000), True, 400, "unsupported sample encoding GSM610"),
    ("IMA ADPCM inside a WAV", _encoded("WAV", "IMA_ADPCM"), True, 400, "unsupported sample encoding IMA_ADPCM"),
    ("chunked garbage", b"hello " * 300000, False, 400, "unsupported audio format: unknown"),
    ("chunked Ogg", _encoded("OGG", "VORBIS", seconds=30.0), False, 400, "unsupported audio format: Ogg"),
]


@pytest.mark.parametrize("name, body, length, status, words", SEGMENTS, ids=[r[0] for r in SEGMENTS])
def test_segments_route_bounds_the_work_of_a_crafted_upload(name, body, length, status, words):
    """Each answered by its limit within seconds and a few MB, whatever the body claims or holds."""
    out, err = _bounded(lambda: _segments(body, length), seconds=20.0, mb=64.0)
    assert err is None, err
    got, message = out
    assert got == status and words in message, (got, message)
