"""Storage paths: a local directory or a pyarrow filesystem URI.

``features.dir``, ``pretrain.dir``, ``finetune.dir`` (Ray Train checkpoints included) and
``registry.dir`` accept either a local path (a shared mount such as EFS on a cluster) or a URI that
:func:`pyarrow.fs.FileSystem.from_uri` understands: ``s3://bucket/prefix``, ``gs://bucket/prefix``,
``hdfs://host/path``, ``file:///abs/path``. Query parameters pass through to pyarrow, e.g.
``s3://bucket/run?region=eu-west-1`` or, for an S3-compatible server,
``s3://bucket/run?endpoint_override=host:9000&scheme=http``. Credentials come from the usual
places (``AWS_*`` environment variables, instance roles, ``GOOGLE_APPLICATION_CREDENTIALS``).

How each kind of output uses it:

* Parquet features are read and written *in place* by Ray Data and pyarrow (any node, no copy);
* Ray Train / Tune checkpoints go straight to the URI (``storage_filesystem``);
* small outputs (an exported adapter, a fold's model and predictions, metrics, plots, a registry
  entry) are written to a local staging directory and uploaded when complete (:func:`staged`);
  readers download them into a local cache (:func:`local_copy`), keyed by URI.

Paths keep the form they were given in: functions that list or join return URIs for URIs (query
string kept) and plain paths for plain paths.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Iterator, List, Optional, Tuple
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

from serray.errors import DataError

CACHE_ENV = "SERRAY_CACHE_DIR"


def is_uri(path) -> bool:
    """True for ``scheme://...`` (``file://`` included), False for plain paths."""
    return "://" in str(path)


@lru_cache(maxsize=32)
def _filesystem(base: str) -> pafs.FileSystem:
    try:
        return pafs.FileSystem.from_uri(base)[0]
    except (ValueError, OSError) as e:  # pyarrow.ArrowInvalid is a ValueError
        raise DataError(f"cannot open the storage URI {redact(base)}: {redact_text(str(e))}") from None


def resolve(path) -> Tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)`` for a URI or a local path."""
    path = str(path)
    if not is_uri(path):
        return pafs.LocalFileSystem(), absolute(path)
    parts = urlsplit(path)
    base = urlunsplit((parts.scheme, parts.netloc, "/", parts.query, ""))
    fs = _filesystem(base)
    if parts.scheme == "file":
        return fs, parts.path
    return fs, (parts.netloc.rpartition("@")[2] + parts.path).rstrip("/")  # bucket/key, without credentials


def absolute(path) -> str:
    """A URI unchanged; a local path made absolute."""
    return str(path) if is_uri(path) else os.path.abspath(os.path.expanduser(str(path)))


def join(path, *parts: str) -> str:
    """``path/part/...`` keeping a URI's query string at the end."""
    path = str(path)
    if not is_uri(path):
        return str(Path(path, *parts))
    u = urlsplit(path)
    tail = "/".join(p.strip("/") for p in parts)
    return urlunsplit((u.scheme, u.netloc, u.path.rstrip("/") + "/" + tail, u.query, ""))


def name(path) -> str:
    """The last path component."""
    return (urlsplit(str(path)).path if is_uri(path) else str(path)).rstrip("/").rsplit("/", 1)[-1]


def _same_form(template: str, fs_path: str) -> str:
    """A path inside the filesystem of ``template``, written like ``template`` (URI or plain)."""
    if not is_uri(template):
        return fs_path
    u = urlsplit(template)
    if u.scheme == "file":
        return urlunsplit((u.scheme, u.netloc, fs_path, u.query, ""))
    bucket, _, rest = fs_path.partition("/")
    user = u.netloc.rpartition("@")[0]
    return urlunsplit((u.scheme, f"{user}@{bucket}" if user else bucket, "/" + rest, u.query, ""))


