"""Adapter pre-training (task-agnostic): the student sees masked frames and learns by mask
prediction, self-distillation towards its EMA teacher and prediction of the teacher's k-means
local attributes. The loop itself is :mod:`serray.train.loop`; this module is the task definition
and the driver (:func:`run_pretrain`).

Protocol: with ``pretrain.per_fold=true`` (the default, *inductive*) every leave-one-session-out
fold gets its own adapter, pre-trained on the fold's pool only: the other sessions' utterances
(every one of them, labelled or not, with ``pretrain.use_unlabelled``) plus ``pretrain.extra_audio``
(stored as session 0). Its input statistics and k-means centroids come from that pool too, so
nothing of the test session reaches it. ``per_fold=false`` trains one adapter on
``pretrain.sessions`` for every fold (*transductive* when those include test sessions).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from serray import storage
from serray.config import OPERATIONAL_KEYS, as_dict, section_hash, to_yaml
from serray.data.features.encoders import check_identity
from serray.data.features.training import PadCollate, training_data
from serray.data.features.featurize import check_features, feature_identity, feature_stats, reading_features
from serray.errors import DataError
from serray.models.adapter import Adapter
from serray.models.wap import kernel_frames
from serray.train.checkpoint import META_FILE, load_checkpoint
from serray.train.folds import EXTRA_SESSION, pool_rows, pool_sessions  # noqa: F401 (EXTRA_SESSION re-exported)
from serray.train.loop import fit, run_seed, steps_per_epoch, wait_for_workers
from serray.train.report import write_history
from serray.train.schedules import cosine_schedule

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"  # the exported pre-trained adapter under its pre-training directory

PRETRAIN_KEYS = ("loss", "loss_mask", "loss_distill", "loss_cluster", "cos_ts", "cluster_entropy", "dead_clusters",
                 "ema_decay", "student_drift", "teacher_drift")
DRIFT_WARNING = ("the teacher moved less than half as far from its initialisation as the student ({t:.3g} vs {s:.3g}): "
                 "it is still mostly its random init; pre-train longer, lower adapter.ema_decay / ema_decay_end, "
                 "or set the guard adapter.ema_half_life")


# ---------------------------------------------------------------- the EMA schedule


def ema_momentum(base: float, end: float, total_steps: int, step: int, half_life: Optional[float] = None) -> float:
    """The teacher's EMA decay at ``step``: a cosine from ``base`` (``adapter.ema_decay``) to ``end``
    (``adapter.ema_decay_end``) over the run's ``total_steps``, as in DINO / data2vec, so the keys take
    effect at every run length (the decay reaches ``end`` on the last step).

    ``half_life`` (``adapter.ema_half_life``, off by default) is a separate guard against a teacher
    that never leaves its random initialisation on a short run: when set, the decay is capped so that
    the teacher's half-life is at most that share of the run, ``m <= 0.5 ** (1 / (half_life *
    total_steps))``. It overrides the keys wherever it binds (0.996 -> 0.9999 over 100 steps is then a
    constant 0.8706 with ``half_life=0.05``); its measured effect is in docs/protocol.md.
    """
    m = cosine_schedule(base, end, total_steps, 0, step)
    if half_life:
        m = min(m, 0.5 ** (1.0 / max(1.0, half_life * total_steps)))
    return m


def teacher_init_share(base: float, end: float, total_steps: int, half_life: Optional[float] = None) -> float:
    """The share of the teacher still equal to its initialisation after the run, ``prod_t m_t``."""
    return math.prod(ema_momentum(base, end, total_steps, s, half_life) for s in range(total_steps))


def relative_drift(params: List[torch.Tensor], init: List[torch.Tensor]) -> float:
    """``||theta - theta_0|| / ||theta_0||`` over a list of parameters."""
    num = sum(float((p.detach().float().cpu() - q).pow(2).sum()) for p, q in zip(params, init))
    den = sum(float(q.pow(2).sum()) for q in init)
    return math.sqrt(num) / max(math.sqrt(den), 1e-12)


# ---------------------------------------------------------------- the task


class PretrainTask:
    """The pre-training task plugged into the shared loop."""

    stage_id = 0  # progress lines: "pre-train"

    def __init__(self, config: Dict[str, Any]):
        self.config = config
        self._init: Optional[List[torch.Tensor]] = None  # theta_0, common to both branches

    def _seed(self) -> int:
        return self.config.get("run_seed", self.config["seed"])

    def build_model(self) -> Adapter:
        model = Adapter(**self.config["model"])
        model.set_feature_stats(*self.config["feature_stats"])
        # the common initialisation (the teacher starts as a copy of the student); built from the
        # seed before any checkpoint is loaded, so a resumed run measures drift from the same point
        self._init = [p.detach().float().clone() for p in model.branch_parameters("student")]
        return model

    def param_groups(self, model: Adapter, weight_decay: float) -> list:
        return model.param_groups(weight_decay)

    def lr_scale(self, group: dict, epoch: int) -> float:
        return group.get("lr_scale", 1.0)

    def collate(self, train: bool, epoch: int = 0) -> PadCollate:
        return PadCollate(self.config["max_frames"], random_crop=train, seed=self._seed() * 1000 + epoch,
                          with_labels=False)

    def before_epoch(self, core: Adapter, epoch: int) -> None:
        pass

    def step(self, model, batch, step: int, rank: int = 0):
        gen = torch.Generator().manual_seed(self._seed() * 1_000_003 + step * 101 + rank)
        out = model(batch["x"], batch["padding_mask"], generator=gen)
        records = {"loss": float(out.loss.detach()), **{f"loss_{k}": float(v) for k, v in out.losses.items()}, **out.stats}
        return out.loss, records

    def after_step(self, core: Adapter, step: int, total_steps: int) -> Dict[str, float]:
        c = self.config
        m = ema_momentum(c["ema_decay"], c["ema_decay_end"], total_steps, step, c.get("ema_half_life"))
        core.update_teacher(m, layers_only=bool(c.get("ema_layers_only", False)))
        return {"ema_decay": m}

    def evaluate(self, model, core: Adapter, rt, epoch: int) -> Dict[str, float]:
        """Teacher and student drift from the common initialisation, and a distributed guard: the
        largest centroid difference between workers (must be 0)."""
        import torch.distributed as dist

        out = {}
        if self._init is not None:
            out["student_drift"] = relative_drift(core.branch_parameters("student"), self._init)
            out["teacher_drift"] = relative_drift(core.branch_parameters("teacher"), self._init)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            c = core.kmeans.centroids.detach().clone()
            gathered = [torch.empty_like(c) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, c)
            out["centroid_sync_diff"] = float(max((g - c).abs().max() for g in gathered))
        return out

    def should_stop(self, history: list) -> bool:
        return False

    def extra_state(self) -> Dict[str, Any]:
        return {}

    def load_extra_state(self, state: Dict[str, Any]) -> None:
        pass

    def checkpoint_meta(self, core: Adapter, step: int, epoch: int) -> Dict[str, Any]:
        return {"kind": "adapter", "model": core.config_dict(), "features": self.config["features"],
                "config_hash": self.config["config_hash"], "step": step, "epoch": epoch,
                "pool": self.config["pool"]}


# ---------------------------------------------------------------- what a pre-training sees


def adapter_kwargs(cfg, feat_meta: dict) -> Dict[str, Any]:
    """``Adapter`` constructor kwargs: the ``adapter`` section with millisecond widths turned into
    frames of the stored features' frame rate."""
    a = cfg.adapter
    rate = float(feat_meta["frame_rate"])
    return {"input_dim": feat_meta["dim"], "num_input_layers": feat_meta["num_layers"], "d_model": a.d_model,
            "num_layers": a.num_layers, "num_heads": a.num_heads, "ff_dim": a.ff_dim, "dropout": a.dropout,
            "mask_ratio": a.mask_ratio, "mask_span": max(1, int(round(a.mask_span_ms * rate / 1000.0))),
            "num_clusters": a.num_clusters, "kmeans_decay": a.kmeans_decay, "w_mask": a.w_mask,
            "w_distill": a.w_distill, "w_cluster": a.w_cluster, "distill_top_k": a.distill_top_k,
            "pos_conv_kernel": kernel_frames(a.pos_conv_ms, rate) if a.pos_conv_ms > 0 else 0,
            "pos_conv_groups": a.pos_conv_groups, "attention_dropout": a.attention_dropout}


