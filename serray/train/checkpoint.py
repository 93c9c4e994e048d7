"""Checkpoint directories: plain state dicts (``torch.load(weights_only=True)``-safe) plus YAML/JSON.

A directory holds ``state.pt`` (a dict of state dicts and numbers under the key constants below),
``meta.json`` (model constructor kwargs, feature identity, labels, step/epoch) and ``config.yaml``
(the resolved run config), so a model can be rebuilt from the directory alone.

Every file is written atomically and ``meta.json`` last, so a directory with a ``meta.json`` holds a
whole checkpoint; a file torn anyway (a full disk, a copy cut short) is a :class:`CheckpointError`
when read, which the resuming loop answers by falling back to the checkpoint before it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import torch

STATE_FILE, META_FILE, CONFIG_FILE = "state.pt", "meta.json", "config.yaml"
MODEL_KEY, OPTIMIZER_KEY, SCHEDULER_KEY, STEP_KEY, EPOCH_KEY = "model", "optimizer", "scheduler", "step", "epoch"
ENCODER_DIR = "encoder"  # a classifier checkpoint may carry its Hugging Face encoder here (registry.include_encoder)


def save_checkpoint(directory: str | Path, state: Dict[str, Any], meta: Dict[str, Any], config_yaml: str) -> Path:
    """Write a checkpoint directory (each file atomically, ``meta.json`` last) and return it."""
    import io

    from serray import storage

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write_bytes(d / STATE_FILE, buf.getvalue())
    storage.write_text(d / CONFIG_FILE, config_yaml)
    storage.write_text(d / META_FILE, json.dumps(meta, indent=2, default=str))
    return d


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> tuple[Dict[str, Any], Dict[str, Any]]:
    """Read ``(state, meta)`` from a checkpoint directory, local or a storage URI (weights only, never
    arbitrary pickles).

    Raises:
        CheckpointError: a file is missing, truncated or not a checkpoint (one line naming it).
    """
    import io

    from serray import storage
    from serray.errors import CheckpointError

    state_path, meta_path = storage.join(directory, STATE_FILE), storage.join(directory, META_FILE)
    if not storage.is_file(state_path) or not storage.is_file(meta_path):
        raise CheckpointError(f"not a serray checkpoint: {storage.describe(directory)} (expected {STATE_FILE} and {META_FILE})")
    try:
        meta = json.loads(storage.read_text(meta_path))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"unreadable checkpoint {storage.describe(directory)}: {META_FILE} is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"unreadable checkpoint {storage.describe(directory)}: {META_FILE} is not a JSON object")
    try:
        state = torch.load(io.BytesIO(storage.read_bytes(state_path)), map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, a pickle that weights_only refuses
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"unreadable checkpoint {storage.describe(directory)}: {STATE_FILE} ({first})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"unreadable checkpoint {storage.describe(directory)}: {STATE_FILE} holds no state dict")
    return state, meta