def split_uri(uri: str) -> Tuple[str, Optional[str], str, str]:
    """``(scheme, credentials, location, query)`` of a storage URI, for any character in the
    credentials: they are everything between ``://`` and the **last** ``@`` of the authority and path
    (so a secret holding ``/``, ``:`` or ``?`` stays whole; an ``@`` inside an object key makes the
    split err on the side of hiding), the location is bucket + path, the query what follows the first
    ``?`` after that. Used by every redaction: never a pattern over the text."""
    scheme, _, rest = str(uri).partition("://")
    at = rest.rfind("@")
    creds, rest = (rest[:at], rest[at + 1:]) if at >= 0 else (None, rest)
    location, _, query = rest.partition("?")
    return scheme, creds, location.split("#", 1)[0], query


def describe(path) -> str:
    """A path for messages (a URI without credentials or query string)."""
    if not is_uri(path):
        return str(path)
    scheme, _, location, _ = split_uri(str(path))
    return f"{scheme}://{location}"


#: Query parameters of a storage URI that are kept in messages and in ``GET /info``; every other
#: value (access_key, secret_key, session_token, ...) is masked, and a parameter serray does not know
#: is masked whole (its name could be part of a secret that held ``&``).
PUBLIC_QUERY_KEYS = ("region", "scheme", "endpoint_override")
SECRET_QUERY_KEYS = ("access_key", "secret_key", "session_token", "role_arn", "external_id", "password", "token")
_URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>,;()\[\]{}]+")


def _masked_query(query: str) -> str:
    parts = []
    for item in query.split("&") if query else []:
        k, eq, v = item.partition("=")
        parts.append(item if k in PUBLIC_QUERY_KEYS else f"{k}=***" if k in SECRET_QUERY_KEYS else "***")
    return "&".join(parts)


def redact(path) -> str:
    """A URI with its credentials (``user:secret@``, whatever characters they hold) and its non-public
    query values masked; anything else unchanged.
    ``s3://AK:SK@bucket/p?access_key=AK&region=x`` -> ``s3://***@bucket/p?access_key=***&region=x``."""
    text = str(path)
    if not is_uri(text):
        return text
    scheme, creds, location, query = split_uri(text)
    masked = _masked_query(query)
    return f"{scheme}://{'***@' if creds is not None else ''}{location}{'?' + masked if masked else ''}"


def without_credentials(path) -> str:
    """What a saved config keeps of a location: a URI without credentials and without any query
    parameter but the public ones (credentials then come from the environment, e.g.
    ``AWS_ACCESS_KEY_ID`` / ``AWS_PROFILE``, or the instance role); anything else unchanged."""
    text = str(path)
    if not is_uri(text):
        return text
    scheme, _, location, query = split_uri(text)
    kept = "&".join(i for i in (query.split("&") if query else []) if i.partition("=")[0] in PUBLIC_QUERY_KEYS)
    return f"{scheme}://{location}{'?' + kept if kept else ''}"


