import math

import pytest
import torch

from serray.models import Adapter, AdapterOutput

D, B, T, K = 16, 8, 40, 8


def _adapter(**kw) -> Adapter:
    torch.manual_seed(0)
    cfg = dict(d_model=32, num_layers=2, num_heads=4, ff_dim=64, dropout=0.0,
               num_clusters=K, kmeans_decay=0.9, mask_span=4)
    cfg.update(kw)
    return Adapter(D, **cfg)


def _batch(g: torch.Generator, protos: torch.Tensor, layers: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of 8-frame segments drawn from a few prototype frames plus noise."""
    seg = torch.randint(0, len(protos), (B, T // 8), generator=g)
    x = protos[seg].repeat_interleave(8, dim=1) + 0.3 * torch.randn(B, T, D, generator=g)
    if layers > 1:
        x = torch.stack([x * (i + 1) for i in range(layers)], 1)
    lens = torch.randint(T // 2, T + 1, (B,), generator=g)
    lens[0] = T
    return x, torch.arange(T)[None] >= lens[:, None]


def _protos() -> torch.Tensor:
    return torch.randn(6, D, generator=torch.Generator().manual_seed(123)) * 2


def test_teacher_init_frozen_and_no_grad() -> None:
    model = _adapter().train()
    assert not model.teacher.training
    for (n, pt), ps in zip(model.teacher.named_parameters(), model.student.parameters()):
        assert not pt.requires_grad
        assert torch.equal(pt, ps), n
    x, pm = _batch(torch.Generator().manual_seed(0), _protos())
    out = model(x, pm)
    assert isinstance(out, AdapterOutput)
    out.loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert model.student.layer_logits.grad is not None
    assert model.student.layer_logits.grad.abs().sum() > 0
    assert model.mask_emb.grad.abs().sum() > 0
    torch.testing.assert_close(model.student.layer_weights().sum(), torch.tensor(1.0))
    ids = {id(p) for p in model.trainable_parameters()}
    assert not any(id(p) in ids for p in model.teacher.parameters())


def test_update_teacher_formula() -> None:
    model = _adapter()
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    t0 = [p.clone() for p in model.teacher.parameters()]
    s0 = [p.clone() for p in model.student.parameters()]
    model.update_teacher(0.9)
    for pt, a, b in zip(model.teacher.parameters(), t0, s0):
        assert torch.equal(pt, 0.9 * a + (1 - 0.9) * b)
    model.update_teacher(0.0)
    for pt, ps in zip(model.teacher.parameters(), model.student.parameters()):
        assert torch.equal(pt, ps)


def test_update_teacher_layers_only_shares_the_input_projection_and_positions() -> None:
    """data2vec's ema_layers_only: the Transformer layers (and their output norms and weights) follow the
    EMA; the input projection, the positional convolution and the input-layer weights become the
    student's at every update."""
    model = _adapter(pos_conv_kernel=5, pos_conv_groups=4, num_input_layers=2)
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    t0 = {n: p.clone() for n, p in model.teacher.named_parameters()}
    s0 = dict(model.student.named_parameters())
    model.update_teacher(0.9, layers_only=True)
    shared, averaged = [], []
    for n, pt in model.teacher.named_parameters():
        if n.startswith(("layers.", "out_norms.", "layer_logits")):
            assert torch.equal(pt, 0.9 * t0[n] + (1 - 0.9) * s0[n].detach()), n
            averaged.append(n)
        else:
            assert torch.equal(pt, s0[n]), n
            shared.append(n)
    assert {n.split(".")[0] for n in shared} == {"input_layer_logits", "input_proj", "pos_conv"}
    assert any(n.startswith("layers.") for n in averaged) and "layer_logits" in averaged


@pytest.mark.parametrize("off", ["mask", "distill", "cluster"])
def test_objective_can_be_disabled(off: str) -> None:
    model = _adapter(**{f"w_{off}": 0.0}).train()
    assert getattr(model, {"mask": "recon_head", "distill": "distill_head", "cluster": "cluster_head"}[off]) is None
    x, pm = _batch(torch.Generator().manual_seed(0), _protos())
    out = model(x, pm)
    assert off not in out.losses
    assert set(out.losses) == {"mask", "distill", "cluster"} - {off}
    assert all(not v.requires_grad and v.dtype == torch.float32 for v in out.losses.values())
    expected = sum(out.losses.values())
    torch.testing.assert_close(out.loss.detach(), expected)
    assert ("cluster_entropy" in out.stats) == (off != "cluster")
    if off == "cluster":
        assert not bool(model.kmeans.initialized)
    out.loss.backward()


def test_stacked_input_layers_and_top_k_and_eval() -> None:
    model = _adapter(num_input_layers=3, distill_top_k=2).train()
    x, pm = _batch(torch.Generator().manual_seed(0), _protos(), layers=3)
    out = model(x, pm, generator=torch.Generator().manual_seed(5))
    out.loss.backward()
    assert model.student.input_layer_logits.grad.abs().sum() > 0
    assert abs(out.stats["mask_ratio"] - 0.5) < 0.02
    model.eval()
    with torch.no_grad():
        ev = model(x, pm)
        feats = model.encode(x, pm)
        feats_s = model.encode(x, pm, branch="student")
    assert set(ev.losses) == {"mask", "distill", "cluster"}
    assert int(model.kmeans.steps) == 1  # no k-means update in eval mode
    assert feats.shape == feats_s.shape == (B, T, 32)
    assert (feats[pm] == 0).all()
    with pytest.raises(ValueError):
        model.encode(x, pm, branch="other")
    with pytest.raises(ValueError):
        _adapter(distill_top_k=3)


def _masked_outputs(model: Adapter) -> torch.Tensor:
    """Student outputs at the masked frames of one utterance (a 200 ms span: frames 10-29 at 100 Hz)."""
    model.eval()
    x = torch.randn(1, T, D, generator=torch.Generator().manual_seed(0))
    pm = torch.zeros(1, T, dtype=torch.bool)
    mask = torch.zeros(1, T, dtype=torch.bool)
    mask[0, 10:30] = True
    with torch.no_grad():
        h = torch.where(mask[..., None], model.mask_emb, model.student.embed(x))
        return model.student.encode(h, pm)[0, mask[0]]


def test_masked_frames_of_one_utterance_get_different_outputs() -> None:
    """Self-attention is permutation-equivariant: without positions every masked frame (the same mask
    embedding) gets the same output; the convolutional positional embedding tells them apart."""
    without = _masked_outputs(_adapter(pos_conv_kernel=0))
    assert (without - without[0]).abs().max() == 0.0  # the defect this guards against
    # the width in use (640 ms) is wider than a mask span (200 ms), so every masked frame sees
    # unmasked neighbours at its own offsets; here 41 frames at 100 Hz for a 20-frame span
    with_pos = _masked_outputs(_adapter(pos_conv_kernel=41, pos_conv_groups=4))
    diffs = (with_pos[:, None] - with_pos[None]).abs().amax(-1)
    off_diag = diffs[~torch.eye(len(with_pos), dtype=torch.bool)]
    assert off_diag.min() > 1e-3, off_diag.min()  # every pair of masked frames differs


def test_teacher_targets_are_instance_normalised_over_valid_frames() -> None:
    model = _adapter(distill_top_k=2, pos_conv_kernel=5, pos_conv_groups=4).eval()
    x, pm = _batch(torch.Generator().manual_seed(0), _protos())
    t, target = model.teacher_targets(x, pm)
    layers = model.teacher.layer_outputs(model.teacher.embed(x), pm)
    for b in range(B):
        valid = ~pm[b]
        expected = torch.stack([(h[b, valid] - h[b, valid].mean(0)) / torch.sqrt(h[b, valid].var(0, unbiased=False) + 1e-5)
                                for h in layers[-2:]]).mean(0)
        torch.testing.assert_close(target[b, valid], expected, rtol=1e-4, atol=1e-4)
        assert (target[b, ~valid] == 0).all()


def test_losses_start_on_comparable_scales() -> None:
    """Cluster cross-entropy is divided by ln K: with random weights all three terms are near 1."""
    model = _adapter(num_clusters=64).train()
    x, pm = _batch(torch.Generator().manual_seed(0), _protos())
    frames = x[~pm]
    model.set_feature_stats(frames.mean(0, keepdim=True), frames.std(0, keepdim=True))  # CMVN, as in training
    out = model(x, pm, generator=torch.Generator().manual_seed(1))
    vals = {k: float(v) for k, v in out.losses.items()}
    assert all(0.5 < v < 2.0 for v in vals.values()), vals


def test_no_weight_decay_on_norms_biases_embeddings_and_logits() -> None:
    model = _adapter(num_input_layers=2, pos_conv_kernel=5, pos_conv_groups=4)
    groups = model.param_groups(0.01)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        plain = p.ndim < 2 or n.endswith(".bias")
        assert (id(p) in decayed) != plain, n
    plain_names = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"mask_emb", "student.layer_logits", "student.input_layer_logits"} <= plain_names
    assert any(n.endswith("norm1.weight") for n in plain_names)
    assert sum(len(g["params"]) for g in groups) == len(model.trainable_parameters())