def pretrain_hash(cfg, fold: Optional[int] = None) -> str:
    """What makes two pre-trainings the same: encoder, adapter, the pre-training section, the seed
    and (per fold) the fold."""
    from serray.train.protocol import grouping_keys

    h = section_hash(cfg, "encoder", "adapter", "pretrain", "seed", *grouping_keys(cfg), exclude=OPERATIONAL_KEYS)
    return h if fold is None else section_hash_str(h, f"fold{fold}")


def section_hash_str(*parts: str) -> str:
    import hashlib

    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def pretrain_dir(cfg, fold: Optional[int] = None) -> str:
    """Where a pre-training writes: ``pretrain.dir/fold<k>`` per fold, else ``pretrain.dir``."""
    base = storage.absolute(cfg.pretrain.dir)
    return storage.join(base, f"fold{fold}") if cfg.pretrain.per_fold else base


def adapter_path(cfg, fold: Optional[int] = None) -> str:
    """The adapter a fold fine-tunes from: ``finetune.init_from`` (``{fold}`` replaced) or the export
    of :func:`run_pretrain` for that fold."""
    given = cfg.finetune.init_from
    if given:
        return str(given).replace("{fold}", str(fold))
    return storage.join(pretrain_dir(cfg, fold), ADAPTER_DIR)


