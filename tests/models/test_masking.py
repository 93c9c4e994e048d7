import pytest
import torch

from serray.models import span_mask


def _padding(lens: list[int], t_max: int) -> torch.Tensor:
    return torch.arange(t_max)[None] >= torch.tensor(lens)[:, None]


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.65, 0.8])
@pytest.mark.parametrize("span", [1, 3, 10])
def test_ratio_exact_and_padding_untouched(ratio: float, span: int) -> None:
    torch.manual_seed(0)
    lens = [200, 137, 50, 13, 1]
    pm = _padding(lens, 200)
    mask = span_mask(pm, ratio, span)
    assert mask.dtype == torch.bool and mask.shape == pm.shape
    assert not (mask & pm).any()
    for b, n in enumerate(lens):
        got = int(mask[b].sum())
        assert got == min(n, max(1, round(ratio * n)))
        assert abs(got / n - ratio) <= max(0.02, 1.0 / n)


def test_spans_are_contiguous_runs() -> None:
    torch.manual_seed(0)
    pm = _padding([300], 300)
    mask = span_mask(pm, 0.2, 5)[0].int()
    starts = ((mask[1:] == 1) & (mask[:-1] == 0)).sum() + mask[0]
    # 60 frames as 12 spans; touching spans merge into longer runs
    assert 1 <= int(starts) <= 12
    runs = torch.diff(torch.nonzero(torch.diff(torch.cat([torch.tensor([0]), mask, torch.tensor([0])]))).squeeze(1))
    assert (runs[::2] >= 5).all()


def test_zero_ratio_and_full_ratio() -> None:
    pm = _padding([10, 4], 10)
    assert not span_mask(pm, 0.0, 3).any()
    full = span_mask(pm, 1.0, 3)
    assert torch.equal(full, ~pm)


def test_generator_determinism() -> None:
    pm = _padding([80, 60, 33], 80)
    a = span_mask(pm, 0.5, 4, torch.Generator().manual_seed(7))
    b = span_mask(pm, 0.5, 4, torch.Generator().manual_seed(7))
    c = span_mask(pm, 0.5, 4, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_non_contiguous_padding() -> None:
    torch.manual_seed(0)
    pm = torch.zeros(1, 40, dtype=torch.bool)
    pm[0, ::3] = True
    mask = span_mask(pm, 0.5, 4)
    assert not (mask & pm).any()
    assert int(mask.sum()) == round(0.5 * int((~pm).sum()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device() -> None:
    pm = _padding([30, 20], 30).cuda()
    assert span_mask(pm, 0.5, 5).device == pm.device
    g = torch.Generator(device="cuda").manual_seed(0)
    assert span_mask(pm, 0.5, 5, g).device == pm.device
