"""One training loop for pre-training and fine-tuning.

:func:`run_loop` is the loop. A *task* object (:class:`~serray.train.pretrain.PretrainTask` or
:class:`~serray.train.tasks.categorical.FinetuneTask`, passed in by the caller, never imported here) supplies
what differs between the stages: ``build_model``, ``param_groups``, ``lr_scale(group, epoch)``,
``collate``, ``before_epoch`` (which parameters train this epoch), ``step(model, batch, step, rank)
-> (loss, records)``, ``after_step`` (the EMA teacher update), ``evaluate``, ``should_stop`` (early
stopping) and the checkpoint metadata. The loop owns
everything else: device and DDP, AdamW with parameter groups and warm-up + cosine, gradient
clipping, bf16 autocast on GPU, a seeded full shuffle of the training rows every epoch, per-epoch
reports with a checkpoint that holds model, optimiser, step, epoch and history, exact resumption
from the latest checkpoint (after a worker failure or a rerun), and an optional fault injection.

Where the loop runs is a *runtime*: :class:`RayTrainRuntime` on Ray Train workers (what every
serray command uses; :func:`fit` builds the ``TorchTrainer``), or :class:`LocalRuntime` in the
calling process (benchmarks of the plain loop and unit tests of the loop itself).

Training rows reach the loop in one of two ways (``config["data_mode"]``):

* ``memory`` (feature sets below ``features.cache_max_mb``): every worker receives the whole
  training set once, keeps its rows as compact float16 bytes **in utterance-id order** (whatever order
  the featurization wrote them in), and each epoch draws a permutation seeded by ``(run seed, epoch)``;
  worker ``r`` of ``w`` takes every ``w``-th row of it (the ``DistributedSampler`` scheme), so the
  shuffle is global and reproducible on CPU;
* ``stream`` (larger sets): the driver hands Ray Data a dataset sorted by a seeded hash of the
  utterance id (:func:`serray.data.features.training.training_data`), split across the workers.

Every run seeds every generator it uses (model init, dropout, masking, crops, the epoch order) from
its own :func:`run_seed` -- ``(seed, fold, stage)`` --, never from what ran before it in the process,
so a result depends on the corpus, the config and the seed only.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections import defaultdict
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

import numpy as np
import torch

from serray import storage
from serray.data.features.training import Rows
from serray.train.checkpoint import (EPOCH_KEY, MODEL_KEY, OPTIMIZER_KEY, STEP_KEY, load_checkpoint,
                                     save_checkpoint)
from serray.train.schedules import cosine_schedule

log = logging.getLogger(__name__)

HISTORY_KEY = "history"


def run_seed(seed: int, *parts: int | str) -> int:
    """The seed of one run's generators, derived from the config seed and the run's identity
    (``fold``, ``"pretrain"`` / ``"finetune"``), so runs that share a process never share a stream."""
    import zlib

    words = [int(seed) & 0xFFFFFFFF] + [zlib.crc32(p.encode()) if isinstance(p, str) else int(p) & 0xFFFFFFFF
                                         for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


class InjectedFault(RuntimeError):
    """Raised by the fault-injection option (tests of FailureConfig)."""


def epoch_order(n: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """This worker's rows for one epoch: a permutation seeded by ``(seed, epoch)``, every
    ``world``-th entry from ``rank``, padded by wrapping so that every worker gets the same count."""
    perm = np.random.default_rng([int(seed), 0x5EED, int(epoch)]).permutation(n)
    per_worker = math.ceil(n / world)
    if per_worker * world > n:
        perm = np.concatenate([perm, perm[: per_worker * world - n]])
    return perm[rank::world]


def memory_batches(rows: Rows, order: np.ndarray, batch_size: int, collate: Callable) -> Iterator[Dict[str, torch.Tensor]]:
    """Collated batches of ``rows`` in ``order``."""
    for i in range(0, len(order), batch_size):
        yield collate(rows.take(order[i : i + batch_size]))


def eval_batches(rows: Rows, batch_size: int, collate: Callable) -> Iterator[Dict[str, torch.Tensor]]:
    """Whole-set evaluation batches, sorted by length (little padding), padded one batch at a time."""
    order = np.argsort(rows.lengths(), kind="stable")
    return memory_batches(rows, order, batch_size, collate)


# ---------------------------------------------------------------- runtimes


class RayTrainRuntime:
    """The loop on a Ray Train worker (rank, device, DDP, dataset shards, report with checkpoint)."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare_model(self, core: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(core, parallel_strategy_kwargs={"find_unused_parameters": False})

    def checkpoint_state(self):
        """The latest readable checkpoint's state: Ray Train's latest, or (when that one is torn) the
        newest readable ``checkpoint_*`` beside it in the run's storage."""
        import ray.train
        from ray.train import Checkpoint

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        import pyarrow.fs as pafs

        parent = ckpt.path.rstrip("/").rsplit("/", 1)[0]
        try:
            infos = ckpt.filesystem.get_file_info(pafs.FileSelector(parent, recursive=False))
            siblings = sorted((i.path for i in infos if i.type == pafs.FileType.Directory
                               and i.base_name.startswith("checkpoint_") and i.path != ckpt.path), reverse=True)
        except OSError:
            siblings = []
        candidates = [ckpt] + [Checkpoint(path=p, filesystem=ckpt.filesystem) for p in siblings]
        return first_readable(candidates, _load_ray_checkpoint, lambda c: c.path)

    def dataset(self, name: str):
        import ray.train

        return ray.train.get_dataset_shard(name)

    def rows(self, name: str) -> Rows:
        return Rows.from_batches(self.dataset(name).iter_batches(batch_size=256, batch_format="numpy"))

    def stream(self, name: str, batch_size: int, collate) -> Iterable:
        return self.dataset(name).iter_torch_batches(batch_size=batch_size, collate_fn=collate)

    def report(self, metrics: Dict[str, Any], save: Optional[Callable[[str], None]]) -> None:
        """Every rank reports (it is a barrier); rank 0 attaches the checkpoint written by ``save``."""
        import ray.train
        from ray.train import Checkpoint

        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if self.rank == 0 and save is not None:
                save(d)
                checkpoint = Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)


