"""What a run was made from, recorded in its ``metrics.json`` and in every registry entry
(``"provenance"``), so ``serray reproduce RUN_DIR`` can make it again and say what differs.

The record holds the git commit of the serray code that ran and whether tracked files differed from
it (``dirty``; untracked files such as ``runs/`` do not count; ``commit: null`` with a ``reason``
outside a git checkout, e.g. an installed wheel), the resolved config (credentials stripped like every
saved config, :func:`serray.config.to_yaml`), the installed versions of the packages that decide the
numbers, a hash of the manifest's rows and of the feature identity (encoder, layers, dimension,
frame and sample rate, the featurization's config hash and which utterances each session holds),
the seed and the folds with each fold's derived generator seeds, the encoder (a Hugging Face model's
hub revision and a hash of its weight files), and for every fold the code that trained it
(``fold_code``: a fold reused from an earlier run keeps the commit it was trained with; ``folds_other_code``
lists the folds whose commit or dirty state differs from the run's). The command line is recorded with
every URI's credentials and secret query values masked, as in messages.
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, List, Optional

#: Packages whose versions are recorded (None: not installed).
KEY_PACKAGES = ("serray", "torch", "torchaudio", "ray", "transformers", "numpy", "scipy", "pandas", "pyarrow",
                "scikit-learn", "omegaconf", "soundfile", "opensmile", "onnx", "onnxruntime")
#: The fields a record must hold for ``serray reproduce``.
REQUIRED = ("git", "config", "packages", "manifest", "features", "seed", "folds")
#: Manifest columns hashed: what a row is, not where its file lies (a copy of the corpus elsewhere
#: hashes the same).
MANIFEST_HASH_COLUMNS = ("utt_id", "session", "dialog", "speaker", "gender", "label", "duration")
VERSION = 1


def _sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def git_state(path: Optional[str | Path] = None) -> Dict[str, Any]:
    """``{"commit", "dirty"}`` of the git checkout holding ``path`` (default: the serray code that runs);
    both None, with a ``reason``, when it is not one or git is missing."""
    where = Path(path) if path is not None else Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except FileNotFoundError:
        return {"commit": None, "dirty": None, "reason": "git is not installed"}
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None, "reason": f"not a git checkout ({where})"}
    return {"commit": commit, "dirty": dirty}


def package_versions(names=KEY_PACKAGES) -> Dict[str, Optional[str]]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def manifest_record(path: str | Path) -> Dict[str, Any]:
    """``{"path", "rows", "sha256"}`` of a manifest (the hash of :data:`MANIFEST_HASH_COLUMNS`, rows in
    utterance order); ``sha256: null`` with a ``reason`` when it cannot be read."""
    import pandas as pd

    try:
        df = pd.read_parquet(path)
    except Exception as e:  # missing, or not Parquet: recorded, not fatal for the run
        return {"path": str(path), "rows": None, "sha256": None, "reason": f"unreadable ({type(e).__name__})"}
    cols = [c for c in MANIFEST_HASH_COLUMNS if c in df.columns]
    text = df[cols].sort_values("utt_id").to_csv(index=False, float_format="%.6f")
    return {"path": str(path), "rows": int(len(df)), "sha256": hashlib.sha256(text.encode()).hexdigest()}


def features_record(features_dir: str) -> Dict[str, Any]:
    """The feature identity of a feature directory and its hash (see the module docstring)."""
    from serray import storage
    from serray.data.features.featurize import feature_identity, read_meta
    from serray.errors import SerrayError

    try:
        meta = read_meta(features_dir)
    except SerrayError as e:
        return {"identity": None, "sha256": None, "reason": str(e).splitlines()[0]}
    identity = feature_identity(meta)
    utterances = {s: (st or {}).get("utt_digest") for s, st in sorted((meta.get("stats") or {}).items())}
    return {"dir": storage.without_credentials(features_dir), "identity": identity,
            "config_hash": meta.get("config_hash"), "rows": meta.get("num_rows"),
            "sha256": _sha256({"identity": identity, "config_hash": meta.get("config_hash"), "utterances": utterances})}


def code_record() -> Dict[str, Any]:
    """What a fold's ``fold_result.json`` keeps of the code that trained it."""
    return {"git": git_state(), "packages": package_versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


@functools.lru_cache(maxsize=8)
def _files_digest(files: tuple) -> str:
    """SHA-256 over ``(path, size, mtime)`` files' names and bytes (cached by exactly those: a file
    changed in place is hashed again)."""
    h = hashlib.sha256()
    for path, _, _ in files:
        h.update(Path(path).name.encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def encoder_record(name: str) -> Dict[str, Any]:
    """``{"name", "revision", "weights_sha256"}`` of the encoder: a Hugging Face model's hub commit (None
    for a local directory) and a hash over its weight and config files when they are local (None for a
    built-in encoder: its code is the package's version). The name of a local directory is its last
    component, as ``GET /info`` shows it (no machine path in a record)."""
    from serray.data.features.encoders import BUILTIN_ENCODERS
    from serray.storage import public_name

    if name in BUILTIN_ENCODERS:
        return {"name": name, "revision": None, "weights_sha256": None}
    revision, digest = None, None
    try:
        from transformers import AutoConfig

        revision = getattr(AutoConfig.from_pretrained(name, local_files_only=True), "_commit_hash", None)
    except Exception:  # not cached here, or not a model: the record says it does not know
        pass
    files = sorted(p for p in Path(name).glob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".json")) \
        if Path(name).is_dir() else []
    if files:  # every run record of a process (an ablation writes dozens) hashes a large model once
        digest = _files_digest(tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    return {"name": public_name(name), "revision": revision, "weights_sha256": digest}


def _masked(arg: str) -> str:
    """One command-line argument with its secrets masked: a ``key=URI`` value as a saved config's URI is
    (whatever characters its credentials hold), any other text with every URI in it redacted."""
    from serray.storage import is_uri, redact, redact_text

    key, eq, value = arg.partition("=")
    if eq and is_uri(value):
        return f"{key}={redact(value)}"
    return redact(arg) if is_uri(arg) else redact_text(arg)


def _masked_argv() -> List[str]:
    return [Path(sys.argv[0]).name, *(_masked(a) for a in sys.argv[1:])] if sys.argv else []


def collect(cfg, folds: List[int], fold_seeds: Optional[Dict[int, Dict[str, int]]] = None,
            fold_records: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
    """The provenance record of a run of ``cfg`` over ``folds`` (``fold_records``: the folds' results,
    whose ``code`` says what trained each)."""
    from omegaconf import OmegaConf

    from serray.storage import strip_credentials

    config = strip_credentials(OmegaConf.to_container(cfg, resolve=True))
    git = git_state()
    fold_code = {str(r["fold"]): r["code"] for r in (fold_records or []) if isinstance(r.get("code"), dict)}
    other = sorted(int(f) for f, c in fold_code.items()
                   if (c.get("git") or {}).get("commit") != git.get("commit") or (c.get("git") or {}).get("dirty") != git.get("dirty"))
    return {"version": VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "git": git, "python": platform.python_version(), "platform": platform.platform(),
            "argv": _masked_argv(),
            "packages": package_versions(), "config": config, "config_sha256": _sha256(config),
            "manifest": manifest_record(cfg.data.manifest), "features": features_record(str(cfg.features.dir)),
            "encoder": encoder_record(str(cfg.encoder.name)),
            "seed": int(cfg.seed), "folds": [int(f) for f in folds],
            "fold_seeds": {str(k): v for k, v in (fold_seeds or {}).items()},
            "fold_code": fold_code, "folds_other_code": other}


def missing_fields(record: Any) -> List[str]:
    """The :data:`REQUIRED` fields a provenance record lacks (all of them when it is not a record)."""
    if not isinstance(record, dict):
        return list(REQUIRED)
    return [k for k in REQUIRED if record.get(k) is None]


__all__ = ["KEY_PACKAGES", "REQUIRED", "code_record", "collect", "encoder_record", "features_record", "git_state",
           "manifest_record", "missing_fields", "package_versions"]
