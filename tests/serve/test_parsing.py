"""Request parsing of ``POST /predict`` without a server: content types, multipart, body limits and timeouts."""

from __future__ import annotations

import asyncio
import time

import pytest

from serray.serve.parsing import (MAX_PARTS, MULTIPART, RequestError, audio_bytes, audio_from_multipart,
                                  check_content_type, media_type, parse_multipart, read_body)

B = "----serray-test-7d1f"


def multipart(fields, boundary=B) -> bytes:
    out = b""
    for name, filename, data in fields:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


class FakeRequest:
    """What the parser uses of a Starlette request: ``headers`` and ``stream()``."""

    def __init__(self, chunks, headers=None, delay=0.0):
        self.chunks, self.headers, self.delay = list(chunks), {k.lower(): v for k, v in (headers or {}).items()}, delay

    async def stream(self):
        for c in self.chunks:
            if self.delay:
                await asyncio.sleep(self.delay)
            yield c


def run(coro):
    return asyncio.run(coro)


def status_of(fn):
    try:
        fn()
    except RequestError as e:
        return e.status, e.message
    return None


# ---------------------------------------------------------------- content types


@pytest.mark.parametrize("ctype, status", [
    ("multipart/form-data; boundary*=utf-8''%E2%98%83", 400),  # RFC 2231 form: was an AttributeError (500)
    ("multipart/form-data; boundary*=''", 400),
    ('multipart/form-data; boundary="unterminated', 400),
    ("multipart/form-data; boundary=" + "a" * 71, 400),  # RFC 2046: at most 70
    ("multipart/form-data; boundary=\u00e9", 400),
    ("multipart/form-data; boundary=\x00", 400),
    ("multipart/form-data", 400),
    ("text/plain", 415),
    ("a/b/c", 415),
])
def test_malformed_content_type_is_4xx(ctype, status):
    async def go():
        return await audio_bytes(FakeRequest([multipart([("file", "a.wav", b"RIFF")])], {"content-type": ctype}), 10**6)

    got = status_of(lambda: run(go()))
    assert got is not None and got[0] == status, (ctype, got)


def test_boundary_limits_both_sides():
    body = multipart([("file", "a.wav", b"RIFF")], boundary="b" * 70)
    assert audio_from_multipart(body, "b" * 70) == b"RIFF"
    assert status_of(lambda: audio_from_multipart(body, "b" * 71))[0] == 400


def test_media_type_parameters():
    assert media_type("Audio/WAV; Rate=16000") == ("audio/wav", {"rate": "16000"})
    assert media_type('multipart/form-data; boundary="a;b=c"')[1]["boundary"] == "a;b=c"
    assert check_content_type(None) == ("application/octet-stream", {})
    assert check_content_type("audio/x-flac; charset=binary")[0] == "audio/x-flac"


# ---------------------------------------------------------------- multipart


def test_multipart_part_limit_both_sides():
    fields = [(f"n{i}", None, b"x") for i in range(MAX_PARTS - 1)] + [("file", "a.wav", b"RIFF")]
    assert len(parse_multipart(multipart(fields), B)) == MAX_PARTS
    assert audio_from_multipart(multipart(fields), B) == b"RIFF"
    status, message = status_of(lambda: audio_from_multipart(multipart([("n", None, b"x")] + fields), B))
    assert status == 400 and "too many parts" in message


def test_many_parts_are_refused_in_bounded_time():
    """10 MB of tiny parts (400k): the hand-written parser spent 11 s on the event loop; now it stops
    at part MAX_PARTS + 1."""
    body = (f"--{B}\r\n\r\nx\r\n" * 400_000 + f"--{B}--\r\n").encode()
    t0 = time.perf_counter()
    status, message = status_of(lambda: audio_from_multipart(body, B))
    assert status == 400 and "too many parts" in message
    assert time.perf_counter() - t0 < 0.5


@pytest.mark.parametrize("body, words", [
    (multipart([("file", "a.wav", b"RIFF" * 100)])[:-30], "truncated"),
    (b"not multipart at all", "malformed"),
    (f"--{B}\r\n".encode() + b"X" * 9000 + b": y\r\n\r\ndata\r\n" + f"--{B}--\r\n".encode(), "malformed"),  # header line > 8 KB
])
def test_malformed_multipart_bodies(body, words):
    status, message = status_of(lambda: audio_from_multipart(body, B))
    assert status == 400 and words in message


def test_multipart_field_choice():
    body = multipart([("note", None, b"hi"), ("other", "x.bin", b"OTHER"), ("file", "a.wav", b"RIFF")])
    assert audio_from_multipart(body, B) == b"RIFF"
    assert audio_from_multipart(multipart([("note", None, b"hi"), ("upload", "x.wav", b"DATA")]), B) == b"DATA"
    assert "no file part" in status_of(lambda: audio_from_multipart(multipart([("note", None, b"hi")]), B))[1]


def test_multipart_parsing_can_be_offloaded():
    calls = []

    async def offload(fn, *args):
        calls.append(fn.__name__)
        return fn(*args)

    async def go():
        req = FakeRequest([multipart([("file", "a.wav", b"RIFF")])], {"content-type": f"{MULTIPART}; boundary={B}"})
        return await audio_bytes(req, 10**6, offload=offload)

    assert run(go()) == b"RIFF" and calls == ["audio_from_multipart"]


# ---------------------------------------------------------------- body size and time


@pytest.mark.parametrize("declared, status", [("1000", None), ("1001", 413), ("-1", 400), ("12abc", 400)])
def test_content_length_limit_both_sides(declared, status):
    got = status_of(lambda: run(read_body(FakeRequest([b"x" * 10], {"content-length": declared}), 1000)))
    assert (got[0] if got else None) == status


def test_streamed_body_limit_both_sides():
    assert len(run(read_body(FakeRequest([b"x" * 500, b"x" * 500]), 1000))) == 1000
    assert status_of(lambda: run(read_body(FakeRequest([b"x" * 500, b"x" * 501]), 1000)))[0] == 413


def test_slow_body_times_out_with_408():
    t0 = time.perf_counter()
    got = status_of(lambda: run(read_body(FakeRequest([b"x"] * 100, delay=0.05), 10**6, timeout_s=0.3)))
    assert got[0] == 408 and "body_timeout_s" in got[1]
    assert time.perf_counter() - t0 < 1.0
    # the same body inside the limit is read
    assert len(run(read_body(FakeRequest([b"x"] * 4, delay=0.05), 10**6, timeout_s=2.0))) == 4


def test_client_disconnect_is_a_client_error():
    class ClientDisconnect(Exception):
        pass

    class Gone(FakeRequest):
        async def stream(self):
            yield b"x"
            raise ClientDisconnect()

    assert status_of(lambda: run(read_body(Gone([]), 1000)))[0] == 400
