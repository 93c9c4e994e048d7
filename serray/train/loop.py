"""One Ray Train loop for pre-training and fine-tuning.

:func:`train_loop_per_worker` runs on every Train worker. A *task* object (``PretrainTask`` or
``FinetuneTask``) supplies what differs between the stages: ``build_model``, ``collate``,
``step(model, batch, step) -> (loss, records)``, ``after_step`` (the EMA teacher update),
``evaluate`` and the checkpoint metadata. The loop owns everything else: device and DDP
(``prepare_model``), AdamW with warm-up + cosine, gradient clipping, bf16 autocast on GPU,
streaming batches from the worker's dataset shard, per-epoch ``ray.train.report`` with a checkpoint
that holds model, optimiser, step, epoch and history, exact resumption from the latest checkpoint
(after a worker failure or a rerun), and an optional fault injection for tests.

:func:`fit` builds the ``TorchTrainer`` from a config section; the same function serves
``serray pretrain``, every fine-tuning fold and every Tune trial.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections import defaultdict
from typing import Any, Dict, Optional

import torch

from serray import storage
from serray.train.checkpoint import (EPOCH_KEY, MODEL_KEY, OPTIMIZER_KEY, STEP_KEY, load_checkpoint,
                                     save_checkpoint)
from serray.train.schedules import cosine_schedule

log = logging.getLogger(__name__)

HISTORY_KEY = "history"


class InjectedFault(RuntimeError):
    """Raised by the fault-injection option (tests of FailureConfig)."""


def make_task(config: Dict[str, Any]):
    """The task object named by ``config['task']``."""
    if config["task"] == "pretrain":
        from serray.train.pretrain import PretrainTask

        return PretrainTask(config)
    if config["task"] == "finetune":
        from serray.train.finetune import FinetuneTask

        return FinetuneTask(config)
    raise ValueError(f"unknown task {config['task']!r}")


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


def train_loop_per_worker(config: Dict[str, Any]) -> None:
    """The Ray Train worker function shared by every stage (see the module docstring)."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config["seed"])
    task = make_task(config)
    device = ray.train.torch.get_device()
    core = task.build_model()
    params = task.trainable_parameters(core)
    optimizer = torch.optim.AdamW(params, lr=config["lr"], weight_decay=config["weight_decay"])
    step, start_epoch, history = 0, 0, []
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state, _ = load_checkpoint(d)
        core.load_state_dict(state[MODEL_KEY])
        optimizer.load_state_dict(state[OPTIMIZER_KEY])
        step, start_epoch, history = state[STEP_KEY], state[EPOCH_KEY] + 1, list(state[HISTORY_KEY])
        task.load_extra_state(state)
        log.info("resumed from checkpoint: epoch %d, step %d", start_epoch, step)
    model = ray.train.torch.prepare_model(core, parallel_strategy_kwargs={"find_unused_parameters": False})
    core = getattr(model, "module", model)
    total_steps = config["epochs"] * config["steps_per_epoch"]
    warmup = int(config["warmup_frac"] * total_steps)
    amp = device.type == "cuda" and config.get("bf16", True)
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(start_epoch, config["epochs"]):
        model.train()
        acc, frames, t0 = defaultdict(list), 0, time.time()
        batches = shard.iter_torch_batches(batch_size=config["batch_size"], collate_fn=task.collate(train=True, epoch=epoch),
                                           local_shuffle_buffer_size=config.get("shuffle_buffer") or None,
                                           local_shuffle_seed=config["seed"] + epoch if config.get("shuffle_buffer") else None)
        for batch in batches:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            lr = cosine_schedule(config["lr"], config.get("lr_end", 0.0), total_steps, warmup, step)
            for g in optimizer.param_groups:
                g["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss, records = task.step(model, batch, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.get("grad_clip"):
                records["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, config["grad_clip"]))
            optimizer.step()
            records.update(task.after_step(core, step, total_steps))
            records["lr"] = lr
            for k, v in records.items():
                acc[k].append(float(v))
            frames += int((~batch["padding_mask"]).sum())
            step += 1
            _maybe_inject_fault(config, step, rank)
        metrics = {"epoch": epoch, "step": step, **_mean_records(acc),
                   "frames_per_s": frames * world / max(1e-9, time.time() - t0)}
        metrics.update(task.evaluate(model, core, device, epoch))
        history.append(metrics)
        _report(config, task, core, optimizer, step, epoch, history, metrics, rank)


def _report(config, task, core, optimizer, step, epoch, history, metrics, rank) -> None:
    """Every rank reports (it is a barrier); rank 0 attaches the checkpoint."""
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            state = {MODEL_KEY: core.state_dict(), OPTIMIZER_KEY: optimizer.state_dict(), STEP_KEY: step,
                     EPOCH_KEY: epoch, HISTORY_KEY: history, **task.extra_state()}
            save_checkpoint(d, state, task.checkpoint_meta(core, step, epoch), config["config_yaml"])
            checkpoint = Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint)


def steps_per_epoch(num_rows: int, batch_size: int, num_workers: int) -> int:
    """Optimiser steps per epoch on each worker (a shard has no len(), so derive it from row counts)."""
    return max(1, math.ceil(math.ceil(num_rows / num_workers) / batch_size))


def fit(loop_config: Dict[str, Any], datasets: Dict[str, Any], trainer_cfg, storage_path: str, name: str,
        score: tuple[str, str], callbacks: Optional[list] = None):
    """Run one TorchTrainer with serray's loop and return its ``Result``.

    Args:
        loop_config: the worker config (task, hyper-parameters, steps_per_epoch, config_yaml...).
        datasets: Ray Datasets; only ``train`` is split across workers.
        trainer_cfg: a ``pretrain``/``finetune`` config section (num_workers, use_gpu, cpus_per_worker,
            max_failures, keep_checkpoints).
        storage_path: where Ray Train keeps the run (local path or a pyarrow-supported URI).
        name: run name; rerunning with the same name resumes from its latest checkpoint.
        score: (metric, "min"|"max") used to rank checkpoints.
        callbacks: Ray Train user callbacks (e.g. Tune's ``TuneReportCallback``).
    """
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_path, storage_fs = storage.train_storage(storage_path)
    resources = {"CPU": trainer_cfg.cpus_per_worker}
    if trainer_cfg.use_gpu:
        resources["GPU"] = trainer_cfg.gpus_per_worker
    options = ExecutionOptions(preserve_order=True)  # same order every run -> reproducible on CPU
    options.verbose_progress = False
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**loop_config, "num_workers": trainer_cfg.num_workers},
        scaling_config=ScalingConfig(num_workers=trainer_cfg.num_workers, use_gpu=trainer_cfg.use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=trainer_cfg.placement_strategy),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=options),
        run_config=RunConfig(
            storage_path=storage_path, storage_filesystem=storage_fs, name=name,
            failure_config=FailureConfig(max_failures=trainer_cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=trainer_cfg.keep_checkpoints,
                                               checkpoint_score_attribute=score[0], checkpoint_score_order=score[1]),
            callbacks=callbacks,
        ),
    )
    return trainer.fit()
