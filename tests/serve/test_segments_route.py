"""``POST /segments`` without a server: the body is decoded while it arrives, with the route's own limits.

A Starlette-like request (``headers``, ``stream()``) feeds :func:`serray.serve.segments.segments_answer`
chunk by chunk; the model is a stand-in that labels by loudness (as in tests/test_segment.py). The
route over real HTTP is in tests/serve/test_serve.py.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest

from serray.config import load_config
from serray.segment import segment_file, settings_of
from serray.serve.demo import LevelModel, encode_audio, synthetic_recording
from serray.serve.parsing import RequestError
from serray.serve.segments import GrowingFile, SegmentJobs, segments_answer

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


def answer(request, settings=None):
    settings = {**SETTINGS, **(settings or {})}
    svc = SimpleNamespace(predictor=LevelModel(-25.0, -25.0), settings=settings)
    seg = settings_of(load_config(None, ["segment.vad=energy"]))
    pool = ThreadPoolExecutor(1)

    async def go():
        loop = asyncio.get_running_loop()
        return await segments_answer(request, svc, seg, settings, lambda fn: loop.run_in_executor(pool, fn))

    try:
        return asyncio.run(go())
    except RequestError as e:
        return e.status, e.message
    finally:
        pool.shutdown()


class Replica:
    """What a Serve replica holds for the route: one segmentation thread and its admission, shared by
    every request answered in :meth:`run` (one event loop, as in a replica)."""

    def __init__(self, limit: int = 2, settings=None):
        self.settings = {**SETTINGS, **(settings or {})}
        self.svc = SimpleNamespace(predictor=LevelModel(-25.0, -25.0), settings=self.settings)
        self.seg = settings_of(load_config(None, ["segment.vad=energy"]))
        self.pool = ThreadPoolExecutor(1)
        self.jobs = SegmentJobs(limit)

    async def ask(self, request):
        loop = asyncio.get_running_loop()
        try:
            return await segments_answer(request, self.svc, self.seg, self.settings,
                                         lambda fn: loop.run_in_executor(self.pool, fn), self.jobs)
        except RequestError as e:
            return e.status, e.message


class StalledRequest(StreamedRequest):
    """A client that sends the first ``n`` chunks of its body and then nothing (a trickle, a vanished
    client): the stream never ends on its own."""

    def __init__(self, body: bytes, n: int = 2, **kw):
        super().__init__(body, **kw)
        self.n = n

    async def stream(self):
        for c in self.chunks[:self.n]:
            self.sent += 1
            yield c
        await asyncio.Event().wait()


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


@pytest.mark.parametrize("length", [True, False])
def test_an_unsupported_format_is_refused_before_the_body_has_arrived(length):
    """From its first bytes, with a Content-Length or without one (chunked: the length is known only
    at the end, which the refusal does not wait for)."""
    for head, name in ((b"OggS", "Ogg"), (b"", "unknown")):
        req = StreamedRequest(head + bytes(30 * CHUNK), delay=0.02, length=length)
        status, message = answer(req)
        assert status == 400 and f"unsupported audio format: {name}" in message
        assert req.sent < len(req.chunks) / 2, f"read {req.sent} of {len(req.chunks)} chunks before answering"


def test_route_limits():
    rec, _ = _recording()
    body = encode_audio(rec)
    status, message = answer(StreamedRequest(bytes(3 * 2**20)))
    assert status == 413 and "serve.segments_max_body_mb" in message and "Content-Length" in message
    long_wav = encode_audio(np.zeros(16000 * 100, np.float32))  # 3.2 MB, a valid WAV: refused as it streams
    status, message = answer(StreamedRequest(long_wav, length=False))
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


# ---------------------------------------------------------------------------- every way out of a request


def test_a_cancelled_request_does_not_wedge_the_next_one():
    """Serve cancels a handler at serve.request_timeout_s, and when its client goes away: the decoding
    thread must be released (one per replica), the spool removed, the admission slot given back, and
    the next recording answered in seconds. Before, the thread waited for the body for good."""
    rec, spans = _recording()
    body = encode_audio(rec)
    replica = Replica(limit=2)

    async def go():
        stalled = asyncio.ensure_future(replica.ask(StalledRequest(body)))
        await asyncio.sleep(0.5)  # the first chunks are spooled, the thread waits for the rest
        assert replica.jobs.active == 1 and replica.jobs.running is not None
        stalled.cancel()
        t0 = time.monotonic()
        status, res = await asyncio.wait_for(replica.ask(StreamedRequest(body)), 20.0)
        return time.monotonic() - t0, status, res

    try:
        took, status, res = asyncio.run(go())
    finally:
        replica.pool.shutdown(wait=False)
    assert status == 200 and len(res["segments"]) == len(spans), res
    assert took < 10.0, f"the next request took {took:.1f} s"
    assert replica.jobs.active == 0 and replica.jobs.running is None


def test_a_spooling_error_is_answered_and_releases_the_thread(monkeypatch):
    """A full disk while the body is spooled: 507 naming the problem, and the replica goes on."""
    import errno

    rec, spans = _recording()
    body = encode_audio(rec)
    replica = Replica()
    real = GrowingFile.append

    def append(self, chunk):
        if self.size >= 2 * CHUNK:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, chunk)

    async def go():
        monkeypatch.setattr(GrowingFile, "append", append)
        first = await asyncio.wait_for(replica.ask(StreamedRequest(body)), 20.0)
        monkeypatch.setattr(GrowingFile, "append", real)
        second = await asyncio.wait_for(replica.ask(StreamedRequest(body)), 20.0)
        return first, second

    try:
        (s1, m1), (s2, res) = asyncio.run(go())
    finally:
        replica.pool.shutdown(wait=False)
    assert s1 == 507 and "No space left on device" in m1
    assert s2 == 200 and len(res["segments"]) == len(spans)
    assert replica.jobs.active == 0


def test_admission_is_bounded_per_replica():
    """serve.segments_max_ongoing: a request beyond it is a 503 at once (not a queued upload holding a
    slot /predict needs); the slot comes back when the request's job has ended."""
    rec, spans = _recording()
    body = encode_audio(rec)
    replica = Replica(limit=1)

    async def go():
        slow = asyncio.ensure_future(replica.ask(StreamedRequest(body, delay=0.05)))
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        refused = await replica.ask(StreamedRequest(body))
        refused_in = time.monotonic() - t0
        first = await slow
        again = await replica.ask(StreamedRequest(body))
        return refused, refused_in, first, again

    try:
        (s503, m503), refused_in, (s1, _), (s2, _) = asyncio.run(go())
    finally:
        replica.pool.shutdown(wait=False)
    assert s503 == 503 and "serve.segments_max_ongoing=1" in m503 and refused_in < 1.0
    assert s1 == 200 and s2 == 200


