"""HTTP request parsing for ``POST /predict``: content type, size-limited body, multipart upload.

No Ray and no FastAPI in here (only a Starlette-like ``request.headers`` / ``request.stream()``),
so every rule can be tested without a server. Every way a request can be unusable is a
:class:`RequestError` carrying the HTTP status code and a message that names the problem.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Awaitable, Callable, Dict, List, Optional, Tuple

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

#: Content types ``POST /predict`` accepts as a raw body (WAV or FLAC bytes).
AUDIO_TYPES = ("audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave", "audio/flac", "audio/x-flac",
               "application/octet-stream")
MULTIPART = "multipart/form-data"
#: Multipart field names tried first for the audio file (then the first part with a filename).
FILE_FIELDS = ("file", "audio")
#: A form upload of one audio file needs a handful of parts; more is refused (400) while parsing.
MAX_PARTS = 16
#: RFC 2046: a boundary is 1-70 characters of this set (not ending in a space).
_BOUNDARY = re.compile(r"^[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]$")
#: Header lines of one part are refused beyond this size / count (python-multipart's limits).
MAX_PART_HEADER_BYTES = 8192
MAX_PART_HEADERS = 16


class RequestError(Exception):
    """A client error: ``status`` (4xx) and a message for the ``{"error": ...}`` body."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def media_type(content_type: Optional[str]) -> Tuple[str, Dict[str, str]]:
    """``'audio/wav; rate=16000'`` -> ``('audio/wav', {'rate': '16000'})``; lower-cased type and names.

    Parsed by python-multipart (the parser Starlette uses); RFC 2231 extended parameters
    (``name*=...``), which RFC 7578 forbids in form data, are ignored. A header it cannot parse is a 400.
    """
    if not content_type:
        return "", {}
    try:
        kind, params = parse_options_header(content_type)
        return (kind.decode("latin-1").strip().lower(),
                {k.decode("latin-1").strip().lower(): v.decode("latin-1") for k, v in params.items()})
    except (ValueError, UnicodeError) as e:
        raise RequestError(400, f"malformed Content-Type header: {e}") from None


def check_content_type(content_type: Optional[str]) -> Tuple[str, Dict[str, str]]:
    """The request's media type, or a 415 :class:`RequestError`.

    A request without a Content-Type header is taken as ``application/octet-stream`` (RFC 9110
    lets a recipient assume that); the bytes must still decode as WAV/FLAC.
    """
    kind, params = media_type(content_type)
    if not kind:
        return "application/octet-stream", {}
    if kind in AUDIO_TYPES or kind == MULTIPART:
        return kind, params
    raise RequestError(415, f"unsupported Content-Type '{kind}': send a WAV or FLAC file as the request body with "
                            f"Content-Type {', '.join(AUDIO_TYPES)}, or as a {MULTIPART} upload (field 'file')")


def _too_large(size: int, max_bytes: int, how: str, key: str = "serve.max_body_mb") -> RequestError:
    return RequestError(413, f"request body too large: {how} {size} bytes > limit {max_bytes} bytes "
                             f"({max_bytes / 2**20:g} MB, {key})")


def _timeout(seconds: float, key: str = "serve.body_timeout_s") -> RequestError:
    return RequestError(408, f"request body not received within {seconds:g} s ({key}): "
                             "send the whole file at once")


def declared_length(request, max_bytes: int, key: str = "serve.max_body_mb") -> Optional[int]:
    """The Content-Length (None when absent), or a 400 (malformed) / 413 (over ``max_bytes``)."""
    length = request.headers.get("content-length")
    if length is None:
        return None
    try:
        n = int(length)
        if n < 0:
            raise ValueError(length)
    except ValueError:
        raise RequestError(400, f"invalid Content-Length header: {length!r}") from None
    if n > max_bytes:
        raise _too_large(n, max_bytes, "Content-Length", key)
    return n


async def read_body(request, max_bytes: int, timeout_s: Optional[float] = None) -> bytes:
    """The whole request body, refused with 413 as soon as it is known to exceed ``max_bytes`` and
    with 408 when it has not fully arrived ``timeout_s`` after the handler started reading.

    Checks the Content-Length header first, then counts the streamed bytes (which also covers
    chunked bodies without a length and clients that send more than they announced).
    """
    declared_length(request, max_bytes)
    return b"".join([chunk async for chunk in iter_body(request, max_bytes, timeout_s)])


async def iter_body(request, max_bytes: int, timeout_s: Optional[float] = None,
                    size_key: str = "serve.max_body_mb", time_key: str = "serve.body_timeout_s"):
    """The request body chunk by chunk as it arrives, with :func:`read_body`'s 413 / 408 / 400 rules
    (``size_key`` / ``time_key``: the config keys the messages name)."""
    size = 0
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    stream = request.stream().__aiter__()
    while True:
        try:
            if deadline is None:
                chunk = await stream.__anext__()
            else:
                chunk = await asyncio.wait_for(stream.__anext__(), max(0.0, deadline - time.monotonic()))
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise _timeout(timeout_s, time_key) from None
        except Exception as e:  # starlette.requests.ClientDisconnect and friends
            if type(e).__name__ == "ClientDisconnect":
                raise RequestError(400, "the client disconnected before sending the whole body") from None
            raise
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(size, max_bytes, "streamed more than", size_key)
        if chunk:
            yield chunk


