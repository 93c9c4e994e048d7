"""Extra unlabelled audio for pre-training (``pretrain.extra_audio``): sources -> manifest rows.

A source is one of

* a directory, searched recursively for ``.wav`` / ``.flac`` files (any case); hidden directories and
  files (``.*``, macOS ``._*`` AppleDouble companions included) are ignored. A LibriSpeech tree
  (``<speaker>/<chapter>/<utt>.flac``) gives one speaker per top-level sub-directory;
* a manifest file: ``.csv`` / ``.tsv`` with a ``path`` column (and optionally ``speaker``), or
  ``.txt`` / ``.lst`` with one path per line (blank lines and ``#`` comments skipped). Relative paths
  are relative to the manifest file's directory.

Each file becomes one row with the IEMOCAP manifest columns (:data:`MANIFEST_COLUMNS`): ``session``
0, no labels (``raw_label == label == ""``), the duration from the file header (no decoding) and
the absolute path. ``utt_id`` is ``extra/<source key>/<path relative to the source, no suffix>``
where the source key is the source's name plus a short hash of its absolute path: stable when the
list of sources is edited (adding a source later featurizes only its files) and unique when two
sources share a name.

Bad input raises :class:`~serray.errors.ConfigError` before any work: a missing source, a directory
without audio, a manifest without entries or listing files that do not exist. A file whose header
cannot be read is kept with a NaN duration; featurization skips and reports it like any unusable
audio.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import pandas as pd
import soundfile as sf

from serray.data.corpora.base import MANIFEST_COLUMNS
from serray.errors import ConfigError
from serray.storage import redact as _redact

log = logging.getLogger(__name__)

EXTRA_SESSION = 0
"""The feature partition (``session=0``) that holds the extra audio."""

AUDIO_SUFFIXES = (".wav", ".flac")
MANIFEST_SUFFIXES = (".csv", ".tsv", ".txt", ".lst")
UTT_PREFIX = "extra/"


def _source_name(path: str) -> str:
    """A directory's name, a manifest file's name without its suffix."""
    return (Path(path).stem if os.path.isfile(path) else Path(path).name) or "root"


def source_key(source: str | Path) -> str:
    """``<name>-<8 hex>`` of a source: its directory name (a manifest: its file name without suffix)
    plus a hash of its absolute path."""
    path = os.path.abspath(os.path.expanduser(str(source)))
    return f"{_source_name(path)}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"


def check_sources(sources: Iterable[str | Path]) -> None:
    """Cheap checks (no directory walk): every source exists and is a directory or a manifest file."""
    for src in sources:
        p = Path(os.path.expanduser(str(src)))
        if "://" in str(src):
            raise ConfigError(f"pretrain.extra_audio: {_redact(str(src))} must be a local path (or a shared mount)")
        if not p.exists():
            raise ConfigError(f"pretrain.extra_audio: {p} does not exist (give audio directories or manifest files)")
        if p.is_file() and p.suffix.lower() not in MANIFEST_SUFFIXES:
            raise ConfigError(f"pretrain.extra_audio: {p} is a file but not a manifest "
                              f"({', '.join(MANIFEST_SUFFIXES)}); give its directory or a manifest listing it")


def _walk_audio(root: Path) -> List[Path]:
    """Audio files under ``root`` (symlinked directories followed once), hidden entries skipped."""
    found, seen = [], set()
    for d, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(d)
        if real in seen:  # a symlink loop
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        found += [Path(d, f) for f in sorted(files)
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in AUDIO_SUFFIXES]
    return found


def _read_list(manifest: Path) -> List[Tuple[str, Optional[str]]]:
    """(path as written, speaker or None) of every entry of a manifest file."""
    if manifest.suffix.lower() in (".txt", ".lst"):
        lines = manifest.read_text(encoding="utf-8").splitlines()
        return [(x.strip(), None) for x in lines if x.strip() and not x.strip().startswith("#")]
    delimiter = "\t" if manifest.suffix.lower() == ".tsv" else ","
    with open(manifest, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        fields = [c.strip() for c in (reader.fieldnames or [])]
        if "path" not in fields:
            raise ConfigError(f"pretrain.extra_audio: manifest {manifest} has no 'path' column "
                              f"(columns: {', '.join(fields) or 'none'})")
        out = []
        for row in reader:
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            if row.get("path"):
                out.append((row["path"], row.get("speaker") or None))
        return out


def _manifest_files(manifest: Path) -> List[Tuple[Path, str, Optional[str]]]:
    """(absolute path, path relative to the manifest's directory, speaker) of a manifest's entries."""
    base = manifest.parent.resolve()
    entries = _read_list(manifest)
    if not entries:
        raise ConfigError(f"pretrain.extra_audio: manifest {manifest} lists no audio files")
    out, missing = [], []
    for written, speaker in entries:
        p = Path(os.path.expanduser(written))
        p = p if p.is_absolute() else base / p
        p = Path(os.path.abspath(p))
        if not p.is_file():
            missing.append(written)
            continue
        try:
            rel = p.relative_to(base).as_posix()
        except ValueError:  # outside the manifest's directory: its absolute path names it
            rel = p.as_posix().lstrip("/")
        out.append((p, rel, speaker))
    if missing:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise ConfigError(f"pretrain.extra_audio: manifest {manifest} lists {len(missing)} of {len(entries)} files "
                          f"that do not exist (relative paths are relative to {base}): {shown}")
    return out


def _duration(path: Path) -> float:
    try:
        info = sf.info(str(path))
    except Exception as e:  # unreadable header: featurization skips and reports the file
        log.warning("cannot read the header of %s: %s", path, e)
        return math.nan
    return round(info.frames / info.samplerate, 4) if info.samplerate else math.nan


def extra_audio_manifest(sources: Sequence[str | Path]) -> pd.DataFrame:
    """Manifest rows (:data:`MANIFEST_COLUMNS`, sorted by ``utt_id``) of the extra audio in ``sources``.

    Args:
        sources: directories (searched recursively for WAV/FLAC) and/or manifest files
            (``.csv``/``.tsv`` with a ``path`` column, ``.txt``/``.lst`` with one path per line).

    Returns:
        One row per audio file: ``utt_id`` ``extra/<source key>/<relative path without suffix>``,
        ``session`` 0, ``speaker`` ``extra:<top-level sub-directory>`` (a csv ``speaker`` column wins;
        files directly in the source get ``extra:<source name>``), ``gender``/``raw_label``/``label``
        ``""``, ``duration`` from the header (NaN when unreadable), absolute ``path``. A file reached
        through two sources is kept once (the first source's row).

    Raises:
        ConfigError: a source is missing or not a directory/manifest, a directory holds no audio, a
            manifest lists nothing or lists missing files.
    """
    sources = [str(s) for s in sources]
    check_sources(sources)
    rows: Dict[str, dict] = {}
    ids: Dict[str, str] = {}
    duplicates = 0
    for src in sources:
        src_path = Path(os.path.abspath(os.path.expanduser(src)))
        key = source_key(src_path)
        if src_path.is_dir():
            files = _walk_audio(src_path)
            if not files:
                raise ConfigError(f"pretrain.extra_audio: {src_path} holds no audio files "
                                  f"({', '.join(AUDIO_SUFFIXES)}, searched recursively)")
            entries = [(p, p.relative_to(src_path).as_posix(), None) for p in files]
        else:
            entries = _manifest_files(src_path)
        for path, rel, speaker in entries:
            real = os.path.realpath(path)
            if real in rows:
                duplicates += 1
                continue
            utt = UTT_PREFIX + key + "/" + os.path.splitext(rel)[0]
            if utt in ids:  # the same name with another suffix (x.wav and x.flac): keep the first
                log.warning("extra audio %s has the same name as %s; skipping it", path, ids[utt])
                continue
            ids[utt] = str(path)
            top = rel.split("/", 1)[0] if "/" in rel else _source_name(str(src_path))
            rows[real] = {
                "utt_id": utt, "session": EXTRA_SESSION, "dialog": "", "method": "",
                "speaker": f"extra:{speaker or top}", "gender": "", "raw_label": "", "label": "",
                "valence": math.nan, "activation": math.nan, "dominance": math.nan,
                "start": 0.0, "end": math.nan, "duration": math.nan, "path": str(path),
            }
    if duplicates:
        log.info("extra audio: %d files reached through more than one source are kept once", duplicates)
    df = pd.DataFrame(list(rows.values()), columns=MANIFEST_COLUMNS)
    df["duration"] = [_duration(Path(p)) for p in df["path"]]
    df["end"] = df["duration"]
    df = df.sort_values("utt_id", ignore_index=True)
    df["session"] = df["session"].astype("int64")
    for c in ("valence", "activation", "dominance", "start", "end", "duration"):
        df[c] = df[c].astype("float64")
    return df
