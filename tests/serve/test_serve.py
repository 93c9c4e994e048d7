"""The Ray Serve endpoint over real HTTP (127.0.0.1, a free port): predictions, bad input, batching.

One module-scoped deployment of a random-init classifier registered in a tmp registry (served as the
registry's best entry), plus an unbatched one built through ``app_builder``. Serve is shut down at
the end of the module; Ray (the session's ``ray_session``) is left running.
"""

import http.client
import io
import json
import socket
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from serray.serve.demo import encode_audio, synthetic_clip

pytestmark = pytest.mark.ray

MAX_BODY_MB = 0.5
MAX_SECONDS = 5.0
BODY_TIMEOUT_S = 2.0
FIVE = [1, 2, 3, 4, 5]
SEGMENTS_MAX_BODY_MB = 3.0  # POST /segments' own limit, above serve.max_body_mb
#: Planted in the served entry's training config: /info must show neither.
SECRET_KEY, ACCESS_KEY = "SECRETSERRAYTEST", "AKIDSERRAYTEST"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(srv, method: str, path: str, body=None, content_type="audio/wav", chunked=False, headers=None):
    """(status, JSON body) of one request on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=120)
    hdrs = dict(headers or {})
    if content_type is not None:
        hdrs["Content-Type"] = content_type
    try:
        if chunked:
            chunks = [body[i:i + 65536] for i in range(0, len(body), 65536)]
            conn.request(method, path, body=iter(chunks), headers=hdrs, encode_chunked=True)
        else:
            conn.request(method, path, body=body, headers=hdrs)
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"null")
    finally:
        conn.close()


def multipart(fields, boundary="----serray-test-7d1f"):
    """A multipart/form-data body: fields = [(name, filename or None, bytes)]."""
    out = b""
    for name, filename, data in fields:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += (f"--{boundary}\r\nContent-Disposition: {disp}\r\n"
                + ("Content-Type: application/octet-stream\r\n" if filename else "") + "\r\n").encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.fixture(scope="module")
def srv(ray_session, tmp_path_factory):
    from ray import serve

    from serray.config import load_config
    from serray.train.registry import model_dir, register
    from serray.serve.app import run_server
    from serray.serve.demo import make_demo_checkpoint

    import yaml

    base = tmp_path_factory.mktemp("serve")
    ck = make_demo_checkpoint(base / "checkpoint", seed=0)
    reg = base / "registry"
    five = {"protocol": "inductive", "folds": FIVE, "val_split": "speaker", "val_fraction": 0.15, "label_fraction": 1.0,
            "selection": "fixed"}
    other = register(reg, ck, metrics={"ua": 0.40, "val_ua": 0.35}, config_yaml="{}\n", source="test", extra=five)
    train_cfg = yaml.safe_load((ck / "config.yaml").read_text())
    train_cfg["features"]["dir"] = f"s3://{ACCESS_KEY}:{SECRET_KEY}@bucket/features?secret_key={SECRET_KEY}&region=x"
    (ck / "config.yaml").write_text(yaml.safe_dump(train_cfg))  # the model's config, which /info shows
    best = register(reg, ck, metrics={"ua": 0.55, "wa": 0.6, "val_ua": 0.5}, config_yaml=yaml.safe_dump(train_cfg),
                    source="test", extra=five)
    port = _free_port()
    overrides = [f"output_dir={base}", f"registry.dir={reg}", f"serve.port={port}", f"serve.max_body_mb={MAX_BODY_MB}",
                 f"serve.max_seconds={MAX_SECONDS}", "serve.batch_wait_timeout_s=0.2", "serve.max_batch_size=16",
                 f"serve.body_timeout_s={BODY_TIMEOUT_S}", "ray.progress_bars=false",
                 f"serve.segments_max_body_mb={SEGMENTS_MAX_BODY_MB}"]
    cfg = load_config(None, overrides)
    run_server(cfg, blocking=False, logging_config={"enable_access_log": False})
    from serray.train.registry import get_entry

    yield SimpleNamespace(port=port, cfg=cfg, overrides=overrides, entry=best, other=other,
                          checkpoint=model_dir(get_entry(reg, best["id"])), tmp=base)
    serve.shutdown()


def clip_bytes(seconds=1.5, **kw) -> bytes:
    return encode_audio(synthetic_clip(seconds, seed=1), **kw)


# ---------------------------------------------------------------------------- basics


def test_healthz_and_info(srv):
    status, body = request(srv, "GET", "/healthz")
    assert status == 200 and body == {"status": "ok", "version": srv.entry["id"]}
    status, info = request(srv, "GET", "/info")
    assert status == 200
    assert info["version"] == srv.entry["id"]  # the best entry (ua 0.55), not the other one
    assert info["labels"] == ["neu", "hap", "sad", "ang"]
    assert info["metrics"]["ua"] == pytest.approx(0.55)
    assert info["encoder"]["encoder"] == "egemaps" and info["encoder"]["dim"] == 26  # the shipped default front end
    assert info["config"]["encoder"]["name"] == "egemaps"
    assert SECRET_KEY in (srv.checkpoint / "config.yaml").read_text()  # planted: test_info_exposes_no_... checks it
    assert info["serving"]["batching"] is True and info["serving"]["max_batch_size"] == 16
    status, body = request(srv, "GET", "/no-such-route")
    assert status == 404 and "error" in body


def test_info_exposes_no_paths_or_credentials(srv):
    """The card says what a client needs: no registry / checkpoint / output paths, no storage secrets."""
    status, info = request(srv, "GET", "/info")
    assert status == 200
    text = json.dumps(info)
    assert SECRET_KEY not in text and ACCESS_KEY not in text
    assert str(srv.tmp) not in text and "/tmp/" not in text, [s for s in _strings(info) if "/tmp/" in s][:5]
    assert "path" not in info["model"]
    assert info["config"]["features"]["dir"] == "s3://bucket/features"  # where, without credentials or query
    assert info["config"]["output_dir"].startswith(".../")
    assert info["config"]["tracking"]["uri"] == "(hidden)"  # a path on the training machine, or a server's address
    assert info["serving"]["max_channels"] == 8 and info["serving"]["sample_rates"] == [4000, 192000]


def _strings(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)
    elif isinstance(obj, str):
        yield obj


def _streamed(wav: bytes) -> bytes:
    """A WAV as a streaming writer leaves it: RIFF and data sizes 0 (unknown when the header was written)."""
    import struct

    at = wav.find(b"data")
    return wav[:4] + struct.pack("<I", 0) + wav[8:at + 4] + struct.pack("<I", 0) + wav[at + 8:]


def test_predict_valid_clip(srv):
    status, body = request(srv, "POST", "/predict", clip_bytes(1.5))
    assert status == 200, body
    assert body["label"] in ("neu", "hap", "sad", "ang")
    assert set(body["probabilities"]) == {"neu", "hap", "sad", "ang"}
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert body["label"] == max(body["probabilities"], key=body["probabilities"].get)
    assert body["version"] == srv.entry["id"]
    assert body["duration_s"] == pytest.approx(1.5, abs=1e-3)


@pytest.mark.parametrize("name, make, ctype", [
    ("stereo 44.1k", lambda: encode_audio(synthetic_clip(1.2, 44100, channels=2), 44100), "audio/x-wav"),
    ("8-bit 8k", lambda: encode_audio(synthetic_clip(1.0, 8000), 8000, subtype="PCM_U8"), "audio/wave"),
    ("32-bit 22.05k", lambda: encode_audio(synthetic_clip(1.0, 22050), 22050, subtype="PCM_32"), "audio/wav"),
    ("float", lambda: encode_audio(synthetic_clip(1.0), subtype="FLOAT"), "application/octet-stream"),
    ("flac 48k stereo", lambda: encode_audio(synthetic_clip(1.0, 48000, channels=2), 48000, fmt="FLAC"), "audio/flac"),
    ("flac x-flac", lambda: encode_audio(synthetic_clip(1.0), fmt="FLAC"), "audio/x-flac; charset=binary"),
    ("no content type", lambda: clip_bytes(1.0), None),
    ("4001 Hz (polyphase)", lambda: encode_audio(synthetic_clip(1.0, 4001), 4001), "audio/wav"),
    ("4000 Hz (lowest rate)", lambda: encode_audio(synthetic_clip(1.0, 4000), 4000), "audio/wav"),
    ("192 kHz (highest rate)", lambda: encode_audio(synthetic_clip(0.5, 192000), 192000), "audio/wav"),
    ("8 channels (most)", lambda: encode_audio(synthetic_clip(0.5, channels=8)), "audio/wav"),
    ("RF64", lambda: encode_audio(synthetic_clip(1.0), fmt="RF64"), "audio/wav"),
    ("W64", lambda: encode_audio(synthetic_clip(1.0), fmt="W64"), "audio/wav"),
    ("WAVE_FORMAT_EXTENSIBLE", lambda: encode_audio(synthetic_clip(1.0, channels=3), subtype="PCM_24"), "audio/wav"),
    ("streamed WAV (data size 0)", lambda: _streamed(encode_audio(synthetic_clip(1.0))), "audio/wav"),
    ("exactly max_seconds", lambda: clip_bytes(MAX_SECONDS, subtype="PCM_U8"), "audio/wav"),
    ("float at the magnitude limit", lambda: encode_audio(synthetic_clip(0.5) / np.abs(synthetic_clip(0.5)).max() * 1e6,
                                                          subtype="FLOAT"), "audio/wav"),
])
def test_formats_accepted(srv, name, make, ctype):
    data = make()
    status, body = request(srv, "POST", "/predict", data, content_type=ctype)
    assert status == 200, (name, body)
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    info = sf.info(io.BytesIO(data))
    expected = 1.0 if name.startswith("streamed") else info.frames / info.samplerate  # libsndfile alone sees 0 frames
    assert body["duration_s"] == pytest.approx(expected, abs=2e-3)


def test_multipart_upload(srv):
    data = clip_bytes(1.5)
    body, ctype = multipart([("note", None, b"hello"), ("file", "clip.wav", data)])
    status, out = request(srv, "POST", "/predict", body, content_type=ctype)
    assert status == 200, out
    _, raw = request(srv, "POST", "/predict", data)
    np.testing.assert_allclose(list(out["probabilities"].values()), list(raw["probabilities"].values()), atol=1e-6)


# ---------------------------------------------------------------------------- bad input


def _float_wav_with(value) -> bytes:
    x = synthetic_clip(1.0)
    x[100:110] = value
    return encode_audio(x, subtype="FLOAT")


def _lying_flac() -> bytes:
    """1 s of FLAC whose STREAMINFO claims 2^36 - 1 frames (plain sf.read: a 512 GiB MemoryError)."""
    data = bytearray(encode_audio(synthetic_clip(1.0, channels=2), fmt="FLAC"))
    data[21] |= 0x0F
    data[22:26] = b"\xff\xff\xff\xff"
    return bytes(data)


def _silent_flac(seconds: float, channels: int = 8, sr: int = 16000) -> bytes:
    """Silence compresses to almost nothing: a few KB that decode to channels x seconds x sr floats
    (the issue's example: 30 min x 8 ch x 48 kHz is 715 KB of FLAC and 2.8 GB of float32)."""
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", sr, channels, format="FLAC", subtype="PCM_16") as f:
        left = int(round(seconds * sr))
        while left > 0:
            n = min(left, 30 * sr)
            f.write(np.zeros((n, channels), np.float32))
            left -= n
    return buf.getvalue()


BAD = [  # name, body, content type, status, words the error names
    ("empty body", b"", "audio/wav", 400, "empty"),
    ("not audio", b"this is certainly not a wav file\n" * 64, "audio/wav", 400, "decode"),
    ("truncated header", clip_bytes(1.5)[:40], "audio/wav", 400, "decode"),
    ("truncated data", clip_bytes(1.5)[:30000], "audio/wav", 400, "truncated"),
    ("corrupt flac", encode_audio(synthetic_clip(1.5), fmt="FLAC")[:3000], "audio/flac", 400, "decode"),
    # a format outside the allowlist, sent as audio/wav: refused by name before libsndfile sees it
    ("Ogg Vorbis as audio/wav", encode_audio(synthetic_clip(1.5), fmt="OGG", subtype="VORBIS"), "audio/wav", 400,
     "unsupported audio format: Ogg"),
    ("AIFF as audio/wav", encode_audio(synthetic_clip(1.5), fmt="AIFF"), "audio/wav", 400, "unsupported audio format: AIFF"),
    ("NIST as octet-stream", encode_audio(synthetic_clip(1.5), fmt="NIST"), "application/octet-stream", 400,
     "unsupported audio format: NIST"),
    ("truncated RF64", encode_audio(synthetic_clip(1.5), fmt="RF64")[:30000], "audio/wav", 400, "truncated RF64"),
    ("truncated W64", encode_audio(synthetic_clip(1.5), fmt="W64")[:30000], "audio/wav", 400, "truncated W64"),
    ("NaN samples", _float_wav_with(np.nan), "audio/wav", 400, "NaN"),
    ("inf samples", _float_wav_with(np.inf), "audio/wav", 400, "infinite"),
    ("too short", clip_bytes(0.1), "audio/wav", 400, "too short"),
    ("too long", clip_bytes(MAX_SECONDS + 1.0, subtype="PCM_U8"), "audio/wav", 400, "too long"),
    ("text content type", clip_bytes(1.0), "text/plain", 415, "Content-Type"),
    ("json content type", b'{"audio": 1}', "application/json", 415, "Content-Type"),
    ("form-urlencoded (curl -d)", clip_bytes(1.0), "application/x-www-form-urlencoded", 415, "Content-Type"),
    ("multipart without file", *multipart([("note", None, b"hi")]), 400, "no file part"),
    ("multipart empty file", *multipart([("file", "a.wav", b"")]), 400, "empty"),
    ("multipart truncated", multipart([("file", "a.wav", clip_bytes(1.0))])[0][:-30], multipart([])[1], 400,
     "multipart"),
    # limits read from the header, before any sample is decoded
    ("rate below the lowest", encode_audio(synthetic_clip(1.0, 3999), 3999), "audio/wav", 400, "sample rate 3999"),
    ("rate above the highest", encode_audio(synthetic_clip(0.5, 192001), 192001), "audio/wav", 400, "sample rate 192001"),
    ("9 channels", encode_audio(synthetic_clip(0.5, channels=9)), "audio/wav", 400, "channel count 9"),
    ("silent 8-ch FLAC, 2 min", _silent_flac(120), "audio/flac", 400, "header declares 120.0 s"),
    ("header just over max_seconds", _silent_flac(MAX_SECONDS + 0.01, 1), "audio/flac", 400, "header declares"),
    ("FLAC header lying about its length", _lying_flac(), "audio/flac", 400, "header declares"),
    ("finite but huge samples (x1e15)", encode_audio(synthetic_clip(1.0) * 1e15, subtype="FLOAT"), "audio/wav", 400,
     "out of range"),
    # malformed Content-Type parameters and multipart bodies
    ("RFC 2231 boundary", *multipart([("file", "a.wav", b"RIFF")])[:1], "multipart/form-data; boundary*=utf-8''%E2%98%83",
     400, "boundary"),
    ("unterminated quoted boundary", *multipart([("file", "a.wav", b"RIFF")])[:1], 'multipart/form-data; boundary="abc',
     400, "boundary"),
    ("boundary over 70 characters", *multipart([("file", "a.wav", b"RIFF")], "b" * 71)[:1],
     "multipart/form-data; boundary=" + "b" * 71, 400, "boundary"),
    ("too many parts", *multipart([(f"n{i}", None, b"x") for i in range(40)] + [("file", "a.wav", b"RIFF")]), 400,
     "too many parts"),
]


@pytest.mark.parametrize("name, body, ctype, status, words", BAD, ids=[b[0] for b in BAD])
def test_bad_input(srv, name, body, ctype, status, words):
    got, out = request(srv, "POST", "/predict", body, content_type=ctype)
    assert got == status, (name, out)
    assert set(out) == {"error"} and words.lower() in out["error"].lower(), out
    assert request(srv, "GET", "/healthz")[0] == 200


def test_bad_input_is_cheap(srv):
    """The classes that used to cost GBs or seconds (4001 Hz: ~1 GB and 2 s of resampling kernel; a silent
    multichannel FLAC: GBs of decoded zeros; a lying header: MemoryError) now answer fast."""
    cases = [(encode_audio(synthetic_clip(0.5, 4001), 4001), 200), (_silent_flac(120), 400), (_lying_flac(), 400)]
    for body, status in cases:
        t0 = time.perf_counter()
        got, out = request(srv, "POST", "/predict", body)
        assert got == status, out
        assert time.perf_counter() - t0 < 3.0


def test_many_parts_do_not_stall_the_replica(srv):
    """A body of 40k tiny parts is refused at part 17, and /healthz answers meanwhile."""
    body = (b"--x\r\n\r\ny\r\n" * 40_000) + b"--x--\r\n"
    t0 = time.perf_counter()
    status, out = request(srv, "POST", "/predict", body, content_type="multipart/form-data; boundary=x")
    assert status == 400 and "too many parts" in out["error"]
    assert time.perf_counter() - t0 < 3.0


def _slow_client(srv, declared: int, path="/predict", send=b"RIFF", headers_only=False):
    """A raw socket that declares ``declared`` body bytes and sends only ``send`` (nothing more)."""
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    sock.sendall((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: audio/wav\r\n"
                  f"Content-Length: {declared}\r\n\r\n").encode() + (b"" if headers_only else send))
    return sock


def _read_response(sock) -> tuple:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = int(next((l.split(b":", 1)[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")), b"0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, rest[:length]


def test_large_declared_body_is_refused_before_it_is_sent(srv):
    sock = _slow_client(srv, int(MAX_BODY_MB * 2**20) + 1, headers_only=True)
    try:
        t0 = time.perf_counter()
        status, body = _read_response(sock)
        assert status == 413 and "too large" in json.loads(body)["error"]
        assert time.perf_counter() - t0 < 3.0
    finally:
        sock.close()


def test_slow_client_gets_408_while_others_are_served(srv):
    """A client that declares a body within the limit and trickles it gets 408 (JSON) after
    serve.body_timeout_s; a normal request sent meanwhile is answered at once."""
    sock = _slow_client(srv, 100_000)
    try:
        t0 = time.perf_counter()
        status, out = request(srv, "POST", "/predict", clip_bytes(1.0))
        served = time.perf_counter() - t0
        assert status == 200 and served < BODY_TIMEOUT_S, (status, served)
        status, body = _read_response(sock)
        waited = time.perf_counter() - t0
        assert status == 408 and "body_timeout_s" in json.loads(body)["error"]
        assert BODY_TIMEOUT_S - 0.5 <= waited < BODY_TIMEOUT_S + 3.0, waited
    finally:
        sock.close()
    assert request(srv, "GET", "/healthz")[0] == 200


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_too_large(srv, chunked):
    big = clip_bytes(1.0) + b"\0" * int(MAX_BODY_MB * 2**20)
    status, out = request(srv, "POST", "/predict", big, chunked=chunked)
    assert status == 413 and "too large" in out["error"], out
    assert request(srv, "GET", "/healthz")[0] == 200


def test_wrong_method(srv):
    status, out = request(srv, "GET", "/predict", content_type=None)
    assert status == 405 and "error" in out


# ---------------------------------------------------------------------------- batching, equality


def _concurrent(srv, bodies, path="/predict"):
    results = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def go(i):
        barrier.wait()
        results[i] = request(srv, "POST", path, bodies[i])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_requests_are_batched(srv):
    bodies = [encode_audio(synthetic_clip(0.8 + 0.1 * (i % 8), seed=i)) for i in range(16)]
    results = _concurrent(srv, bodies)
    assert all(s == 200 for s, _ in results), results
    sizes = [out["batch_size"] for _, out in results]
    status, stats = request(srv, "GET", "/stats")
    assert status == 200
    assert stats["max_batch_size_seen"] > 1 and max(sizes) > 1, (sizes, stats)
    assert stats["predictions"] >= 16


def test_http_matches_offline(srv, tmp_path):
    from serray.predict import Predictor

    clips = {"a.wav": encode_audio(synthetic_clip(0.7, seed=11)),
             "b.wav": encode_audio(synthetic_clip(2.3, seed=12)),
             "c.wav": encode_audio(synthetic_clip(1.1, 44100, seed=13, channels=2), 44100),
             "d.flac": encode_audio(synthetic_clip(1.6, 22050, seed=14), 22050, fmt="FLAC"),
             "e.wav": encode_audio(synthetic_clip(1.9, seed=15), subtype="PCM_U8")}
    paths = []
    for name, data in clips.items():
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)
    offline = Predictor.from_checkpoint(srv.checkpoint).predict_files(paths)
    results = _concurrent(srv, list(clips.values()))  # padded together with other lengths
    labels = ["neu", "hap", "sad", "ang"]
    for (status, out), (_, row) in zip(results, offline.iterrows()):
        assert status == 200, out
        assert out["label"] == row["label"]
        np.testing.assert_allclose([out["probabilities"][l] for l in labels], [row[f"p_{l}"] for l in labels],
                                   rtol=1e-5, atol=1e-6)


def test_unbatched_app_from_app_builder(srv):
    """``serve.batching=false`` through the import-path builder (as configs/serve.yaml uses it)."""
    from ray import serve

    from serray.serve.app import app_builder

    args = {"overrides": srv.overrides + ["serve.batching=false"],
            "serve.model": srv.other["id"]}  # a non-best entry, picked by id
    serve.run(app_builder(args), name="serray-unbatched", route_prefix="/unbatched", blocking=False)
    try:
        data = clip_bytes(1.5)
        results = _concurrent(srv, [data] * 6, path="/unbatched/predict")
        _, batched = request(srv, "POST", "/predict", data)
        for status, out in results:
            assert status == 200 and out["batch_size"] == 1, out
            assert out["version"] == srv.other["id"]
            np.testing.assert_allclose(list(out["probabilities"].values()), list(batched["probabilities"].values()),
                                       atol=1e-6)
        status, info = request(srv, "GET", "/unbatched/info")
        assert info["serving"]["batching"] is False and info["stats"]["max_batch_size_seen"] == 1
    finally:
        serve.delete("serray-unbatched")


# ---------------------------------------------------------------------------- bounded queue, broken model


def test_burst_beyond_capacity_gets_503_at_once(srv):
    """A replica admitting 1 request with a queue of 1: while a slow client holds the replica and a
    second request waits in the queue, a third gets 503 at once; the queued one is served after the
    slow one's 408."""
    from ray import serve

    from serray.serve.app import app_builder

    small = ["serve.batching=false", "serve.max_batch_size=1", "serve.max_ongoing_requests=1",
             "serve.max_queued_requests=1"]
    serve.run(app_builder({"overrides": srv.overrides + small}), name="serray-small", route_prefix="/small",
              blocking=False)
    try:
        assert request(srv, "POST", "/small/predict", clip_bytes(1.0))[0] == 200
        sock = _slow_client(srv, 100_000, path="/small/predict")
        time.sleep(0.5)
        queued = {}
        t = threading.Thread(target=lambda: queued.update(r=request(srv, "POST", "/small/predict", clip_bytes(1.0))))
        t.start()
        time.sleep(0.5)
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        conn.request("POST", "/small/predict", body=clip_bytes(1.0), headers={"Content-Type": "audio/wav"})
        r = conn.getresponse()
        r.read()
        conn.close()
        assert r.status == 503 and time.perf_counter() - t0 < 1.5, (r.status, time.perf_counter() - t0)
        status, _ = _read_response(sock)
        sock.close()
        assert status == 408
        t.join(30)
        assert queued["r"][0] == 200, queued
    finally:
        serve.delete("serray-small")


def test_non_finite_model_output_is_a_json_500(srv, tmp_path):
    """A model whose weights hold NaN: the client gets {"error": ...} with 500 (the response used to
    fail to render outside the error handler: a plain-text 500), and nothing non-finite."""
    import torch
    from ray import serve

    from serray.serve.app import app_builder

    nan_ck = tmp_path / "nan_model"
    import shutil

    shutil.copytree(srv.checkpoint, nan_ck)
    state = torch.load(nan_ck / "state.pt", weights_only=True)
    for v in state["model"].values():
        if torch.is_floating_point(v):
            v.fill_(float("nan"))
    torch.save(state, nan_ck / "state.pt")
    serve.run(app_builder({"overrides": srv.overrides + [f"serve.checkpoint={nan_ck}"]}), name="serray-nan",
              route_prefix="/nan", blocking=False)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
        conn.request("POST", "/nan/predict", body=clip_bytes(1.0), headers={"Content-Type": "audio/wav"})
        r = conn.getresponse()
        raw = r.read()
        conn.close()
        assert r.status == 500 and r.getheader("content-type") == "application/json", (r.status, raw[:200])
        out = json.loads(raw)
        assert set(out) == {"error"} and "non-finite" in out["error"]
        assert b"NaN" not in raw and b"Infinity" not in raw
        status, info = request(srv, "GET", "/nan/info")
        assert status == 200 and info["stats"]["errors"] == {"500": 1}
    finally:
        serve.delete("serray-nan")


def test_unsatisfiable_resources_end_with_a_clear_error(srv):
    """serve.num_gpus=1 on this CPU-only cluster: a ConfigError after serve.start_timeout_s, not a hang."""
    from serray.config import load_config
    from serray.errors import ConfigError
    from serray.serve.app import run_server

    cfg = load_config(None, srv.overrides + ["serve.num_gpus=1", "serve.start_timeout_s=1"])
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"GPU: 1.*serve.start_timeout_s"):
        run_server(cfg, blocking=False, name="serray-gpu")
    assert time.perf_counter() - t0 < 10


# ---------------------------------------------------------------------------- no server needed


def test_deployment_options_from_config():
    from serray.config import load_config
    from serray.serve.app import deployment_options

    from omegaconf import OmegaConf

    fixed = deployment_options(OmegaConf.to_container(load_config(None, ["serve.num_replicas=3", "serve.num_cpus=1"]).serve))
    assert fixed["num_replicas"] == 3 and fixed["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert fixed["max_ongoing_requests"] == 32 and fixed["max_queued_requests"] == 64
    auto = deployment_options(OmegaConf.to_container(
        load_config(None, ["serve.autoscaling=true", "serve.min_replicas=1", "serve.max_replicas=4"]).serve))
    assert "num_replicas" not in auto
    assert auto["autoscaling_config"]["min_replicas"] == 1 and auto["autoscaling_config"]["max_replicas"] == 4


def test_build_app_errors(tmp_path):
    from serray.config import load_config
    from serray.errors import ConfigError, DataError
    from serray.serve.app import build_app

    with pytest.raises(DataError, match="registry .* is empty"):
        build_app(load_config(None, [f"registry.dir={tmp_path / 'none'}"]))
    with pytest.raises(DataError, match="not a classifier checkpoint"):
        build_app(load_config(None, [f"serve.checkpoint={tmp_path}"]))
    with pytest.raises(ConfigError, match="serve.max_seconds"):
        build_app(load_config(None, ["serve.min_seconds=5", "serve.max_seconds=1"]))


@pytest.mark.parametrize("override, message", [
    ("serve.max_ongoing_requests=8", "serve.max_batch_size (16) must be <= serve.max_ongoing_requests (8)"),
    ("serve.max_queued_requests=0", "serve.max_queued_requests must be -1 (no limit) or >= 1, got 0"),
    ("serve.body_timeout_s=0", "serve.body_timeout_s must be > 0, got 0"),
    ("serve.request_timeout_s=-1", "serve.request_timeout_s must be > 0"),
    ("serve.max_channels=0", "serve.max_channels must be >= 1"),
    ("serve.min_sample_rate=200000", "serve.min_sample_rate (200000) must be <= serve.max_sample_rate (192000)"),
    ("serve.start_timeout_s=0", "serve.start_timeout_s must be > 0"),
])
def test_serve_limits_are_checked_at_load(override, message):
    from serray.config import load_config
    from serray.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


# ---------------------------------------------------------------------------- POST /segments


def _recording(root, seconds_gap=1.5, n=5):
    """Clips of the synthetic corpus (speech-like enough for Silero VAD) joined by silence."""
    from serray.serve.demo import synthetic_recording

    wavs = sorted(w for w in root.glob("Session2/sentences/wav/*/*.wav") if not w.name.startswith("._"))[:n]
    return synthetic_recording([sf.read(w, dtype="float32")[0] for w in wavs], gap_s=seconds_gap, noise_db=-55.0)


@pytest.mark.parametrize("chunked", [False, True])
def test_segments_route_streams_a_recording_larger_than_the_predict_limit(srv, synthetic_root, tmp_path, chunked):
    """A 1.3 MB recording (over serve.max_body_mb = 0.5 MB, under the route's own 3 MB): time-stamped
    segments equal to `serray predict --segments` on the same file, with and without Content-Length."""
    from serray.predict import Predictor
    from serray.segment import segment_file, settings_of

    rec, spans = _recording(synthetic_root)
    rec = np.concatenate([rec, np.zeros(16000 * 30, np.float32)])  # 30 s of trailing silence
    body = encode_audio(rec)
    assert MAX_BODY_MB * 2**20 < len(body) < SEGMENTS_MAX_BODY_MB * 2**20
    status, res = request(srv, "POST", "/segments", body, chunked=chunked)
    assert status == 200, res
    assert len(res["segments"]) == len(spans)
    for seg, (a, b) in zip(res["segments"], spans):
        assert abs(seg["start"] - a) <= 0.4 and abs(seg["end"] - b) <= 0.4
        assert set(seg["probabilities"]) == {"neu", "hap", "sad", "ang"}
    assert res["aggregate"]["num_segments"] == len(spans) and res["file"] == "the request body"
    path = tmp_path / "rec.wav"
    path.write_bytes(body)
    offline = segment_file(Predictor.from_checkpoint(srv.checkpoint), path, settings_of(srv.cfg), min_seconds=0.25)
    assert [(s["start"], s["end"], s["label"]) for s in offline["segments"]] == \
        [(s["start"], s["end"], s["label"]) for s in res["segments"]]
    status, predict = request(srv, "POST", "/predict", body)
    assert status == 413 and "serve.max_body_mb" in predict["error"]


def test_segments_route_bad_input(srv):
    status, info = request(srv, "GET", "/info")
    assert info["serving"]["segments_max_body_mb"] == SEGMENTS_MAX_BODY_MB and info["serving"]["segment"]["vad"] == "silero"
    status, body = request(srv, "POST", "/segments", encode_audio(np.zeros(16000 * 4, np.float32)))
    assert status == 200 and body["segments"] == [] and body["message"].startswith("no speech found")
    status, body = request(srv, "POST", "/segments", b"OggS" + bytes(5000))
    assert status == 400 and "unsupported audio format: Ogg" in body["error"]
    status, body = request(srv, "POST", "/segments", b"")
    assert status == 400 and "empty" in body["error"]
    form, ctype = multipart([("file", "a.wav", clip_bytes())])
    status, body = request(srv, "POST", "/segments", form, content_type=ctype)
    assert status == 415 and "raw request body" in body["error"]
    big = encode_audio(np.zeros(int(SEGMENTS_MAX_BODY_MB * 2**20) // 2 + 1, np.float32))  # a WAV over the limit
    for chunked in (False, True):
        status, body = request(srv, "POST", "/segments", big, chunked=chunked)
        assert status == 413 and "serve.segments_max_body_mb" in body["error"], body


def test_segments_route_answers_before_the_body_has_arrived(srv):
    """Streaming, not buffering: an Ogg file is refused from its first chunk while the client still owes
    most of the 2 MB it announced (the answer comes without the rest being sent)."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        conn.putrequest("POST", "/segments")
        conn.putheader("Content-Type", "audio/wav")
        conn.putheader("Content-Length", str(2 * 2**20))
        conn.endheaders()
        conn.send(b"OggS" + bytes(65536))
        t0 = time.monotonic()
        r = conn.getresponse()
        answer = json.loads(r.read())
        assert r.status == 400 and "Ogg" in answer["error"] and time.monotonic() - t0 < 20
    finally:
        conn.close()


def test_segments_route_answers_after_clients_vanished_mid_body(srv, synthetic_root):
    """Clients that announce a body, send a little and go away (Serve cancels their handlers): the
    replica's one segmentation thread is released each time, so a normal recording is answered in
    seconds afterwards; before, every later /segments on the replica hung until Serve's timeout."""
    rec, spans = _recording(synthetic_root, n=3)
    body = encode_audio(rec)
    for _ in range(3):  # more than serve.segments_max_ongoing (2): slots come back too
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        sock.sendall(b"POST /segments HTTP/1.1\r\nHost: x\r\nContent-Type: audio/wav\r\n"
                     b"Content-Length: %d\r\n\r\n" % (2 * 2**20) + body[:100_000])
        time.sleep(1.0)  # spooled, the decoding thread waits for the rest
        sock.close()
    time.sleep(0.5)
    t0 = time.monotonic()
    status, res = request(srv, "POST", "/segments", body)
    took = time.monotonic() - t0
    print(f"POST /segments after 3 vanished clients: {status} in {took:.2f} s")
    assert status == 200 and len(res["segments"]) == len(spans), res
    assert took < 15.0, f"answered after {took:.1f} s"
    status, health = request(srv, "GET", "/healthz")
    assert status == 200
