"""``POST /segments`` without a server: the body is decoded while it arrives, with the route's own limits.

A Starlette-like request (``headers``, ``stream()``) feeds :func:`serray.serve.segments.segments_answer`
chunk by chunk; the model is a stand-in that labels by loudness (as in tests/test_segment.py). The
route over real HTTP is in tests/serve/test_serve.py.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest

from serray.config import load_config
from serray.segment import segment_file, settings_of
from serray.serve.demo import LevelModel, encode_audio, synthetic_recording
from serray.serve.parsing import RequestError
from serray.serve.segments import GrowingFile, segments_answer

CHUNK = 65536


class StreamedRequest:
    """Chunks of a body arriving over time; ``sent`` counts the chunks the handler has taken."""

    def __init__(self, body: bytes, headers=None, delay: float = 0.0, length: bool = True):
        self.chunks = [body[i:i + CHUNK] for i in range(0, len(body), CHUNK)]
        self.headers = {k.lower(): v for k, v in (headers or {"content-type": "audio/wav"}).items()}
        if length:
            self.headers.setdefault("content-length", str(len(body)))
        self.delay, self.sent = delay, 0

    async def stream(self):
        for c in self.chunks:
            if self.delay:
                await asyncio.sleep(self.delay)
            self.sent += 1
            yield c


SETTINGS = {"segments_max_body_mb": 2.0, "segments_body_timeout_s": 30.0, "min_seconds": 0.25, "max_channels": 8,
            "min_sample_rate": 4000, "max_sample_rate": 192000}


def answer(request):
    svc = SimpleNamespace(predictor=LevelModel(-25.0, -25.0), settings=SETTINGS)
    seg = settings_of(load_config(None, ["segment.vad=energy"]))
    pool = ThreadPoolExecutor(1)

    async def go():
        loop = asyncio.get_running_loop()
        return await segments_answer(request, svc, seg, SETTINGS, lambda fn: loop.run_in_executor(pool, fn))

    try:
        return asyncio.run(go())
    except RequestError as e:
        return e.status, e.message
    finally:
        pool.shutdown()


def _recording():
    rng = np.random.default_rng(0)
    clips = [0.3 * np.sin(np.arange(int(16000 * d)) * 2 * np.pi * f / 16000).astype(np.float32) * (1 + 0.1 * rng.random())
             for d, f in ((1.5, 200), (2.0, 300), (1.0, 250))]
    return synthetic_recording(clips, gap_s=2.0, noise_db=-60.0)


@pytest.mark.parametrize("length", [True, False])
def test_segments_of_a_streamed_body_equal_those_of_the_file(tmp_path, length):
    rec, spans = _recording()
    body = encode_audio(rec)
    status, res = answer(StreamedRequest(body, delay=0.001, length=length))
    assert status == 200, res
    assert len(res["segments"]) == len(spans)
    for s, (a, b) in zip(res["segments"], spans):
        assert abs(s["start"] - a) <= 0.4 and abs(s["end"] - b) <= 0.4, (s, (a, b))
    path = tmp_path / "r.wav"
    path.write_bytes(body)
    offline = segment_file(LevelModel(-25.0, -25.0), path, settings_of(load_config(None, ["segment.vad=energy"])))
    assert res["segments"] == offline["segments"] and res["aggregate"] == offline["aggregate"]


def test_an_unsupported_format_is_refused_before_the_body_has_arrived():
    req = StreamedRequest(b"OggS" + bytes(30 * CHUNK), delay=0.02)
    status, message = answer(req)
    assert status == 400 and "unsupported audio format: Ogg" in message
    assert req.sent < len(req.chunks) / 2, f"read {req.sent} of {len(req.chunks)} chunks before answering"


def test_route_limits():
    rec, _ = _recording()
    body = encode_audio(rec)
    status, message = answer(StreamedRequest(bytes(3 * 2**20)))
    assert status == 413 and "serve.segments_max_body_mb" in message and "Content-Length" in message
    status, message = answer(StreamedRequest(bytes(3 * 2**20), length=False))
    assert status == 413 and "streamed more than" in message
    status, message = answer(StreamedRequest(body, headers={"content-type": "multipart/form-data; boundary=x"}))
    assert status == 415 and "raw request body" in message
    status, message = answer(StreamedRequest(body, headers={"content-type": "text/plain"}))
    assert status == 415
    short = StreamedRequest(body[: len(body) // 2], headers={"content-type": "audio/wav",
                                                             "content-length": str(len(body))})
    status, message = answer(short)
    assert status == 400 and "Content-Length announced" in message
    status, res = answer(StreamedRequest(encode_audio(np.zeros(16000 * 3, np.float32))))
    assert status == 200 and res["segments"] == [] and "no speech found" in res["message"]


def test_growing_file_reads_wait_for_the_bytes():
    import threading

    f = GrowingFile(declared=10)
    got = []
    t = threading.Thread(target=lambda: got.append(f.read(10)))
    t.start()
    f.append(b"01234")
    t.join(0.2)
    assert t.is_alive() and not got  # waiting for the rest
    f.append(b"56789")
    t.join(5)
    assert got == [b"0123456789"] and f.seek(0, 2) == 10
    f.close()
