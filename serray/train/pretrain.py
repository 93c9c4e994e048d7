"""Adapter pre-training (task-agnostic): the student sees masked frames and learns by mask
prediction, self-distillation towards its EMA teacher and prediction of the teacher's k-means
local attributes. The loop itself is :mod:`serray.train.loop`; this module is the task definition
and the driver (:func:`run_pretrain`).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Dict

import torch

from serray import storage
from serray.config import OPERATIONAL_KEYS, as_dict, section_hash, to_yaml
from serray.data.encoders import check_identity, describe_encoder
from serray.data.features import PadCollate, feature_dataset
from serray.data.featurize import feature_identity, feature_stats, read_meta
from serray.errors import DataError
from serray.models.adapter import Adapter
from serray.train.checkpoint import META_FILE
from serray.train.loop import fit, steps_per_epoch
from serray.train.report import write_history
from serray.train.schedules import cosine_schedule

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"  # the exported pre-trained adapter under pretrain.dir
PRETRAIN_KEYS = ("loss", "loss_mask", "loss_distill", "loss_cluster", "cos_ts", "cluster_entropy", "dead_clusters",
                 "ema_decay")


class PretrainTask:
    """The pre-training task plugged into the shared loop."""

    def __init__(self, config: Dict[str, Any]):
        self.config = config

    def build_model(self) -> Adapter:
        model = Adapter(**self.config["model"])
        model.set_feature_stats(*self.config["feature_stats"])
        return model

    def trainable_parameters(self, model: Adapter) -> list:
        return model.trainable_parameters()

    def collate(self, train: bool, epoch: int = 0) -> PadCollate:
        return PadCollate(self.config["max_frames"], random_crop=train, seed=self.config["seed"] * 1000 + epoch)

    def step(self, model, batch, step: int):
        import ray.train

        gen = torch.Generator().manual_seed(self.config["seed"] * 1_000_003 + step * 101 + ray.train.get_context().get_world_rank())
        out = model(batch["x"], batch["padding_mask"], generator=gen)
        records = {"loss": float(out.loss.detach()), **{f"loss_{k}": float(v) for k, v in out.losses.items()}, **out.stats}
        return out.loss, records

    def after_step(self, core: Adapter, step: int, total_steps: int) -> Dict[str, float]:
        m = cosine_schedule(self.config["ema_decay"], self.config["ema_decay_end"], total_steps, 0, step)
        core.update_teacher(m)
        return {"ema_decay": m}

    def evaluate(self, model, core, device, epoch: int) -> Dict[str, float]:
        """A distributed guard: the largest centroid difference between workers (must be 0)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return {}
        c = core.kmeans.centroids.detach().clone()
        gathered = [torch.empty_like(c) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, c)
        return {"centroid_sync_diff": float(max((g - c).abs().max() for g in gathered))}

    def extra_state(self) -> Dict[str, Any]:
        return {}

    def load_extra_state(self, state: Dict[str, Any]) -> None:
        pass

    def checkpoint_meta(self, core: Adapter, step: int, epoch: int) -> Dict[str, Any]:
        return {"kind": "adapter", "model": core.config_dict(), "features": self.config["features"],
                "config_hash": self.config["config_hash"], "step": step, "epoch": epoch}


def pretrain_hash(cfg) -> str:
    """What makes two pre-trainings the same: encoder, adapter and the pre-training section."""
    return section_hash(cfg, "encoder", "adapter", "pretrain", "seed", exclude=OPERATIONAL_KEYS)


def check_features(cfg) -> dict:
    """The feature metadata, checked against the config's encoder (a clear error naming both)."""
    meta = read_meta(cfg.features.dir)
    check_identity(meta, describe_encoder(cfg.encoder), f"features in {cfg.features.dir}", f"config encoder.name={cfg.encoder.name}")
    return meta


