"""Checkpoint directories: plain state dicts (``torch.load(weights_only=True)``-safe) plus YAML/JSON.

A directory holds ``state.pt`` (a dict of state dicts and numbers under the key constants below),
``meta.json`` (model constructor kwargs, feature identity, labels, step/epoch) and ``config.yaml``
(the resolved run config), so a model can be rebuilt from the directory alone.
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
    """Write a checkpoint directory and return it."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    torch.save(state, d / STATE_FILE)
    (d / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    (d / CONFIG_FILE).write_text(config_yaml)
    return d


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> tuple[Dict[str, Any], Dict[str, Any]]:
    """Read ``(state, meta)`` from a checkpoint directory, local or a storage URI (weights only, never
    arbitrary pickles)."""
    import io

    from serray import storage
    from serray.errors import DataError

    state_path, meta_path = storage.join(directory, STATE_FILE), storage.join(directory, META_FILE)
    if not storage.is_file(state_path) or not storage.is_file(meta_path):
        raise DataError(f"not a serray checkpoint: {storage.describe(directory)} (expected {STATE_FILE} and {META_FILE})")
    state = torch.load(io.BytesIO(storage.read_bytes(state_path)), map_location=map_location, weights_only=True)
    return state, json.loads(storage.read_text(meta_path))