class LocalRuntime:
    """The same loop in the calling process (one worker, no Ray Train): the ``local`` backend of
    :func:`fit`, the plain-loop benchmark and unit tests of the loop.

    Checkpoints go to ``checkpoint_dir/epoch_<k>`` (a local path or a storage URI); the latest one is
    what a rerun resumes from. With ``keep``, only the best ``keep`` by ``score`` and the latest stay.
    """

    def __init__(self, datasets: Dict[str, Any], checkpoint_dir: Optional[str] = None,
                 device: str | torch.device = "cpu", on_report: Optional[Callable[[Dict[str, Any]], None]] = None,
                 keep: Optional[int] = None, score: tuple[str, str] = ("epoch", "max")):
        self.rank, self.world = 0, 1
        self.device = torch.device(device)
        self.datasets = datasets  # name -> Rows (memory) or a Ray Dataset (stream)
        self.checkpoint_dir = checkpoint_dir
        self.on_report = on_report
        self.keep, self.score = keep, score
        self.reports: List[Dict[str, Any]] = []

    def prepare_model(self, core):
        return core.to(self.device)

    def _epoch_dirs(self) -> List[str]:
        if not self.checkpoint_dir or not storage.is_dir(self.checkpoint_dir):
            return []
        dirs = [d for d in storage.listdir(self.checkpoint_dir) if storage.name(d).startswith("epoch_")
                and storage.is_file(storage.join(d, "meta.json"))]
        return sorted(dirs, key=lambda d: int(storage.name(d).split("_")[1]))

    def checkpoint_state(self):
        """The newest readable epoch checkpoint's state (a torn one is reported and skipped)."""
        return first_readable(list(reversed(self._epoch_dirs())), lambda d: load_checkpoint(d)[0], storage.describe)

    def kept_checkpoints(self) -> List[tuple]:
        """``[(directory, metrics)]`` of the stored, readable epochs, oldest first."""
        import json

        out = []
        for d in self._epoch_dirs():
            try:
                meta = json.loads(storage.read_text(storage.join(d, "meta.json")))
            except (ValueError, UnicodeDecodeError):
                log.warning("skipping checkpoint %s: its meta.json is not valid JSON", storage.describe(d))
                continue
            out.append((d, meta.get("metrics", {})))
        return out

    def rows(self, name: str) -> Rows:
        return self.datasets[name]

    def stream(self, name: str, batch_size: int, collate) -> Iterable:
        return self.datasets[name].iter_torch_batches(batch_size=batch_size, collate_fn=collate)

    def report(self, metrics: Dict[str, Any], save: Optional[Callable[[str], None]]) -> None:
        self.reports.append(dict(metrics))
        if save is not None and self.checkpoint_dir:
            target = storage.join(self.checkpoint_dir, f"epoch_{metrics['epoch']}")
            with storage.staged(target) as d:
                save(str(d), metrics=metrics)
            self._prune()
        if self.on_report is not None:
            self.on_report(metrics)

    def _prune(self) -> None:
        if not self.keep:
            return
        kept = self.kept_checkpoints()
        key, order = self.score
        ranked = sorted(kept[:-1], key=lambda pm: pm[1].get(key, float("-inf") if order == "max" else float("inf")),
                        reverse=order == "max")
        for d, _ in ranked[self.keep:]:
            storage.remove(d)