# ---------------------------------------------------------------- the body a fold fine-tunes

#: the adapter's constructor kwargs a classifier's body is built from
BODY_KEYS = ("input_dim", "d_model", "num_layers", "num_heads", "ff_dim", "dropout", "num_input_layers",
             "pos_conv_kernel", "pos_conv_groups", "attention_dropout")
BODY_DEFAULTS = {"pos_conv_kernel": 0, "pos_conv_groups": 16, "attention_dropout": 0.0}  # adapters from before these keys


def uses_pretraining(cfg) -> bool:
    """Whether a fine-tuning run starts its body from a pre-trained adapter."""
    return cfg.finetune.mode != "none" and cfg.finetune.init == "pretrained"


def check_adapter(cfg, feat_meta: dict, path: str) -> dict:
    """The pre-trained adapter must exist and match the features (a clear error naming both)."""
    if not storage.is_file(storage.join(path, META_FILE)):
        raise DataError(f"no pre-trained adapter at {storage.describe(path)} (run `serray pretrain` first, "
                        "or use finetune.mode=none for the no-adapter baseline)")
    _, ameta = load_checkpoint(path)
    if ameta.get("kind") != "adapter":
        raise DataError(f"{storage.describe(path)} holds a '{ameta.get('kind')}' checkpoint, not a pre-trained adapter")
    check_identity(feat_meta, ameta["features"], f"features in {storage.describe(cfg.features.dir)}",
                   f"adapter checkpoint {storage.describe(path)}")
    return ameta


@dataclass(frozen=True)
class FoldBody:
    """The body a fold's classifier starts from."""

    adapter: Optional[str]  # the pre-trained adapter it is initialised from (None: no pre-trained body)
    pool: Optional[dict]  # that adapter's pre-training pool (sessions, speakers), for the fold's audit
    kwargs: Optional[Dict[str, Any]]  # the body's constructor kwargs (None: finetune.mode=none, no body)


def fold_body(cfg, fold: int, feat_meta: dict, report_to_tune: bool = False,
              tracking: Optional[Dict[str, Any]] = None) -> FoldBody:
    """The :class:`FoldBody` of fold ``fold``: with ``finetune.init=pretrained`` the fold's adapter is
    pre-trained first when the config pre-trains per fold (reused when it matches the config) and checked
    against the features; ``init=random`` builds the body from the ``adapter`` section."""
    if cfg.finetune.mode == "none":
        return FoldBody(None, None, None)
    if cfg.finetune.init == "random":
        return FoldBody(None, None, _body_keys(adapter_kwargs(cfg, feat_meta)))
    path = adapter_path(cfg, fold)
    if cfg.finetune.init_from is None and cfg.pretrain.per_fold:
        run_pretrain(cfg, fold, report_to_tune=report_to_tune, tracking=tracking)
    meta = check_adapter(cfg, feat_meta, path)
    return FoldBody(path, meta.get("pool") or {}, _body_keys(meta["model"]))


def _body_keys(kw: Dict[str, Any]) -> Dict[str, Any]:
    return {k: kw.get(k, BODY_DEFAULTS.get(k)) for k in BODY_KEYS}


