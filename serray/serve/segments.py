"""``POST /segments``: a recording of any length, decoded while its body arrives, never held in memory.

The event loop writes the body's chunks to an anonymous temporary file as they arrive
(:class:`GrowingFile`); a worker thread decodes and segments it at the same time
(:func:`serray.segment.segment_file`), reading the file as it grows and waiting where it has not
arrived yet. libsndfile reads a header by seeking in it, which a file allows and a socket does not; the
file is gone when the request ends. Memory is the decoder's blocks and a few segments of audio, whatever
the body's size; disk is at most ``serve.segments_max_body_mb``.

Rules as ``POST /predict`` (:mod:`serray.serve.parsing`), with this route's own limits: a body over
``serve.segments_max_body_mb`` is a 413 (from its Content-Length before a byte is read, or as soon as
the streamed bytes exceed it), a body not received within ``serve.segments_body_timeout_s`` a 408, other
content types a 415 (a form upload too: send the recording as the raw body), and the container allowlist,
the header limits and the sample checks of every decode apply (400), found as soon as the bytes that
show them arrive: an Ogg file is refused after its first chunk, without reading the rest.
"""

from __future__ import annotations

import asyncio
import io
import os
import tempfile
import threading
from typing import Any, Callable, Dict, Optional, Tuple

from serray.errors import AudioError
from serray.serve.parsing import MULTIPART, AUDIO_TYPES, RequestError, check_content_type, declared_length, iter_body

SIZE_KEY, TIME_KEY = "serve.segments_max_body_mb", "serve.segments_body_timeout_s"
#: How often a waiting reader checks that the request is still alive (seconds).
_POLL_S = 1.0


class GrowingFile(io.RawIOBase):
    """A temporary file that one side appends to (:meth:`append`, :meth:`finish`, :meth:`fail`) while
    the other reads and seeks in it like a complete file of ``declared`` bytes (reads wait for the bytes;
    the length waits for the end when no Content-Length was sent)."""

    def __init__(self, declared: Optional[int] = None):
        super().__init__()
        self._tmp = tempfile.TemporaryFile(prefix="serray-segments-")
        self._fd = self._tmp.fileno()
        self.declared = declared
        self.size = 0
        self._pos = 0
        self._done = False
        self._error: Optional[BaseException] = None
        self._cond = threading.Condition()

    # ------------------------------------------------------------------ the writer (the event loop)

    def append(self, chunk: bytes) -> None:
        os.pwrite(self._fd, chunk, self.size)
        with self._cond:
            self.size += len(chunk)
            self._cond.notify_all()

    def finish(self) -> None:
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._cond:
            self._error, self._done = error, True
            self._cond.notify_all()

    # ------------------------------------------------------------------ the reader (the decoding thread)

    def _wait(self, ready: Callable[[], bool]) -> None:
        with self._cond:
            while not ready() and not self._done:
                self._cond.wait(_POLL_S)
            if self._error is not None:
                raise AudioError(f"the request body was not received: {self._error}")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def length(self) -> int:
        if self.declared is not None:
            return self.declared
        self._wait(lambda: False)
        return self.size

    def readinto(self, b) -> int:
        want = len(b)
        try:
            self._wait(lambda: self.size >= self._pos + want)
        except AudioError:  # called from libsndfile's read callback, which cannot raise: end of file
            return 0        # (the request's own error is the answer)
        n = max(0, min(want, self.size - self._pos))
        if n == 0:
            return 0
        data = os.pread(self._fd, n, self._pos)
        b[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: None}[whence]
        self._pos = max(0, (self.length() if base is None else base) + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if not self.closed:
            self._tmp.close()
        super().close()


async def segments_answer(request, svc, seg: Dict[str, Any], settings: Dict[str, Any],
                          run: Callable[..., "asyncio.Future"]) -> Tuple[int, Any]:
    """``(status, answer)`` of one ``POST /segments``: the result dict with 200, else an error message.

    ``svc``: the replica's :class:`~serray.serve.service.SERService`; ``run(fn, *args)``: runs ``fn`` in
    the replica's segmentation thread and returns an awaitable.
    """
    from serray.segment import segment_file

    max_bytes = int(float(settings["segments_max_body_mb"]) * 2**20)
    kind, _ = check_content_type(request.headers.get("content-type"))
    if kind == MULTIPART:
        raise RequestError(415, "POST /segments takes the recording as the raw request body (Content-Type "
                                f"{', '.join(AUDIO_TYPES)}; e.g. curl --data-binary @call.wav -H "
                                "'Content-Type: audio/wav' .../segments), not as a form upload, so it can be "
                                "decoded while it arrives")
    declared = declared_length(request, max_bytes, SIZE_KEY)
    body = GrowingFile(declared)

    def work():
        s = svc.settings
        return segment_file(svc.predictor, body, seg, min_seconds=float(s["min_seconds"]), total=body.length(),
                            what="the request body", max_channels=int(s["max_channels"]),
                            min_sample_rate=int(s["min_sample_rate"]), max_sample_rate=int(s["max_sample_rate"]))

    task = asyncio.ensure_future(run(work))
    try:
        try:
            chunks = iter_body(request, max_bytes, float(settings["segments_body_timeout_s"]), SIZE_KEY, TIME_KEY)
            while True:  # the next chunk, or the decoder's answer (e.g. not WAV / FLAC) if that comes first
                nxt = asyncio.ensure_future(chunks.__anext__())
                await asyncio.wait({nxt, task}, return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():
                    nxt.cancel()
                    break
                try:
                    body.append(nxt.result())
                except StopAsyncIteration:
                    break
            if declared is not None and body.size < declared and not task.done():
                raise RequestError(400, f"the body ended after {body.size} of the {declared} bytes its "
                                        "Content-Length announced")
            body.finish()
        except RequestError as e:
            body.fail(e)
            try:
                await task
            except Exception:  # the decoder stopped because the body failed: the body's error is the answer
                pass
            raise
        try:
            return 200, await task
        except AudioError as e:
            return 400, str(e)
    finally:
        body.close()