def first_readable(candidates: List[Any], load: Callable[[Any], Any], name: Callable[[Any], str]):
    """``load`` of the first candidate that loads (newest first), reporting every torn one it skips;
    None when there are none. A torn checkpoint must not block every rerun when an older one is intact."""
    from serray.errors import CheckpointError

    for i, c in enumerate(candidates):
        try:
            state = load(c)
        except CheckpointError as e:
            later = "the one before it" if i + 1 < len(candidates) else "no checkpoint (from the start)"
            log.warning("cannot resume from %s (%s); resuming from %s", name(c), e, later)
            continue
        return state
    return None


def _load_ray_checkpoint(ckpt):
    with ckpt.as_directory() as d:
        return load_checkpoint(d)[0]


# ---------------------------------------------------------------- the loop


def _mean_records(acc: Dict[str, list]) -> Dict[str, float]:
    return {k: float(sum(v) / len(v)) for k, v in acc.items() if v}


def _maybe_inject_fault(config: Dict[str, Any], step: int, rank: int) -> None:
    """Fail once at ``fail_at_step`` on the last rank (a marker file makes it happen only once)."""
    fail_at, marker = config.get("fail_at_step"), config.get("fault_marker")
    if fail_at is None or step != fail_at or marker is None:
        return
    world = config.get("num_workers", 1)
    if rank == world - 1 and not storage.exists(marker):
        storage.write_text(marker, f"failed at step {step}\n")
        raise InjectedFault(f"injected worker failure at step {step} (rank {rank})")


