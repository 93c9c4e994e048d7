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
show them arrive: an Ogg file is refused after its first chunk, without reading the rest (with or without
a Content-Length). Work is bounded too: more than ``serve.segments_max_seconds`` of decoded audio is a
413 (from the header, else while decoding), only PCM / float / G.711 samples are decoded, and at most
``serve.segments_max_ongoing`` requests are admitted per replica (:class:`SegmentJobs`; 503 beyond).

However a request ends -- its answer, a client error, Serve cancelling the handler (its
``request_timeout_s``, a client that went away), a spooling error -- the decoding thread is woken
(its reads end), and the spooled file and the admission slot are released once both the handler and
the thread are done with them; the replica's health check fails on a job that makes no progress.
"""

from __future__ import annotations

import asyncio
import io
import os
import tempfile
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple

from serray.data.audio import SERVED_SUBTYPES, AudioTooLong
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
        self.progress = time.monotonic()  # last byte received or read (SegmentJobs.stalled)
        self.receiving = False  # the handler is still reading the body (bounded by the body timeout)

    def touch(self) -> None:
        self.progress = time.monotonic()

    # ------------------------------------------------------------------ the writer (the event loop)

    def append(self, chunk: bytes) -> None:
        os.pwrite(self._fd, chunk, self.size)
        with self._cond:
            self.size += len(chunk)
            self.progress = time.monotonic()
            self._cond.notify_all()

    def finish(self) -> None:
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        """End the body with ``error``: a waiting reader wakes, and every later read ends (also after
        :meth:`finish`, e.g. a request cancelled while its recording is decoded)."""
        with self._cond:
            self._error, self._done = error, True
            self._cond.notify_all()

    @property
    def done(self) -> bool:
        return self._done

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
        if self._error is not None:  # failed (cancelled): the decoder sees the end of the file
            return 0
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
        self.progress = time.monotonic()
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: None}[whence]
        self._pos = max(0, (self.length() if base is None else base) + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        """Wake a waiting reader (its reads end) and remove the file; call once the reader is done."""
        if not self._done:
            self.fail(RuntimeError("the request ended"))
        if not self.closed:
            self._tmp.close()
        super().close()


class SegmentJobs:
    """A replica's ``POST /segments`` work: admission and the job in the segmentation thread.

    At most ``limit`` requests are admitted at once (receiving, waiting for the thread or decoding;
    ``serve.segments_max_ongoing``); one more is answered 503 at once, so long uploads never take the
    request slots ``POST /predict`` needs. A slot is released when the request's decoding job has ended,
    not when its handler returns (a cancelled request's job still holds the thread until it stops).
    :meth:`stalled` tells the replica's health check that the running job has made no progress (no body
    byte received, none decoded) for ``stall_s`` seconds.
    """

    def __init__(self, limit: int, stall_s: float = 120.0):
        self.limit, self.stall_s = int(limit), float(stall_s)
        self.active = 0
        self.running: Optional[GrowingFile] = None  # the body the segmentation thread works on
        self._lock = threading.Lock()

    def admit(self) -> None:
        with self._lock:
            if self.active >= self.limit:
                raise RequestError(503, f"{self.active} recordings are already being received or segmented on "
                                        f"this replica (serve.segments_max_ongoing={self.limit}): retry later")
            self.active += 1

    def release(self) -> None:
        with self._lock:
            self.active -= 1

    def stalled(self) -> Optional[float]:
        """Seconds without progress of the running job when over ``stall_s``, else None."""
        body = self.running
        if body is None or (body.receiving and not body.done):
            return None  # waiting for a client that is still sending: the body timeout bounds that, not this
        idle = time.monotonic() - body.progress
        return idle if idle > self.stall_s else None


async def segments_answer(request, svc, seg: Dict[str, Any], settings: Dict[str, Any],
                          run: Callable[..., "asyncio.Future"], jobs: Optional[SegmentJobs] = None
                          ) -> Tuple[int, Any]:
    """``(status, answer)`` of one ``POST /segments``: the result dict with 200, else an error message.

    ``svc``: the replica's :class:`~serray.serve.service.SERService`; ``run(fn, *args)``: runs ``fn`` in
    the replica's segmentation thread and returns an awaitable; ``jobs``: the replica's admission (None:
    no limit). However the handler ends (an answer, a client error, Serve's request timeout or a client
    that went away cancelling it, a spooling error), the decoding thread is released and the spooled
    file removed.
    """
    from serray.segment import segment_file

    jobs = jobs or SegmentJobs(1 << 30)
    max_bytes = int(float(settings["segments_max_body_mb"]) * 2**20)
    max_seconds = settings.get("segments_max_seconds")
    kind, _ = check_content_type(request.headers.get("content-type"))
    if kind == MULTIPART:
        raise RequestError(415, "POST /segments takes the recording as the raw request body (Content-Type "
                                f"{', '.join(AUDIO_TYPES)}; e.g. curl --data-binary @call.wav -H "
                                "'Content-Type: audio/wav' .../segments), not as a form upload, so it can be "
                                "decoded while it arrives")
    declared = declared_length(request, max_bytes, SIZE_KEY)
    jobs.admit()
    try:
        body = GrowingFile(declared)
    except OSError as e:  # no room for a spool file
        jobs.release()
        raise RequestError(507, f"the replica cannot store the request body: {e.strerror or e}") from None

    def work():
        s = svc.settings
        jobs.running = body
        body.touch()
        try:
            return segment_file(svc.predictor, body, seg, min_seconds=float(s["min_seconds"]), total=body.length,
                                what="the request body", max_channels=int(s["max_channels"]),
                                min_sample_rate=int(s["min_sample_rate"]), max_sample_rate=int(s["max_sample_rate"]),
                                max_seconds=None if max_seconds is None else float(max_seconds),
                                subtypes=SERVED_SUBTYPES)
        finally:
            jobs.running = None

    owners = [2]  # the handler and the decoding job: the file and the slot go when both are done with them

    def drop() -> None:
        owners[0] -= 1
        if owners[0] == 0:
            body.close()
            jobs.release()

    try:
        task = asyncio.ensure_future(run(work))
    except BaseException:
        body.close()
        jobs.release()
        raise

    def ended(t: "asyncio.Future") -> None:
        if not t.cancelled():
            t.exception()  # retrieved: a failed job whose request already has its answer is not logged
        drop()

    task.add_done_callback(ended)
    nxt: Optional["asyncio.Future"] = None
    body.receiving = True
    try:
        try:
            chunks = iter_body(request, max_bytes, float(settings["segments_body_timeout_s"]), SIZE_KEY, TIME_KEY)
            while True:  # the next chunk, or the decoder's answer (e.g. not WAV / FLAC) if that comes first
                nxt = asyncio.ensure_future(chunks.__anext__())
                await asyncio.wait({nxt, task}, return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():
                    break
                try:
                    chunk = nxt.result()
                except StopAsyncIteration:
                    break
                if task.done():  # answered already (e.g. not WAV / FLAC): the rest is not needed
                    break
                body.append(chunk)
            if declared is not None and body.size < declared and not task.done():
                raise RequestError(400, f"the body ended after {body.size} of the {declared} bytes its "
                                        "Content-Length announced")
            body.finish()
        except RequestError as e:
            body.fail(e)  # the decoder stops at once: the body's error is the answer
            raise
        except OSError as e:  # spooling failed (a full disk, a spool directory gone)
            body.fail(e)
            raise RequestError(507, f"the replica cannot store the request body: {e.strerror or e}") from None
        except BaseException as e:  # cancelled (Serve's request_timeout_s, a client gone) or a bug: release the reader
            body.fail(e if isinstance(e, Exception) else RuntimeError("the request was cancelled"))
            raise
        finally:
            body.receiving = False
            if nxt is not None and not nxt.done():
                nxt.cancel()
        try:
            # shielded: cancelling the handler must not cancel the wrapper of a thread that still reads the
            # body (its file and slot would be released under it); the body is failed instead, so it stops
            return 200, await asyncio.shield(task)
        except asyncio.CancelledError:
            body.fail(RuntimeError("the request was cancelled"))
            raise
        except AudioTooLong as e:
            return 413, f"{e} (serve.segments_max_seconds)"
        except AudioError as e:
            return 400, str(e)
    finally:
        drop()