def test_decoded_seconds_are_capped():
    """serve.segments_max_seconds: 413 naming the key, from the header's length, and while decoding when
    the header does not say (a streamed WAV whose data size is 0). A FLAC of silence is 47 bytes a second:
    the byte limit alone does not bound the work."""
    import struct

    rec = np.zeros(16000 * 12, np.float32)
    for fmt in ("WAV", "FLAC"):
        status, message = answer(StreamedRequest(encode_audio(rec, fmt=fmt)), {"segments_max_seconds": 5.0})
        assert status == 413 and "serve.segments_max_seconds" in message and "12.0 s" in message, message
    streamed = bytearray(encode_audio(rec))
    at = streamed.index(b"data") + 4
    streamed[at:at + 4] = struct.pack("<I", 0)  # a streaming writer's unknown length
    status, message = answer(StreamedRequest(bytes(streamed), length=False), {"segments_max_seconds": 5.0})
    assert status == 413 and "serve.segments_max_seconds" in message, message
    status, res = answer(StreamedRequest(encode_audio(rec)), {"segments_max_seconds": 20.0})
    assert status == 200


@pytest.mark.parametrize("subtype, ok", [("GSM610", False), ("IMA_ADPCM", False), ("MS_ADPCM", False),
                                         ("G721_32", False), ("ULAW", True), ("PCM_16", True), ("FLOAT", True)])
