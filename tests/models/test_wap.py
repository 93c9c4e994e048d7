import pytest
import torch

from serray.models import WAPTransformer


def _model(num_input_layers: int = 1) -> WAPTransformer:
    torch.manual_seed(0)
    return WAPTransformer(
        12, d_model=16, num_layers=2, num_heads=2, ff_dim=32, num_input_layers=num_input_layers
    ).eval()


@pytest.mark.parametrize("num_input_layers", [1, 3])
@pytest.mark.parametrize("grad", [True, False])  # no_grad + eval hits the MHA fast path
def test_padding_invariance(num_input_layers: int, grad: bool) -> None:
    model = _model(num_input_layers)
    torch.manual_seed(1)
    lens = [9, 5, 2]
    t_max = 11
    shape = (len(lens), num_input_layers, t_max, 12) if num_input_layers > 1 else (len(lens), t_max, 12)
    x = torch.randn(shape) * 3
    pm = torch.arange(t_max)[None] >= torch.tensor(lens)[:, None]
    with torch.set_grad_enabled(grad):
        out = model(x, pm)
        for b, n in enumerate(lens):
            alone = model(x[b : b + 1, ..., :n, :], torch.zeros(1, n, dtype=torch.bool))
            torch.testing.assert_close(out[b, :n], alone[0], atol=1e-5, rtol=0)
    assert out.shape == (3, t_max, 16)
    assert (out[pm] == 0).all()


def test_garbage_in_padding_is_ignored() -> None:
    model = _model()
    torch.manual_seed(2)
    x = torch.randn(2, 7, 12)
    pm = torch.zeros(2, 7, dtype=torch.bool)
    pm[1, 4:] = True
    ref = model(x, pm)
    x2 = x.clone()
    x2[1, 4:] = float("nan")
    out = model(x2, pm)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_weights_sum_to_one_and_get_grads() -> None:
    model = _model(num_input_layers=3).train()
    torch.testing.assert_close(model.layer_weights().sum(), torch.tensor(1.0))
    torch.testing.assert_close(model.input_layer_weights().sum(), torch.tensor(1.0))
    torch.manual_seed(3)
    x = torch.randn(2, 3, 6, 12) * torch.tensor([0.5, 1.0, 2.0])[None, :, None, None]
    out = model(x, None)
    (out * torch.randn_like(out)).sum().backward()
    assert model.layer_logits.grad is not None and model.layer_logits.grad.abs().sum() > 0
    assert model.input_layer_logits.grad is not None
    assert model.input_layer_logits.grad.abs().sum() > 0


def test_single_input_layer_logits_frozen_and_shape_check() -> None:
    model = _model()
    assert model.input_layer_logits.shape == (1,)
    assert not model.input_layer_logits.requires_grad
    assert model.embed(torch.randn(2, 5, 12)).shape == (2, 5, 16)
    with pytest.raises(ValueError):
        _model(num_input_layers=3).embed(torch.randn(2, 2, 5, 12))


def test_bf16_autocast_runs() -> None:
    model = _model()
    x = torch.randn(2, 6, 12)
    pm = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, pm)
    assert torch.isfinite(out.float()).all()
    assert (out[1, 4:] == 0).all()


def test_cpu_inference_skips_the_fused_fast_path_and_restores_the_switch(monkeypatch):
    """On CPU the layers run on PyTorch's regular path (the fused inference kernel is slower there,
    bench/wap_cpu.py), with the same outputs; the process-wide switch is back on afterwards."""
    torch.manual_seed(0)
    model = WAPTransformer(input_dim=12, d_model=16, num_layers=2, num_heads=2, ff_dim=32, dropout=0.0).eval()
    x = torch.randn(3, 40, 12)
    mask = torch.arange(40)[None] >= torch.tensor([40, 25, 10])[:, None]
    with torch.no_grad():
        fast = model.combine([h for h in _fast_path_layers(model, model.embed(x), mask)], mask)

        def refuse(*args, **kwargs):
            raise AssertionError("the fused fast path ran on CPU")

        monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", refuse)
        ours = model(x, mask)
    assert torch.backends.mha.get_fastpath_enabled()
    torch.testing.assert_close(ours[~mask], fast[~mask], atol=1e-5, rtol=1e-5)
    assert ours[mask].abs().max() == 0


def _fast_path_layers(model, h, mask):
    from serray.models.wap import _zero_padded

    h = _zero_padded(h, mask)
    if model.pos_conv is not None:
        h = model.pos_conv(h, mask)
    out = []
    for layer in model.layers:
        h = layer(h, src_key_padding_mask=mask)
        out.append(h)
    return out