def build_optimizer(task, core: torch.nn.Module, config: Dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW over the task's parameter groups (each carries ``lr_scale`` and ``name``)."""
    groups = task.param_groups(core, config["weight_decay"])
    return torch.optim.AdamW(groups, lr=config["lr"])


def train_loop_per_worker(config: Dict[str, Any]) -> None:
    """The Ray Train worker function: :func:`run_loop` with :class:`RayTrainRuntime`."""
    run_loop(config["task_cls"](config), config, RayTrainRuntime())


def run_loop(task, config: Dict[str, Any], rt) -> List[Dict[str, Any]]:
    """Train ``task`` for ``config["epochs"]`` epochs on runtime ``rt``; return the history.

    Resumption: the model is moved to its device (and wrapped for DDP) *before* the optimiser is
    built and its state loaded, so restored optimiser state lives on the parameters' device.
    """
    seed = config.get("run_seed", config["seed"])
    torch.manual_seed(seed)
    core = task.build_model()
    model = rt.prepare_model(core)
    core = getattr(model, "module", model)
    optimizer = build_optimizer(task, core, config)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    step, start_epoch, history = 0, 0, []
    state = rt.checkpoint_state()
    if state is not None:
        core.load_state_dict(state[MODEL_KEY])
        optimizer.load_state_dict(state[OPTIMIZER_KEY])
        step, start_epoch, history = state[STEP_KEY], state[EPOCH_KEY] + 1, list(state[HISTORY_KEY])
        task.load_extra_state(state)
        log.info("resumed from checkpoint: epoch %d, step %d", start_epoch, step)
    resumed_at = {"resumed_epoch": start_epoch, "resumed_step": step} if state is not None else {}
    total_steps = config.get("total_steps") or config["epochs"] * config["steps_per_epoch"]
    warmup = int(config["warmup_frac"] * total_steps)
    device = rt.device
    amp = device.type == "cuda" and config.get("bf16", True)
    memory = config.get("data_mode", "memory") == "memory"
    rows = rt.rows("train") if memory else None
    if history and task.should_stop(history):
        return history
    from serray.tracking import LoopRun

    tracking = LoopRun(config.get("tracking"), rt.rank)  # MLflow through Ray's setup_mlflow on rank 0; a resume continues the run
    try:
        for epoch in range(start_epoch, config["epochs"]):
            model.train()
            task.before_epoch(core, epoch)  # e.g. a frozen warm-up: the body gets no gradients this epoch
            acc, frames, t0 = defaultdict(list), 0, time.time()
            collate = task.collate(train=True, epoch=epoch)
            if memory:
                order = epoch_order(len(rows), seed, epoch, rt.rank, rt.world)
                batches = memory_batches(rows, order, config["batch_size"], collate)
            else:
                batches = rt.stream("train", config["batch_size"], collate)
            scales = [task.lr_scale(g, epoch) for g in optimizer.param_groups]
            for batch in batches:
                if step >= total_steps:  # pretrain.steps: the last epoch may end early
                    break
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                lr = cosine_schedule(config["lr"], config.get("lr_end", 0.0), total_steps, warmup, step)
                for g, scale in zip(optimizer.param_groups, scales):
                    g["lr"] = lr * scale
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    loss, records = task.step(model, batch, step, rt.rank)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.get("grad_clip"):
                    records["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, config["grad_clip"]))
                optimizer.step()
                records.update(task.after_step(core, step, total_steps))
                records["lr"] = lr
                for g in optimizer.param_groups:  # what each group really got (body x body_lr_scale, frozen = 0)
                    records[f"lr_{g.get('name', 'group')}"] = g["lr"]
                for k, v in records.items():
                    acc[k].append(float(v))
                frames += int((~batch["padding_mask"]).sum())
                step += 1
                _maybe_inject_fault(config, step, rt.rank)
            metrics = {"epoch": epoch, "epochs": config["epochs"], "stage_id": getattr(task, "stage_id", -1), "step": step,
                       **_mean_records(acc), **resumed_at, "frames_per_s": frames * rt.world / max(1e-9, time.time() - t0)}
            metrics.update(task.evaluate(model, core, rt, epoch))
            history.append(metrics)
            if hasattr(task, "score_epoch"):  # a score over the epochs so far (smoothed selection metric)
                metrics.update(task.score_epoch(history))
            tracking.log(metrics, epoch)
            stop = task.should_stop(history)

            def save(d: str, epoch=epoch, step=step, metrics=None) -> None:
                state = {MODEL_KEY: core.state_dict(), OPTIMIZER_KEY: optimizer.state_dict(), STEP_KEY: step,
                         EPOCH_KEY: epoch, HISTORY_KEY: history, **task.extra_state()}
                meta = task.checkpoint_meta(core, step, epoch)
                if metrics is not None:  # the local backend ranks its checkpoints by these
                    meta["metrics"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
                save_checkpoint(d, state, meta, config["config_yaml"])

            rt.report({**metrics, "stopped_early": int(stop)}, save)
            if stop:
                log.info("early stop after epoch %d", epoch)
                break
    except BaseException:
        tracking.close("FAILED")
        raise
    tracking.close()
    return history


def steps_per_epoch(num_rows: int, batch_size: int, num_workers: int) -> int:
    """Optimiser steps per epoch on each worker (a shard has no len(), so derive it from row counts)."""
    return max(1, math.ceil(math.ceil(num_rows / num_workers) / batch_size))


def backend(trainer_cfg) -> str:
    """Where a stage's loop runs: ``ray`` (a Ray Train ``TorchTrainer``) or ``local`` (in the calling
    process: the driver, or the Ray Tune trial that runs the fold).

    ``auto`` picks ``ray`` for several workers (DDP) and ``local`` for one: a one-worker Ray Train
    run adds nothing but its fixed start-up (measured about 35 s per fit on a 2-core machine, against
    under a second in-process), which dominates the many short runs of a leave-one-session-out
    evaluation, a sweep or an ablation.
    """
    choice = trainer_cfg.get("backend", "auto")
    if choice == "auto":
        return "ray" if trainer_cfg.num_workers > 1 else "local"
    return choice


def worker_resources(trainer_cfg) -> Dict[str, float]:
    """What one training worker of a ``pretrain``/``finetune`` section asks Ray for."""
    resources = {"CPU": trainer_cfg.cpus_per_worker}
    if trainer_cfg.use_gpu:
        resources["GPU"] = trainer_cfg.gpus_per_worker
    return resources


def wait_for_workers(cfg, stage: str) -> None:
    """A clear error (after ``ray.resource_timeout_s``) when no node of the cluster can host one worker
    of ``cfg.<stage>``, instead of a run that waits for it forever."""
    from serray.ray_utils import wait_for_node

    wait_for_node(worker_resources(cfg[stage]), float(cfg.ray.resource_timeout_s),
                  f"a {stage} worker ({stage}.cpus_per_worker / {stage}.use_gpu)", "ray.resource_timeout_s")


def fit(task_cls, loop_config: Dict[str, Any], datasets: Dict[str, Any], trainer_cfg, storage_path: str, name: str,
        score: tuple[str, str], report_to_tune: bool = False):
    """Run the loop for one stage (Ray Train, or in-process; see :func:`backend`) and return its result.

    Args:
        task_cls: the task class (constructed on every worker from the loop config).
        loop_config: the worker config (hyper-parameters, steps_per_epoch, config_yaml...).
        datasets: ``name -> TrainingData`` (:mod:`serray.data.features.training`); ``train`` sets the data
            mode. With ``stream`` only ``train`` is split across Ray Train workers; with ``memory`` every
            worker gets every dataset whole (and shuffles by the seed itself).
        trainer_cfg: a ``pretrain``/``finetune`` config section (backend, num_workers, use_gpu,
            cpus_per_worker, max_failures, keep_checkpoints).
        storage_path: where the run keeps its checkpoints (local path or a pyarrow-supported URI).
        name: run name; rerunning with the same name resumes from its latest checkpoint.
        score: (metric, "min"|"max") used to rank checkpoints.
        report_to_tune: also report every epoch to Ray Tune (inside a trial: ASHA sees each epoch).

    Returns:
        An object with ``metrics`` (the latest report), ``checkpoint`` (the latest) and
        ``best_checkpoints`` (``[(Checkpoint, metrics)]``, the best ``keep_checkpoints`` by ``score``).
    """
    loop_config = {**loop_config, "data_mode": datasets["train"].mode, "num_workers": trainer_cfg.num_workers}
    if backend(trainer_cfg) == "local":
        return _fit_local(task_cls, loop_config, datasets, trainer_cfg, storage_path, name, score, report_to_tune)
    return _fit_ray(task_cls, loop_config, datasets, trainer_cfg, storage_path, name, score, report_to_tune)


def _fit_ray(task_cls, loop_config, datasets, trainer_cfg, storage_path, name, score, report_to_tune):
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    callbacks = None
    if report_to_tune:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks = [TuneReportCallback()]
    storage_path, storage_fs = storage.train_storage(storage_path)
    resources = worker_resources(trainer_cfg)
    options = ExecutionOptions(preserve_order=True)  # same order every run -> reproducible on CPU
    options.verbose_progress = False
    split = ["train"] if loop_config["data_mode"] == "stream" else []
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**loop_config, "task_cls": task_cls},
        scaling_config=ScalingConfig(num_workers=trainer_cfg.num_workers, use_gpu=trainer_cfg.use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=trainer_cfg.placement_strategy),
        datasets={k: v.ray_dataset() for k, v in datasets.items()},
        dataset_config=DataConfig(datasets_to_split=split, execution_options=options),
        run_config=RunConfig(
            storage_path=storage_path, storage_filesystem=storage_fs, name=name,
            failure_config=FailureConfig(max_failures=trainer_cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=trainer_cfg.keep_checkpoints,
                                               checkpoint_score_attribute=score[0], checkpoint_score_order=score[1]),
            callbacks=callbacks,
        ),
    )
    return trainer.fit()


class LocalResult:
    """What :func:`fit` returns for the local backend (the fields of Ray Train's ``Result`` that
    serray reads)."""

    def __init__(self, metrics, checkpoint, best_checkpoints):
        self.metrics, self.checkpoint, self.best_checkpoints = metrics, checkpoint, best_checkpoints


def _fit_local(task_cls, loop_config, datasets, trainer_cfg, storage_path, name, score, report_to_tune):
    """The loop in this process, checkpointing every epoch under ``storage_path/name/epoch_<k>``
    (a rerun resumes from the latest; the best ``keep_checkpoints`` by ``score`` and the latest are
    kept), with retries from the latest checkpoint up to ``max_failures``."""
    from ray.train import Checkpoint

    run_dir = storage.join(storage.absolute(storage_path), name)
    device = "cuda" if trainer_cfg.use_gpu and torch.cuda.is_available() else "cpu"
    on_report = None
    if report_to_tune:
        import ray.tune

        on_report = lambda m: ray.tune.report({k: v for k, v in m.items() if isinstance(v, (int, float))})  # noqa: E731
    data = {k: (v.rows() if v.mode == "memory" else v.ray_dataset()) for k, v in datasets.items()}
    attempts = 0
    while True:
        rt = LocalRuntime(data, checkpoint_dir=run_dir, device=device, on_report=on_report,
                          keep=trainer_cfg.keep_checkpoints, score=score)
        try:
            run_loop(task_cls(loop_config), loop_config, rt)
            break
        except Exception:  # as Ray Train's FailureConfig: retry from the latest checkpoint
            attempts += 1
            if attempts > trainer_cfg.max_failures:
                raise
            log.warning("training failed (attempt %d of %d); resuming from the latest checkpoint",
                        attempts, trainer_cfg.max_failures + 1, exc_info=True)
    kept = rt.kept_checkpoints()
    fs, _ = storage.train_storage(run_dir)

    def ckpt(path):
        return Checkpoint(path=storage.resolve(path)[1], filesystem=storage.resolve(path)[0]) if fs else Checkpoint.from_directory(path)

    latest = kept[-1] if kept else None
    best = sorted(kept, key=lambda pm: pm[1].get(score[0], float("nan")), reverse=score[1] == "max")
    best = best[: trainer_cfg.keep_checkpoints]
    return LocalResult(latest[1] if latest else None, ckpt(latest[0]) if latest else None,
                       [(ckpt(p), m) for p, m in best])
