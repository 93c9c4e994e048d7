"""The shared training loop without Ray (``serray.train.loop.run_loop`` on a ``LocalRuntime``):
shuffling, parameter groups and learning rates, frozen warm-up, early stopping, resumption, and a
pre-training that learns frame-level structure."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serray.data.features.training import Rows
from serray.train.loop import LocalRuntime, epoch_order, memory_batches, run_loop

D = 8


def _rows(feats, labels) -> Rows:
    return Rows({"feat": np.array([np.ascontiguousarray(f, np.float16).tobytes() for f in feats], dtype=object),
                 "num_frames": np.array([len(f) for f in feats]), "dim": np.full(len(feats), D),
                 "num_layers": np.ones(len(feats), dtype=np.int64), "label": np.array(labels, dtype=object)})


# ---------------------------------------------------------------- shuffling


def test_first_batches_of_an_epoch_mix_sessions_and_lengths() -> None:
    """Stored rows come sorted by session and duration; every epoch draws a new seeded permutation of
    all of them, so a batch is not one session and one length band."""
    sessions = np.repeat([1, 2, 3, 4], 100)
    lengths = np.tile(np.arange(50, 150), 4)  # sorted by length inside each session
    n, batch = len(sessions), 16
    for epoch in range(3):
        order = epoch_order(n, seed=0, epoch=epoch)
        assert sorted(order) == list(range(n))  # every row exactly once
        for first in (order[:batch], order[batch : 2 * batch]):
            assert len(set(sessions[first])) >= 3
            assert np.ptp(lengths[first]) > 50  # a wide spread of lengths, not one band
    assert not np.array_equal(epoch_order(n, 0, 0), epoch_order(n, 0, 1))  # a new order every epoch
    np.testing.assert_array_equal(epoch_order(n, 0, 1), epoch_order(n, 0, 1))  # reproducible
    assert not np.array_equal(epoch_order(n, 0, 1), epoch_order(n, 1, 1))


def test_workers_take_disjoint_equal_slices_of_one_global_permutation() -> None:
    n, world = 103, 4
    parts = [epoch_order(n, seed=3, epoch=2, rank=r, world=world) for r in range(world)]
    assert len({len(p) for p in parts}) == 1  # equal steps on every DDP worker
    covered = np.concatenate(parts)
    assert set(covered) == set(range(n)) and len(covered) - n == len(parts[0]) * world - n  # padded by wrapping


def test_memory_batches_decode_the_rows_in_order() -> None:
    from serray.data.features.training import PadCollate

    rng = np.random.default_rng(0)
    feats = [rng.normal(size=(t, D)).astype(np.float16) for t in (5, 9, 3)]
    rows = _rows(feats, ["neu", "", "ang"])
    (batch,) = list(memory_batches(rows, np.array([2, 0, 1]), 3, PadCollate(None, random_crop=False)))
    assert batch["x"].shape == (3, 9, D)
    torch.testing.assert_close(batch["x"][0, :3], torch.from_numpy(feats[2].astype(np.float32)))
    assert batch["padding_mask"][0].tolist() == [False] * 3 + [True] * 6
    assert batch["labels"].tolist() == [3, 0, -1]


# ---------------------------------------------------------------- fine-tuning recipe


def _finetune_config(**kw) -> dict:
    body = dict(input_dim=D, d_model=16, num_layers=1, num_heads=2, ff_dim=32, dropout=0.0, num_input_layers=1,
                pos_conv_kernel=5, pos_conv_groups=4)
    config = {"seed": 0, "fold": 1, "mode": "finetune", "branch": "teacher", "init": "random", "config_yaml": "",
              "config_hash": "x", "features": {}, "feature_stats": [np.zeros((1, D)).tolist(), np.ones((1, D)).tolist()],
              "model": {"input_dim": D, "num_classes": 4, "num_input_layers": 1, "body": body, "freeze_body": False,
                        "attention_dim": 8, "hidden_dim": 16, "dropout": 0.0},
              "data_mode": "memory", "audit": {}, "init_from": "", "class_weights": None, "epochs": 3,
              "batch_size": 8, "lr": 1e-2, "lr_end": 1e-2, "weight_decay": 0.01, "warmup_frac": 0.0, "grad_clip": 1.0,
              "max_frames": None, "bf16": False, "fail_at_step": None, "body_lr_scale": 0.1, "freeze_epochs": 0,
              "patience": None}
    config.update(kw)
    return config


def _labelled(n: int = 48, seed: int = 0) -> Rows:
    """Four classes told apart by the mean of the frames."""
    rng = np.random.default_rng(seed)
    labels = [("neu", "hap", "sad", "ang")[i % 4] for i in range(n)]
    feats = [rng.normal(loc=(i % 4) - 1.5, size=(int(rng.integers(10, 30)), D)) for i in range(n)]
    return _rows(feats, labels)


def _run_finetune(tmp_path=None, **kw):
    from serray.train.finetune import FinetuneTask

    config = _finetune_config(**kw)
    rows = _labelled()
    config["steps_per_epoch"] = -(-len(rows) // config["batch_size"])
    task = FinetuneTask(config)
    rt = LocalRuntime({"train": rows, "val": _labelled(16, seed=1)},
                      checkpoint_dir=str(tmp_path) if tmp_path else None)
    history = run_loop(task, config, rt)
    return task, rt, history


def test_body_learning_rate_is_the_heads_times_body_lr_scale() -> None:
    _, _, history = _run_finetune(body_lr_scale=0.1)
    for h in history:
        assert h["lr_head_decay"] == pytest.approx(1e-2)
        assert h["lr_body_decay"] == pytest.approx(1e-2 * 0.1)
        assert h["lr_body_no_decay"] == pytest.approx(h["lr_head_no_decay"] * 0.1)


def test_frozen_warm_up_keeps_the_body_and_trains_the_head() -> None:
    from serray.train.finetune import FinetuneTask

    config = _finetune_config(freeze_epochs=1, epochs=2)
    rows = _labelled()
    config["steps_per_epoch"] = -(-len(rows) // config["batch_size"])
    snapshots = {}

    class Spy(FinetuneTask):
        def evaluate(self, model, core, rt, epoch):
            snapshots[epoch] = ({k: v.clone() for k, v in core.body.state_dict().items()},
                                {k: v.clone() for k, v in core.head.state_dict().items()})
            return super().evaluate(model, core, rt, epoch)

    task = Spy(config)
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in task.build_model().body.state_dict().items()}
    history = run_loop(task, config, LocalRuntime({"train": rows, "val": _labelled(16, 1)}))
    body0, _ = snapshots[0]
    assert all(torch.equal(body0[k], init[k]) for k in init)  # epoch 0: body untouched
    assert history[0]["lr_body_decay"] == 0.0 and history[0]["lr_head_decay"] > 0
    body1, _ = snapshots[1]
    assert any(not torch.equal(body1[k], init[k]) for k in init if k.endswith("weight"))  # epoch 1: body learns


def test_frozen_warm_up_gives_the_body_no_gradient_no_optimizer_state_and_no_share_of_the_clip(tmp_path) -> None:
    """finetune.freeze_epochs used to set the body's learning rate to 0 only: its gradients still
    filled AdamW's moments and entered the clipping norm. Now the body is frozen for real."""
    from serray.train.checkpoint import OPTIMIZER_KEY, load_checkpoint
    from serray.train.finetune import FinetuneTask

    config = _finetune_config(freeze_epochs=1, epochs=2, grad_clip=1e-3)
    rows = _labelled()
    config["steps_per_epoch"] = -(-len(rows) // config["batch_size"])
    grads = {}

    class Spy(FinetuneTask):
        def evaluate(self, model, core, rt, epoch):
            grads[epoch] = ([p.grad for p in core.body.parameters()], [p.grad for p in core.head.parameters()])
            return super().evaluate(model, core, rt, epoch)

    run_loop(Spy(config), config, LocalRuntime({"train": rows, "val": _labelled(16, 1)}, checkpoint_dir=str(tmp_path)))
    body0, head0 = grads[0]
    assert all(g is None for g in body0) and all(g is not None for g in head0)
    assert any(g is not None for g in grads[1][0])  # epoch 1: the body learns
    state, _ = load_checkpoint(str(tmp_path / "epoch_0"))
    opt = state[OPTIMIZER_KEY]
    body_ids = [i for g in opt["param_groups"] if g["name"].startswith("body_") for i in g["params"]]
    head_ids = [i for g in opt["param_groups"] if g["name"].startswith("head_") for i in g["params"]]
    assert body_ids and not any(i in opt["state"] for i in body_ids), "the frozen body has optimizer state"
    assert all(i in opt["state"] for i in head_ids)


@pytest.mark.parametrize("torn", ["meta.json", "state.pt"])
def test_a_torn_checkpoint_is_skipped_and_the_one_before_resumes(tmp_path, torn, caplog) -> None:
    """A truncated epoch_1/meta.json was a JSONDecodeError, a truncated state.pt a PytorchStreamReader
    error, on every rerun, although epoch_0 was intact. Now the rerun reports it and resumes from
    epoch_0, and the redone epoch 1 is written whole."""
    import logging

    from serray.train.checkpoint import EPOCH_KEY, load_checkpoint
    from serray.train.finetune import FinetuneTask

    config = _finetune_config(epochs=2)
    rows = _labelled()
    config["steps_per_epoch"] = -(-len(rows) // config["batch_size"])
    data = {"train": rows, "val": _labelled(16, 1)}
    clean = run_loop(FinetuneTask(config), config, LocalRuntime(data, checkpoint_dir=str(tmp_path / "clean")))
    run_loop(FinetuneTask(config), config, LocalRuntime(data, checkpoint_dir=str(tmp_path)))
    f = tmp_path / "epoch_1" / torn
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    rt = LocalRuntime(data, checkpoint_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="serray.train.loop"):
        assert rt.checkpoint_state()[EPOCH_KEY] == 0
    assert "cannot resume from" in caplog.text and "epoch_1" in caplog.text
    history = run_loop(FinetuneTask(config), config, rt)
    assert [h["epoch"] for h in history] == [0, 1] and history[-1]["resumed_epoch"] == 1
    assert history[-1]["val_ua"] == clean[-1]["val_ua"] and history[-1]["loss"] == pytest.approx(clean[-1]["loss"])
    assert load_checkpoint(tmp_path / "epoch_1")[0][EPOCH_KEY] == 1  # rewritten whole
    assert not list(tmp_path.glob("**/.*.tmp-*"))  # no temporaries left behind


def test_early_stopping_on_validation_ua() -> None:
    from serray.train.finetune import FinetuneTask

    scripted = [0.5, 0.7, 0.6, 0.6, 0.65, 0.9]

    class Scripted(FinetuneTask):
        def evaluate(self, model, core, rt, epoch):
            out = super().evaluate(model, core, rt, epoch)
            out["val_ua"] = scripted[epoch]
            out["val_selection"] = scripted[epoch] - 1e-6 * out["val_loss"]
            return out

    config = _finetune_config(epochs=6, patience=2)
    rows = _labelled()
    config["steps_per_epoch"] = -(-len(rows) // config["batch_size"])
    rt = LocalRuntime({"train": rows, "val": _labelled(16, 1)})
    history = run_loop(Scripted(config), config, rt)
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]  # best at epoch 1, two epochs without gain
    assert rt.reports[-1]["stopped_early"] == 1


def test_selection_ties_are_broken_by_validation_loss() -> None:
    from serray.train.finetune import FinetuneTask

    task = FinetuneTask(_finetune_config(patience=1))
    hist = [{"val_selection": 0.6 - 1e-6 * 1.2}, {"val_selection": 0.6 - 1e-6 * 0.9}]
    assert max(range(2), key=lambda i: hist[i]["val_selection"]) == 1  # same UA, lower loss wins
    assert not task.should_stop(hist)


def test_resume_continues_where_it_stopped_and_equals_an_uninterrupted_run(tmp_path) -> None:
    """A rerun with the same checkpoint directory resumes (it reports where) instead of restarting,
    its optimiser state lives on the parameters' device, and it ends where an uninterrupted run ends."""
    _, rt_full, full = _run_finetune(epochs=4)
    _run_finetune(tmp_path / "ck", epochs=2)  # "interrupted" after 2 epochs
    task, rt, resumed = _run_finetune(tmp_path / "ck", epochs=4)
    assert [r["epoch"] for r in rt.reports] == [2, 3]  # only the missing epochs ran
    assert rt.reports[0]["resumed_epoch"] == 2 and rt.reports[0]["resumed_step"] == 2 * full[0]["step"]
    assert [h["epoch"] for h in resumed] == [0, 1, 2, 3]
    for a, b in zip(full, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["val_ua"] == pytest.approx(b["val_ua"])


def test_restored_optimiser_state_is_on_the_parameters_device(tmp_path) -> None:
    """The model is moved to its device before the optimiser is built and its state loaded (on a GPU
    the reverse order fails at the first step after a resume)."""
    from serray.train.finetune import FinetuneTask
    from serray.train.loop import build_optimizer, load_checkpoint

    _run_finetune(tmp_path / "ck", epochs=1)
    config = _finetune_config()
    task = FinetuneTask(config)
    rt = LocalRuntime({}, checkpoint_dir=str(tmp_path / "ck"))
    core = rt.prepare_model(task.build_model())
    opt = build_optimizer(task, core, config)
    state = rt.checkpoint_state()
    opt.load_state_dict(state["optimizer"])
    devices = {v.device for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0}
    assert devices == {next(core.parameters()).device}
    assert load_checkpoint  # the same loader the runtime uses


# ---------------------------------------------------------------- pre-training learns frame structure


def _smooth_utterances(n: int, t: int, seed: int) -> list:
    """Frames that follow smooth per-utterance trajectories: a masked frame is predictable from its
    neighbours, not from the utterance's average."""
    proj = np.random.default_rng(1234).normal(size=(3, D))  # one "speaker": the same for every draw
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        time = np.arange(t)[:, None] / 100.0
        freq, phase = rng.uniform(1.0, 4.0, 3), rng.uniform(0, 2 * np.pi, 3)
        z = np.sin(2 * np.pi * freq * time + phase)  # [t, 3]
        out.append((z @ proj + 0.05 * rng.normal(size=(t, D))).astype(np.float32))
    return out


def test_history_logs_the_ema_decay_each_epoch_really_used() -> None:
    """history (and so history.csv) holds each epoch's mean decay, which follows the configured ramp."""
    from serray.train.pretrain import PretrainTask, ema_momentum

    feats = _smooth_utterances(24, 40, seed=0)
    frames = np.concatenate(feats)
    config = {"seed": 0, "config_yaml": "", "config_hash": "x", "features": {}, "pool": {}, "data_mode": "memory",
              "feature_stats": [frames.mean(0, keepdims=True).tolist(), frames.std(0, keepdims=True).tolist()],
              "model": dict(input_dim=D, d_model=16, num_layers=1, num_heads=2, ff_dim=32, dropout=0.0, mask_ratio=0.5,
                            mask_span=4, num_clusters=4, pos_conv_kernel=9, pos_conv_groups=4),
              "ema_decay": 0.9, "ema_decay_end": 0.99, "ema_half_life": None, "epochs": 3, "batch_size": 8,
              "lr": 1e-3, "lr_end": 0.0, "weight_decay": 0.01, "warmup_frac": 0.0, "grad_clip": 1.0,
              "max_frames": None, "bf16": False, "fail_at_step": None, "steps_per_epoch": 3}
    history = run_loop(PretrainTask(config), config, LocalRuntime({"train": _rows(feats, [""] * len(feats))}))
    total = 9
    for h in history:
        steps = range(3 * h["epoch"], 3 * h["epoch"] + 3)
        assert h["ema_decay"] == pytest.approx(np.mean([ema_momentum(0.9, 0.99, total, s) for s in steps]))
    assert history[0]["ema_decay"] < history[1]["ema_decay"] < history[2]["ema_decay"] < 0.99


@pytest.mark.slow
def test_pretraining_reconstructs_masked_frames_better_than_any_constant_per_utterance(tmp_path) -> None:
    from serray.models.adapter import Adapter
    from serray.train.checkpoint import load_checkpoint
    from serray.train.pretrain import PretrainTask

    feats = _smooth_utterances(64, 100, seed=0)
    frames = np.concatenate(feats)
    config = {"seed": 0, "config_yaml": "", "config_hash": "x", "features": {}, "pool": {}, "data_mode": "memory",
              "feature_stats": [frames.mean(0, keepdims=True).tolist(), frames.std(0, keepdims=True).tolist()],
              "model": dict(input_dim=D, d_model=32, num_layers=2, num_heads=4, ff_dim=64, dropout=0.0, mask_ratio=0.5,
                            mask_span=8, num_clusters=8, pos_conv_kernel=33, pos_conv_groups=4),
              "ema_decay": 0.996, "ema_decay_end": 0.9999, "ema_half_life": 0.05, "epochs": 40, "batch_size": 16,
              "lr": 2e-3, "lr_end": 1e-4, "weight_decay": 0.01, "warmup_frac": 0.05, "grad_clip": 1.0,
              "max_frames": None, "bf16": False, "fail_at_step": None}
    config["steps_per_epoch"] = 4
    task = PretrainTask(config)
    ckpt = tmp_path / "ck"
    history = run_loop(task, config, LocalRuntime({"train": _rows(feats, [""] * len(feats))}, checkpoint_dir=str(ckpt)))
    assert history[-1]["teacher_drift"] >= 0.5 * history[-1]["student_drift"] > 0

    # score on new utterances: student reconstruction vs the best constant per utterance
    model = task.build_model()
    model.load_state_dict(load_checkpoint(ckpt / f"epoch_{config['epochs'] - 1}")[0]["model"])
    model.eval()
    test = _smooth_utterances(16, 100, seed=1)
    x = torch.from_numpy(np.stack(test))
    pm = torch.zeros(x.shape[:2], dtype=torch.bool)
    from serray.models.masking import span_mask

    mask = span_mask(pm, 0.5, 8, torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = torch.where(mask[..., None], model.mask_emb, model.student.embed(x))
        recon = model.recon_head(model.student.encode(h, pm))
        target = model.student.input_norm(x)
    err_model = ((recon - target) ** 2)[mask].mean()
    const = torch.stack([target[b][mask[b]].mean(0) for b in range(len(x))])  # oracle constant per utterance
    err_const = torch.cat([((target[b][mask[b]] - const[b]) ** 2) for b in range(len(x))]).mean()
    assert err_model < 0.5 * err_const, (float(err_model), float(err_const))
    assert isinstance(model, Adapter)



# ---------------------------------------------------------------- the same paths on a GPU (skipped without CUDA)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_finetune_validation_and_resume_on_gpu(tmp_path) -> None:
    """On a GPU the collated batches live on the device: validation must move labels back before
    numpy (it crashed at the first validation), and a resumed run must load the optimiser state after
    the model is on the device (it crashed at the first step after every resume)."""
    from serray.train.finetune import FinetuneTask

    config = _finetune_config(epochs=1)
    rows = _labelled()
    config["steps_per_epoch"] = -(-len(rows) // config["batch_size"])
    run_loop(FinetuneTask(config), config, LocalRuntime({"train": rows, "val": _labelled(16, 1)},
                                                        checkpoint_dir=str(tmp_path), device="cuda"))
    config = dict(config, epochs=2)
    rt = LocalRuntime({"train": rows, "val": _labelled(16, 1)}, checkpoint_dir=str(tmp_path), device="cuda")
    history = run_loop(FinetuneTask(config), config, rt)
    assert [r["epoch"] for r in rt.reports] == [1] and rt.reports[0]["resumed_epoch"] == 1
    assert 0.0 <= history[-1]["val_ua"] <= 1.0