def test_config_dict_rebuilds() -> None:
    model = _adapter(w_distill=0.0, mask_ratio=0.3)
    clone = Adapter(**model.config_dict())
    clone.load_state_dict(model.state_dict())
    assert clone.config_dict() == model.config_dict()
    assert clone.config_dict()["mask_ratio"] == 0.3


def test_bf16_autocast_forward_backward() -> None:
    model = _adapter().train()
    x, pm = _batch(torch.Generator().manual_seed(0), _protos())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, pm)
    assert out.loss.dtype == torch.float32
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.kmeans.centroids.dtype == torch.float32


def test_short_training_lowers_every_loss() -> None:
    model = _adapter().train()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)
    protos = _protos()
    hist = []
    for _ in range(200):
        x, pm = _batch(g, protos)
        out = model(x, pm)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        model.update_teacher(0.99)
        hist.append({**{k: float(v) for k, v in out.losses.items()}, **out.stats})

    def mean(key: str, sl: slice) -> float:
        return sum(h[key] for h in hist[sl]) / len(hist[sl])

    for key in ("mask", "distill", "cluster"):
        assert mean(key, slice(-10, None)) < 0.95 * mean(key, slice(0, 10)), key
    assert min(h["cluster_entropy"] for h in hist[-10:]) > 0.5 * math.log(K)
    assert mean("cos_ts", slice(-10, None)) > mean("cos_ts", slice(0, 10))
    assert all(abs(h["mask_ratio"] - 0.5) < 0.02 for h in hist)


def test_zero_mask_ratio_gives_zero_losses() -> None:
    model = _adapter(mask_ratio=0.0).train()
    x, pm = _batch(torch.Generator().manual_seed(0), _protos())
    out = model(x, pm)
    assert out.stats["mask_ratio"] == 0.0
    assert all(float(v) == 0.0 for v in out.losses.values())
    out.loss.backward()  # still connected to the graph