def test_only_pcm_float_and_g711_samples_are_served(subtype, ok):
    """WAV codecs (GSM, ADPCM, G.721) pass the container allowlist; the server refuses them (400) on both
    routes, before decoding a sample."""
    import io

    import soundfile as sf

    from serray.data.audio import SERVED_SUBTYPES, load_audio
    from serray.errors import AudioError

    rec, _ = _recording()
    buf = io.BytesIO()
    sf.write(buf, rec[::2], 8000, format="WAV", subtype=subtype)
    data = buf.getvalue()
    status, res = answer(StreamedRequest(data))
    if ok:
        assert status == 200, res
        load_audio(data, 16000, subtypes=SERVED_SUBTYPES)
    else:
        assert status == 400 and f"unsupported sample encoding {subtype}" in res, res
        with pytest.raises(AudioError, match="unsupported sample encoding"):
            load_audio(data, 16000, subtypes=SERVED_SUBTYPES)
        load_audio(data, 16000)  # offline (serray predict, training data) every libsndfile encoding stays readable


def test_a_stalled_job_is_seen_by_the_health_check():
    jobs = SegmentJobs(2, stall_s=0.2)
    assert jobs.stalled() is None
    body = GrowingFile(declared=10)
    jobs.running = body
    assert jobs.stalled() is None
    time.sleep(0.3)
    assert jobs.stalled() > 0.2
    body.append(b"01234")  # progress
    assert jobs.stalled() is None
    body.close()


def test_a_request_cancelled_while_its_recording_is_decoded_keeps_its_slot_until_the_thread_stops():
    """Serve cancels a handler whose body has all arrived while the thread still decodes (its
    request_timeout_s, a client's Ctrl-C): the thread is told to stop, and the spool file and the
    admission slot stay with it until it has (before: both were released at once, under the running
    thread: a closed file read, another request admitted beside it)."""
    import threading

    class SlowModel(LevelModel):
        def predict_waveforms(self, wavs):
            time.sleep(0.5)
            return super().predict_waveforms(wavs)

    rec = np.concatenate([_recording()[0]] * 4)
    body = encode_audio(rec)
    replica = Replica(limit=1)
    replica.svc.predictor = SlowModel(-25.0, -25.0)
    replica.seg = {**replica.seg, "batch_size": 1}
    errors = []
    hook = threading.excepthook
    threading.excepthook = lambda args: errors.append(args.exc_value)

    async def go():
        handler = asyncio.ensure_future(replica.ask(StreamedRequest(body)))
        await asyncio.sleep(0.8)  # spooled whole, decoding
        assert replica.jobs.running is not None
        handler.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handler
        held = replica.jobs.active
        with pytest.raises(RequestError) as refused:  # the one thread is still busy: no second admission
            replica.jobs.admit()
        t0 = time.monotonic()
        while replica.jobs.active and time.monotonic() - t0 < 20:
            await asyncio.sleep(0.05)
        return held, refused.value.status, time.monotonic() - t0

    try:
        held, status, stopped_in = asyncio.run(go())
    finally:
        threading.excepthook = hook
        replica.pool.shutdown(wait=True)
    assert held == 1 and status == 503
    assert replica.jobs.active == 0 and replica.jobs.running is None
    assert stopped_in < 5.0, f"the thread took {stopped_in:.1f} s to stop"  # it stops, not decodes all of it
    assert not errors


def test_a_client_still_sending_is_not_a_stalled_job():
    """The health check must not take a replica down for a slow client inside the body timeout."""
    jobs = SegmentJobs(2, stall_s=0.2)
    body = GrowingFile(declared=10)
    jobs.running, body.receiving = body, True
    time.sleep(0.3)
    assert jobs.stalled() is None  # waiting for bytes the body timeout bounds
    body.receiving = False  # the handler is gone and nobody ended the body: a wedge
    assert jobs.stalled() > 0.2
    body.close()