def check_boundary(boundary: Optional[str]) -> bytes:
    """The multipart boundary as bytes, or a 400 naming what is wrong with it."""
    if not boundary:
        raise RequestError(400, "multipart/form-data Content-Type without a boundary parameter")
    if not _BOUNDARY.match(boundary):
        raise RequestError(400, f"invalid multipart boundary {boundary[:80]!r}: RFC 2046 allows 1-70 characters "
                                "(letters, digits and '()+_,-./:=? ), not ending in a space")
    return boundary.encode("latin-1")


def parse_multipart(body: bytes, boundary: Optional[str], max_parts: int = MAX_PARTS
                    ) -> List[Tuple[Dict[str, str], bytes]]:
    """The parts of a ``multipart/form-data`` body as ``(headers (lower-case names), content)``.

    python-multipart's streaming parser; more than ``max_parts`` parts, a part header over
    :data:`MAX_PART_HEADER_BYTES` / :data:`MAX_PART_HEADERS`, a malformed or a truncated body
    (no closing boundary) are a 400, found without a second pass over the body.
    """
    parts: List[Tuple[Dict[str, str], bytes]] = []
    state = {"field": [], "value": [], "headers": {}, "data": [], "ended": False}

    def on_part_begin():
        if len(parts) >= max_parts:
            raise RequestError(400, f"too many parts in the multipart/form-data body: more than {max_parts}; "
                                    "upload the audio as one field 'file'")
        state["headers"], state["data"] = {}, []

    def on_header_field(data, start, end):
        state["field"].append(data[start:end])

    def on_header_value(data, start, end):
        state["value"].append(data[start:end])

    def on_header_end():
        name = b"".join(state["field"]).decode("latin-1").strip().lower()
        state["headers"][name] = b"".join(state["value"]).decode("latin-1").strip()
        state["field"], state["value"] = [], []

    def on_part_data(data, start, end):
        state["data"].append(data[start:end])

    def on_part_end():
        parts.append((state["headers"], b"".join(state["data"])))

    def on_end():
        state["ended"] = True

    callbacks = {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                 "on_header_value": on_header_value, "on_header_end": on_header_end,
                 "on_part_data": on_part_data, "on_part_end": on_part_end, "on_end": on_end}
    try:
        parser = MultipartParser(check_boundary(boundary), callbacks, max_header_count=MAX_PART_HEADERS,
                                 max_header_size=MAX_PART_HEADER_BYTES)
        parser.write(body)
        parser.finalize()
    except FormParserError as e:
        raise RequestError(400, f"malformed multipart/form-data body: {e}") from None
    if not state["ended"]:
        raise RequestError(400, "malformed or truncated multipart/form-data body (no closing boundary)")
    return parts


def audio_from_multipart(body: bytes, boundary: Optional[str]) -> bytes:
    """The audio file of an upload: field ``file`` (or ``audio``), else the first part with a filename."""
    named, with_file = {}, []
    for headers, content in parse_multipart(body, boundary):
        _, disp = media_type(headers.get("content-disposition", ""))
        name = disp.get("name")
        if name is not None:
            named.setdefault(name, content)
        if "filename" in disp:
            with_file.append(content)
    for field in FILE_FIELDS:
        if field in named:
            return named[field]
    if with_file:
        return with_file[0]
    raise RequestError(400, "the multipart/form-data body has no file part: upload the audio as the field 'file' "
                            "(e.g. curl -F file=@clip.wav http://HOST:PORT/predict)")


async def audio_bytes(request, max_bytes: int, timeout_s: Optional[float] = None,
                      offload: Optional[Callable[..., Awaitable]] = None) -> bytes:
    """Content type check (415 / 400), size- and time-limited read (413 / 408), multipart unwrapping
    (400; run through ``offload(fn, *args)``, e.g. a thread pool, when given) and empty check (400)."""
    kind, params = check_content_type(request.headers.get("content-type"))
    if kind == MULTIPART:
        check_boundary(params.get("boundary"))  # before reading a byte of the body
    body = await read_body(request, max_bytes, timeout_s)
    if kind == MULTIPART:
        if offload is not None:
            body = await offload(audio_from_multipart, body, params.get("boundary"))
        else:
            body = audio_from_multipart(body, params.get("boundary"))
        if not body:
            raise RequestError(400, "empty audio: the uploaded file has no bytes")
    elif not body:
        raise RequestError(400, "empty request body: send a WAV or FLAC file as the body "
                                "(e.g. curl --data-binary @clip.wav -H 'Content-Type: audio/wav' ...)")
    return body
