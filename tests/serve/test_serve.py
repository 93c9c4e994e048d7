"""The Ray Serve endpoint over real HTTP (127.0.0.1, a free port): predictions, bad input, batching.

One module-scoped deployment of a random-init classifier registered in a tmp registry (served as the
registry's best entry), plus an unbatched one built through ``app_builder``. Serve is shut down at
the end of the module; Ray (the session's ``ray_session``) is left running.
"""

import http.client
import json
import socket
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from serray.serve.demo import encode_audio, synthetic_clip

pytestmark = pytest.mark.ray

MAX_BODY_MB = 0.5
MAX_SECONDS = 5.0


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
    from serray.registry import model_dir, register
    from serray.serve.app import run_server
    from serray.serve.demo import make_demo_checkpoint

    base = tmp_path_factory.mktemp("serve")
    ck = make_demo_checkpoint(base / "checkpoint", seed=0)
    reg = base / "registry"
    loso = {"protocol": "inductive", "folds": [1, 2, 3, 4, 5]}  # what `best` compares (the default config's run)
    other = register(reg, ck, metrics={"ua": 0.90, "val_ua": 0.40}, config_yaml="{}\n", source="test", extra=loso)
    best = register(reg, ck, metrics={"ua": 0.55, "wa": 0.6, "val_ua": 0.55}, config_yaml=(ck / "config.yaml").read_text(),
                    source="test", extra=loso)
    port = _free_port()
    overrides = [f"output_dir={base}", f"registry.dir={reg}", f"serve.port={port}", f"serve.max_body_mb={MAX_BODY_MB}",
                 f"serve.max_seconds={MAX_SECONDS}", "serve.batch_wait_timeout_s=0.2", "serve.max_batch_size=16",
                 "ray.progress_bars=false"]
    cfg = load_config(None, overrides)
    run_server(cfg, blocking=False, logging_config={"enable_access_log": False})
    from serray.registry import get_entry

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
    assert info["encoder"]["encoder"] == "fbank" and info["encoder"]["dim"] == 80
    assert info["config"]["encoder"]["name"] == "fbank"
    assert info["serving"]["batching"] is True and info["serving"]["max_batch_size"] == 16
    status, body = request(srv, "GET", "/no-such-route")
    assert status == 404 and "error" in body


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
])
def test_formats_accepted(srv, name, make, ctype):
    status, body = request(srv, "POST", "/predict", make(), content_type=ctype)
    assert status == 200, (name, body)
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


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


BAD = [  # name, body, content type, status, words the error names
    ("empty body", b"", "audio/wav", 400, "empty"),
    ("not audio", b"this is certainly not a wav file\n" * 64, "audio/wav", 400, "decode"),
    ("truncated header", clip_bytes(1.5)[:40], "audio/wav", 400, "decode"),
    ("truncated data", clip_bytes(1.5)[:30000], "audio/wav", 400, "truncated"),
    ("corrupt flac", encode_audio(synthetic_clip(1.5), fmt="FLAC")[:3000], "audio/flac", 400, "decode"),
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
]


@pytest.mark.parametrize("name, body, ctype, status, words", BAD, ids=[b[0] for b in BAD])
def test_bad_input(srv, name, body, ctype, status, words):
    got, out = request(srv, "POST", "/predict", body, content_type=ctype)
    assert got == status, (name, out)
    assert set(out) == {"error"} and words.lower() in out["error"].lower(), out
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


# ---------------------------------------------------------------------------- no server needed


def test_deployment_options_from_config():
    from serray.config import load_config
    from serray.serve.app import deployment_options

    from omegaconf import OmegaConf

    fixed = deployment_options(OmegaConf.to_container(load_config(None, ["serve.num_replicas=3", "serve.num_cpus=1"]).serve))
    assert fixed["num_replicas"] == 3 and fixed["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert fixed["max_ongoing_requests"] >= 16
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