# ---------------------------------------------------------------- pre-training


def run_pretrain(cfg, fold: Optional[int] = None, force: bool = False, report_to_tune: bool = False,
                 tracking: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Pre-train the adapter of one fold (or the shared one) with Ray Train; export it.

    ``tracking``: where its MLflow run goes (:meth:`serray.tracking.Tracker.target`; None: untracked).

    Returns:
        A summary: the exported adapter directory, final metrics, the pool (sessions, rows, speakers),
        whether it was reused, and a warning if the teacher barely moved.
    """
    if cfg.pretrain.per_fold and fold is None:
        raise ValueError("pretrain.per_fold=true: run_pretrain needs the fold")
    fold = fold if cfg.pretrain.per_fold else None
    out = pretrain_dir(cfg, fold)
    export = storage.join(out, ADAPTER_DIR)
    phash = pretrain_hash(cfg, fold)
    with storage.lock(out), reading_features(cfg):  # trials / arms that share a pre-training wait for one another
        if not force and storage.is_file(storage.join(export, META_FILE)):
            meta = json.loads(storage.read_text(storage.join(export, META_FILE)))
            if meta.get("config_hash") == phash and (meta.get("pool") or {}).get("digest") == pool_digest(cfg, fold):
                log.info("pre-trained adapter in %s matches the config; skipping (use --force to retrain)",
                         storage.describe(export))
                return {"adapter": export, "reused": True, "metrics": meta.get("final_metrics", {}), "fold": fold,
                        "pool": meta.get("pool", {})}
        return _train(cfg, fold, out, export, phash, force, report_to_tune, tracking)


def _pool(cfg, fold: Optional[int]):
    """The sessions and rows of a pre-training's pool."""
    sessions = pool_sessions(cfg, fold if cfg.pretrain.per_fold else None, check_features(cfg))
    return sessions, pool_rows(cfg, sessions)


def pool_digest(cfg, fold: Optional[int] = None) -> str:
    """A short hash of the utterances a pre-training reads (an adapter is reused only while it stays)."""
    import hashlib

    _, rows = _pool(cfg, fold)
    return hashlib.sha256("\n".join(sorted(rows["utt_id"])).encode()).hexdigest()[:16]


def pretrain_inputs(cfg, fold: Optional[int] = None):
    """What one pre-training trains on: ``(loop_config, TrainingData)`` (also used by
    ``bench/pretrain.py`` to run the very same loop without Ray)."""
    fold = fold if cfg.pretrain.per_fold else None
    feat_meta = check_features(cfg)
    sessions, rows = _pool(cfg, fold)
    if fold is not None and fold in sessions:
        raise AssertionError(f"leakage: fold {fold}'s pre-training pool holds its test session")
    if rows.empty:
        raise DataError(f"no stored features for pre-training sessions {sessions} in {storage.describe(cfg.features.dir)}")
    tcfg = cfg.pretrain
    spe = steps_per_epoch(len(rows), tcfg.batch_size, tcfg.num_workers)
    epochs = math.ceil(tcfg.steps / spe) if tcfg.steps else tcfg.epochs
    pool = {"sessions": sessions, "rows": int(len(rows)), "speakers": sorted(set(rows["speaker"])),
            "labelled_rows": int((rows["label"].astype(str) != "").sum()), "fold": fold, "digest": pool_digest(cfg, fold)}
    data = training_data(cfg.features.dir, sessions, rows["utt_id"].tolist(), cfg.features.cache_max_mb, cfg.seed)
    loop_config = {
        "seed": cfg.seed, "run_seed": run_seed(cfg.seed, fold or 0, "pretrain"),
        "config_yaml": to_yaml(cfg), "config_hash": pretrain_hash(cfg, fold),
        "features": feature_identity(feat_meta), "pool": pool,
        "feature_stats": [a.tolist() for a in feature_stats(feat_meta, sessions)],
        "model": adapter_kwargs(cfg, feat_meta),
        "ema_decay": cfg.adapter.ema_decay, "ema_decay_end": cfg.adapter.ema_decay_end,
        "ema_half_life": cfg.adapter.ema_half_life, "ema_layers_only": bool(cfg.adapter.ema_layers_only),
        **{k: v for k, v in as_dict(tcfg).items() if k not in ("dir", "sessions", "extra_audio")},
        "epochs": epochs, "steps_per_epoch": spe, "total_steps": tcfg.steps,
        "fault_marker": storage.join(pretrain_dir(cfg, fold), "fault_injected.marker"),
    }
    return loop_config, data


def _train(cfg, fold, out, export, phash, force, report_to_tune, tracking=None) -> Dict[str, Any]:
    from serray.ray_utils import init_ray
    from serray.tracking import Tracker, config_params, loop_spec, stage_key

    loop_config, data = pretrain_inputs(cfg, fold)
    loop_config["tracking"] = spec = loop_spec(
        tracking, stage_key("pretrain", phash, out), "pretrain" + (f" fold {fold}" if fold is not None else ""),
        tags={"stage": "pretrain", "fold": fold if fold is not None else "shared"}, params=config_params(cfg))
    pool = loop_config["pool"]
    tcfg = cfg.pretrain
    init_ray(cfg)
    if not report_to_tune:  # inside a trial the fold's resources were checked before Tune started
        wait_for_workers(cfg, "pretrain")
    name = f"pretrain-{phash[:8]}"  # a rerun with the same config resumes this run's latest checkpoint
    ray_dir = storage.join(out, "ray")
    if force:
        storage.remove(storage.join(ray_dir, name))
        storage.remove(loop_config["fault_marker"])
    result = fit(PretrainTask, loop_config, {"train": data}, tcfg, storage_path=ray_dir, name=name,
                 score=("loss", "min"), report_to_tune=report_to_tune)
    if result.checkpoint is None:
        raise DataError(f"pre-training in {storage.describe(out)} reported no checkpoint")
    with storage.staged(out) as local:  # the export appears complete (local: renamed; URI: uploaded at the end)
        tmp = local / (ADAPTER_DIR + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        result.checkpoint.to_directory(str(tmp))
        history = _finalise_export(tmp, result.metrics)
        shutil.rmtree(local / ADAPTER_DIR, ignore_errors=True)
        os.replace(tmp, local / ADAPTER_DIR)
        curves = write_history(history, local, PRETRAIN_KEYS, "adapter pre-training" + (f", fold {fold}" if fold else ""))
        if spec:
            tracker = Tracker.from_target(spec)
            run_id = tracker.find_run(spec["key"])
            tracker.log_artifacts(run_id, [curves, local / "history.csv"])
            tracker.set_tags(run_id, {"adapter": storage.redact(export)})
    final = history[-1] if history else {}
    warning = None
    if final.get("teacher_drift", 1.0) < 0.5 * final.get("student_drift", 0.0):
        warning = DRIFT_WARNING.format(t=final["teacher_drift"], s=final["student_drift"])
        log.warning(warning)
    return {"adapter": export, "reused": False, "metrics": result.metrics, "curves": storage.join(out, curves.name),
            "ray_dir": storage.join(ray_dir, name), "fold": fold, "pool": pool, "warning": warning}


def _finalise_export(directory: Path, final_metrics: Dict[str, Any]) -> list:
    """Drop the optimiser from the exported adapter, add final metrics; return the history."""
    from serray.train.checkpoint import OPTIMIZER_KEY, STATE_FILE

    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    state.pop(OPTIMIZER_KEY, None)
    torch.save(state, directory / STATE_FILE)
    meta = json.loads((directory / META_FILE).read_text())
    meta["final_metrics"] = {k: v for k, v in (final_metrics or {}).items() if isinstance(v, (int, float))}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))
    return list(state["history"])


def pretrain_summary(s: dict) -> str:
    """Two or three lines for the terminal: what was trained or reused, the final epoch's numbers."""
    m = s.get("metrics") or {}
    keys = ("epoch", "loss", "loss_mask", "loss_distill", "loss_cluster", "cos_ts", "cluster_entropy",
            "student_drift", "teacher_drift")
    shown = ", ".join(f"{k}={m[k]:.4g}" for k in keys if isinstance(m.get(k), (int, float)))
    how = "reused (config unchanged)" if s.get("reused") else "trained"
    where = f" (fold {s['fold']})" if s.get("fold") else ""
    lines = [f"pre-trained adapter{where} {how}: {storage.describe(s['adapter'])}", f"  final epoch: {shown}"]
    if s.get("warning"):
        lines.append(f"  WARNING: {s['warning']}")
    return "\n".join(lines)