def strip_credentials(obj):
    """A copy of a config container (dicts, lists, strings) with every URI passed through
    :func:`without_credentials`: what every saved config holds."""
    if isinstance(obj, dict):
        return {k: strip_credentials(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strip_credentials(v) for v in obj]
    if isinstance(obj, str) and is_uri(obj):
        return without_credentials(obj)
    return obj


class RedactingFilter:
    """A logging filter that redacts every URI of a record's message (see :func:`redact_text`)."""

    def filter(self, record) -> bool:
        message = record.getMessage()
        if "://" in message:
            record.msg, record.args = redact_text(message), ()
        return True


def redact_text(text: str) -> str:
    """Every URI inside a message redacted (see :func:`redact`)."""
    return _URI_IN_TEXT.sub(lambda m: redact(m.group(0)), str(text))


def public_name(value) -> str:
    """What a client may see of a location: a URI without credentials or query (:func:`describe`),
    a local path reduced to its last component (``.../hubert-large``), any other text unchanged."""
    text = str(value)
    if is_uri(text):
        return describe(text)
    if text.startswith(("/", "~", "./", "../")) or (len(text) > 2 and text[1] == ":" and text[2] in "\\/"):
        return ".../" + text.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
    return text


def public_value(obj, path_keys=(), _prefix: str = ""):
    """A JSON-able copy for clients: the values of the dotted ``path_keys`` (local paths or URIs, or
    lists of them) through :func:`public_name`, every URI anywhere else redacted (:func:`redact_text`)."""
    if isinstance(obj, dict):
        return {k: public_value(v, path_keys, f"{_prefix}{k}.") for k, v in obj.items()}
    key = _prefix[:-1]
    if isinstance(obj, (list, tuple)):
        if key in path_keys:
            return [public_name(v) if isinstance(v, str) else v for v in obj]
        return [public_value(v, path_keys, _prefix) for v in obj]
    if isinstance(obj, str):
        return public_name(obj) if key in path_keys else redact_text(obj)
    return obj


def exists(path) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def is_file(path) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type == pafs.FileType.File


def is_dir(path) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type == pafs.FileType.Directory


def size(path) -> int:
    fs, p = resolve(path)
    return int(fs.get_file_info(p).size or 0)


def read_bytes(path) -> bytes:
    fs, p = resolve(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def read_text(path) -> str:
    return read_bytes(path).decode()


def write_bytes(path, data: bytes) -> None:
    """Write a whole file so that a reader sees the old file or the new one, never a part: locally
    through a uniquely named temporary file beside it (flushed to disk) and a rename; on object
    storage a PUT is all-or-nothing."""
    fs, p = resolve(path)
    if isinstance(fs, pafs.LocalFileSystem):
        import uuid

        target = Path(p)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return
    with fs.open_output_stream(p) as f:
        f.write(data)


def write_text(path, text: str) -> None:
    """Write a whole text file atomically (see :func:`write_bytes`)."""
    write_bytes(path, text.encode())


def makedirs(path) -> None:
    fs, p = resolve(path)
    fs.create_dir(p, recursive=True)


def remove(path) -> None:
    """Delete a file or a directory tree; nothing if it does not exist."""
    fs, p = resolve(path)
    t = fs.get_file_info(p).type
    if t == pafs.FileType.Directory:
        fs.delete_dir(p)
    elif t == pafs.FileType.File:
        fs.delete_file(p)


def listdir(path) -> List[str]:
    """The direct children of a directory (full paths in the form of ``path``), sorted; [] if absent."""
    fs, p = resolve(path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=False))
    return sorted(_same_form(str(path), i.path) for i in infos)


def find_files(path, suffix: str) -> List[str]:
    """Every file under ``path`` (recursive) whose name ends with ``suffix``, sorted."""
    fs, p = resolve(path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=True))
    return sorted(_same_form(str(path), i.path) for i in infos
                  if i.type == pafs.FileType.File and i.base_name.endswith(suffix))


def parquet_file(path):
    """A :class:`pyarrow.parquet.ParquetFile` for a local or remote file."""
    import pyarrow.parquet as pq

    fs, p = resolve(path)
    return pq.ParquetFile(fs.open_input_file(p))


def ray_paths(paths: List[str]) -> Tuple[List[str], pafs.FileSystem | None]:
    """Paths and filesystem to hand to ``ray.data.read_parquet`` / ``write_parquet``."""
    if not paths or not is_uri(paths[0]):
        return list(paths), None
    fs = resolve(paths[0])[0]
    return [resolve(p)[1] for p in paths], fs