def run_pretrain(cfg, force: bool = False) -> Dict[str, Any]:
    """Pre-train the adapter on the stored features with Ray Train; export it to ``pretrain.dir/adapter``.

    Returns:
        A summary: the exported adapter directory, final metrics, history path, whether it was reused.
    """
    from serray.ray_utils import init_ray

    import json

    out = storage.absolute(cfg.pretrain.dir)
    export = storage.join(out, ADAPTER_DIR)
    phash = pretrain_hash(cfg)
    if not force and storage.is_file(storage.join(export, META_FILE)):
        meta = json.loads(storage.read_text(storage.join(export, META_FILE)))
        if meta.get("config_hash") == phash:
            log.info("pre-trained adapter in %s matches the config; skipping (use --force to retrain)",
                     storage.describe(export))
            return {"adapter": export, "reused": True, "metrics": meta.get("final_metrics", {})}
    feat_meta = check_features(cfg)
    sessions = list(cfg.pretrain.sessions)
    num_rows = sum(int(feat_meta["rows_per_session"].get(str(s), 0)) for s in sessions)
    if num_rows == 0:
        raise DataError(f"no stored features for pre-training sessions {sessions} in {storage.describe(cfg.features.dir)}")
    init_ray(cfg)
    tcfg = cfg.pretrain
    loop_config = {
        "task": "pretrain", "seed": cfg.seed, "config_yaml": to_yaml(cfg), "config_hash": phash,
        "features": feature_identity(feat_meta),
        "feature_stats": [a.tolist() for a in feature_stats(feat_meta, sessions)],
        "model": {"input_dim": feat_meta["dim"], "num_input_layers": feat_meta["num_layers"],
                  **{k: v for k, v in as_dict(cfg.adapter).items() if k not in ("ema_decay", "ema_decay_end")}},
        "ema_decay": cfg.adapter.ema_decay, "ema_decay_end": cfg.adapter.ema_decay_end,
        **{k: v for k, v in as_dict(tcfg).items() if k not in ("dir", "sessions")},
        "steps_per_epoch": steps_per_epoch(num_rows, tcfg.batch_size, tcfg.num_workers),
        "fault_marker": storage.join(out, "fault_injected.marker"),
    }
    name = f"pretrain-{phash[:8]}"  # a rerun with the same config resumes this run's latest checkpoint
    ray_dir = storage.join(out, "ray")
    if force:
        storage.remove(storage.join(ray_dir, name))
        storage.remove(loop_config["fault_marker"])
    result = fit(loop_config, {"train": feature_dataset(cfg.features.dir, sessions, cache_max_mb=cfg.features.cache_max_mb)}, tcfg,
                 storage_path=ray_dir, name=name, score=("loss", "min"))
    if result.checkpoint is None:
        raise DataError(f"pre-training in {storage.describe(out)} reported no checkpoint")
    with storage.staged(out) as local:  # the export appears complete (local: renamed; URI: uploaded at the end)
        tmp = local / (ADAPTER_DIR + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        result.checkpoint.to_directory(str(tmp))
        history = _finalise_export(tmp, result.metrics)
        shutil.rmtree(local / ADAPTER_DIR, ignore_errors=True)
        os.replace(tmp, local / ADAPTER_DIR)
        curves = write_history(history, local, PRETRAIN_KEYS, "adapter pre-training")
    return {"adapter": export, "reused": False, "metrics": result.metrics, "curves": storage.join(out, curves.name),
            "ray_dir": storage.join(ray_dir, name)}


def _finalise_export(directory: Path, final_metrics: Dict[str, Any]) -> list:
    """Drop the optimiser from the exported adapter, add final metrics; return the history."""
    import json

    from serray.train.checkpoint import OPTIMIZER_KEY, STATE_FILE

    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    state.pop(OPTIMIZER_KEY, None)
    torch.save(state, directory / STATE_FILE)
    meta = json.loads((directory / META_FILE).read_text())
    meta["final_metrics"] = {k: v for k, v in (final_metrics or {}).items() if isinstance(v, (int, float))}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))
    return list(state["history"])
