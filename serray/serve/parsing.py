"""HTTP request parsing for ``POST /predict``: content type, size-limited body, multipart upload.

No Ray and no FastAPI in here (only a Starlette-like ``request.headers`` / ``request.stream()``),
so every rule can be tested without a server. Every way a request can be unusable is a
:class:`RequestError` carrying the HTTP status code and a message that names the problem.
"""

from __future__ import annotations

from email.message import Message
from typing import Dict, List, Optional, Tuple

#: Content types ``POST /predict`` accepts as a raw body (WAV or FLAC bytes).
AUDIO_TYPES = ("audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave", "audio/flac", "audio/x-flac",
               "application/octet-stream")
MULTIPART = "multipart/form-data"
#: Multipart field names tried first for the audio file (then the first part with a filename).
FILE_FIELDS = ("file", "audio")


class RequestError(Exception):
    """A client error: ``status`` (4xx) and a message for the ``{"error": ...}`` body."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _header_params(name: str, value: str) -> Message:
    m = Message()
    m[name] = value
    return m


def media_type(content_type: Optional[str]) -> Tuple[str, Dict[str, str]]:
    """``'audio/wav; rate=16000'`` -> ``('audio/wav', {'rate': '16000'})``; lower-cased type."""
    if not content_type:
        return "", {}
    m = _header_params("content-type", content_type)
    params = {k.lower(): v for k, v in (m.get_params() or [])[1:]}
    return content_type.split(";", 1)[0].strip().lower(), params


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


def _too_large(size: int, max_bytes: int, how: str) -> RequestError:
    return RequestError(413, f"request body too large: {how} {size} bytes > limit {max_bytes} bytes "
                             f"({max_bytes / 2**20:g} MB, serve.max_body_mb)")


async def read_body(request, max_bytes: int) -> bytes:
    """The whole request body, refused with 413 as soon as it is known to exceed ``max_bytes``.

    Checks the Content-Length header first, then counts the streamed bytes (which also covers
    chunked bodies without a length and clients that send more than they announced).
    """
    length = request.headers.get("content-length")
    if length is not None:
        try:
            n = int(length)
        except ValueError:
            raise RequestError(400, f"invalid Content-Length header: {length!r}") from None
        if n > max_bytes:
            raise _too_large(n, max_bytes, "Content-Length")
    chunks: List[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(size, max_bytes, "streamed more than")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_multipart(body: bytes, boundary: Optional[str]) -> List[Tuple[Dict[str, str], bytes]]:
    """The parts of a ``multipart/form-data`` body as ``(headers (lower-case names), content)``."""
    if not boundary:
        raise RequestError(400, "multipart/form-data Content-Type without a boundary parameter")
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    segments = (b"\r\n" + body).split(delimiter)
    if len(segments) < 2:
        raise RequestError(400, "malformed multipart/form-data body: the boundary does not occur in it")
    parts = []
    for seg in segments[1:]:
        if seg.startswith(b"--"):  # the closing delimiter
            return parts
        eol = seg.find(b"\r\n")
        if eol < 0:
            break
        seg = seg[eol + 2:]
        if seg.startswith(b"\r\n"):  # a part without headers
            head, content = b"", seg[2:]
        else:
            head, sep, content = seg.partition(b"\r\n\r\n")
            if not sep:
                break
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        parts.append((headers, content))
    raise RequestError(400, "malformed or truncated multipart/form-data body (no closing boundary)")


def audio_from_multipart(body: bytes, boundary: Optional[str]) -> bytes:
    """The audio file of an upload: field ``file`` (or ``audio``), else the first part with a filename."""
    named, with_file = {}, []
    for headers, content in parse_multipart(body, boundary):
        disp = _header_params("content-disposition", headers.get("content-disposition", ""))
        name = disp.get_param("name", header="content-disposition")
        if isinstance(name, str):
            named.setdefault(name, content)
        if disp.get_filename() is not None:
            with_file.append(content)
    for field in FILE_FIELDS:
        if field in named:
            return named[field]
    if with_file:
        return with_file[0]
    raise RequestError(400, "the multipart/form-data body has no file part: upload the audio as the field 'file' "
                            "(e.g. curl -F file=@clip.wav http://HOST:PORT/predict)")


async def audio_bytes(request, max_bytes: int) -> bytes:
    """Content type check (415), size-limited read (413), multipart unwrapping and empty check (400)."""
    kind, params = check_content_type(request.headers.get("content-type"))
    body = await read_body(request, max_bytes)
    if kind == MULTIPART:
        body = audio_from_multipart(body, params.get("boundary"))
        if not body:
            raise RequestError(400, "empty audio: the uploaded file has no bytes")
    elif not body:
        raise RequestError(400, "empty request body: send a WAV or FLAC file as the body "
                                "(e.g. curl --data-binary @clip.wav -H 'Content-Type: audio/wav' ...)")
    return body