def train_storage(path) -> Tuple[str, pafs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for Ray Train / Tune ``RunConfig``."""
    fs, p = resolve(path)
    return p, (fs if is_uri(path) else None)


#: Files that say "the directory they sit in is complete" (a checkpoint's ``meta.json``, a fold's
#: ``fold_result.json``, a registry ``entry.json``, the features' metadata): :func:`upload` sends them last.
DONE_MARKERS = ("meta.json", "fold_result.json", "entry.json", "_serray_features.json")


def upload(local_dir, path, last: Tuple[str, ...] = DONE_MARKERS) -> None:
    """Copy a local directory tree into ``path`` (files are overwritten, others kept).

    Files named in ``last`` are uploaded after every other file, deepest first, so on object storage
    a "done" marker never exists before what it vouches for (an interrupted upload looks unfinished).
    """
    fs, p = resolve(path)
    fs.create_dir(p, recursive=True)
    root = Path(local_dir).resolve()
    files = sorted((f for f in root.rglob("*") if f.is_file()), key=lambda f: (f.name in last, -len(f.parts), str(f)))
    local = pafs.LocalFileSystem()
    made = set()
    for f in files:
        rel = f.relative_to(root).as_posix()
        dest = f"{p.rstrip('/')}/{rel}"
        parent = dest.rsplit("/", 1)[0]
        if parent not in made:
            fs.create_dir(parent, recursive=True)
            made.add(parent)
        pafs.copy_files(str(f), dest, source_filesystem=local, destination_filesystem=fs)


class Busy(DataError):
    """Another process holds the lock of a storage path (:func:`lock` with ``wait=False``)."""


@contextlib.contextmanager
def lock(path, wait: bool = True, what: str = "another serray process", shared: bool = False) -> Iterator[None]:
    """An exclusive lock on a storage path for this machine (an ``fcntl`` lock file beside a local
    path; in the local cache for a URI): two processes that would write the same output run one
    after the other, and the second then finds the first one's result. ``wait=False``: raise
    :class:`Busy` at once instead (naming ``what`` holds it and its pid). ``shared=True``: a reader's
    lock, held by any number of readers at once and refused while a writer holds the exclusive one."""
    import fcntl

    if is_uri(path):
        lock_file = cache_dir(path).with_suffix(".lock")
    else:
        lock_file = Path(absolute(path)).with_name("." + Path(absolute(path)).name + ".lock")
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+") as f:
        try:
            fcntl.flock(f, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise Busy(f"{describe(path)} is in use by {what} (pid {holder}; lock file {lock_file}); "
                       "wait for it to finish, or use another directory") from None
        try:
            if not shared:  # a writer leaves its pid for the message above; readers leave the file alone
                f.seek(0)
                f.truncate()
                f.write(str(os.getpid()))
                f.flush()
            yield
        finally:
            if not shared:
                f.seek(0)
                f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)


def cache_dir(path) -> Path:
    """The local cache directory of a URI (``$SERRAY_CACHE_DIR`` or ``~/.cache/serray/storage``)."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "serray" / "storage")
    key = hashlib.sha256(str(path).encode()).hexdigest()[:16]
    return root / f"{name(path) or 'root'}-{key}"


def local_copy(path, refresh: bool = True) -> Path:
    """A local directory with the contents of ``path``: itself when local, else a downloaded copy
    (``refresh=False``: reuse an earlier download, for immutable things such as registry entries)."""
    if not is_uri(path):
        return Path(path)
    fs, p = resolve(path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        raise DataError(f"{describe(path)} does not exist")
    dest = cache_dir(path)
    if refresh or not dest.is_dir():
        tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=_mkparent(dest)))
        pafs.copy_files(p, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        shutil.rmtree(dest, ignore_errors=True)
        try:
            os.replace(tmp, dest)  # the copy appears complete or not at all
        except OSError:  # another process (e.g. a second replica on this node) was faster
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _mkparent(p: Path) -> str:
    p.parent.mkdir(parents=True, exist_ok=True)
    return str(p.parent)


@contextlib.contextmanager
def staged(path) -> Iterator[Path]:
    """A local directory to write the outputs for ``path`` into.

    Local paths are used directly (created). For a URI, a fresh temporary directory is yielded and
    uploaded into ``path`` when the block finishes without an error (existing files at ``path`` that
    were not rewritten are kept), then removed.
    """
    if not is_uri(path):
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
        return
    tmp = Path(tempfile.mkdtemp(prefix="serray-stage-"))
    try:
        yield tmp
        upload(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
