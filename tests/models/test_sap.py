import torch

from serray.models import SAP, SAPClassifier


def _inputs(lens: list[int], t_max: int, dim: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(len(lens), t_max, dim)
    pm = torch.arange(t_max)[None] >= torch.tensor(lens)[:, None]
    return x, pm


def test_attention_zero_at_padding_and_normalised() -> None:
    torch.manual_seed(0)
    sap = SAP(10, attention_dim=8)
    x, pm = _inputs([7, 3, 1], 7)
    w = sap.attention(x, pm)
    assert w.shape == (3, 7)
    assert (w[pm] == 0).all()
    assert (w[~pm] > 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(3))


def test_output_dim_and_padding_invariance() -> None:
    torch.manual_seed(0)
    sap = SAP(10, attention_dim=8)
    assert sap.input_size == 10 and sap.output_size == 20
    x, pm = _inputs([6, 4], 6)
    ref = sap(x, pm)
    assert ref.shape == (2, 20)
    for extra in (1, 17):
        garbage = 1e3 * torch.randn(2, extra, 10)
        x2 = torch.cat([x, garbage], 1)
        x2[1, 4:6] = 1e4  # garbage also inside the original padding
        pm2 = torch.cat([pm, torch.ones(2, extra, dtype=torch.bool)], 1)
        torch.testing.assert_close(sap(x2, pm2), ref, atol=1e-5, rtol=0)
    alone = sap(x[1:, :4], None)
    torch.testing.assert_close(alone[0], ref[1], atol=1e-5, rtol=0)


def test_std_and_mean_of_constant_frames() -> None:
    sap = SAP(4)
    x = torch.ones(1, 5, 4) * 2.0
    out = sap(x, torch.zeros(1, 5, dtype=torch.bool))
    torch.testing.assert_close(out[0, :4], torch.full((4,), 2.0))
    torch.testing.assert_close(out[0, 4:], torch.full((4,), 1e-3), atol=1e-4, rtol=0)


def test_nan_in_padding_and_grad() -> None:
    torch.manual_seed(0)
    sap = SAP(10, attention_dim=8)
    x, pm = _inputs([5, 2], 5)
    x[1, 2:] = float("nan")
    x.requires_grad_(True)
    out = sap(x, pm)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_classifier_shape_and_autocast() -> None:
    torch.manual_seed(0)
    clf = SAPClassifier(10, 4, attention_dim=8, hidden_dim=16)
    x, pm = _inputs([6, 2, 4], 6)
    assert clf(x, pm).shape == (3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert clf(x, pm).shape == (3, 4)
