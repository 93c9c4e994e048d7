"""WAP-Transformer inference on CPU: serray's path vs PyTorch's fused "fast path".

``nn.TransformerEncoderLayer`` in eval mode without grad takes PyTorch's inference fast path (one
fused kernel per layer; with a padding mask the batch becomes a nested tensor). On this 2-core CPU that
path measured slower than the regular one, so :func:`serray.models.wap.regular_path_on_cpu` turns it off
around the layers on CPU. This bench evaluates the same model on the same padded batches of whole
utterances (lengths 2-8 s at 100 frames/s, sorted into batches as validation does) both ways, A/B
interleaved, and checks that the outputs agree.

Sizes: the demo adapter (``configs/base.yaml``), the benchmark one (``configs/benchmark.yaml``) and a
paper-sized one (d_model 1024, ``--quick`` skips it).

The last line is ``RESULT wap_cpu ratio=<fast-path time / serray time, demo size> target=1.5``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TARGET = 1.5
SIZES = {  # name: (d_model, ff_dim, num_layers, num_heads)
    "demo": (96, 192, 3, 4),
    "benchmark": (64, 128, 3, 4),
    "paper": (1024, 4096, 3, 16),
}


def _batches(n_utts: int, batch_size: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = sorted(torch.randint(200, 800, (n_utts,), generator=g).tolist())
    for i in range(0, n_utts, batch_size):
        lens = torch.tensor(lengths[i:i + batch_size])
        t = int(lens.max())
        yield torch.randn(len(lens), t, 80, generator=g), torch.arange(t)[None] >= lens[:, None]


def _fast_path_layers(model, h, mask):
    """``model.layer_outputs(h, mask)`` as PyTorch runs the layers by default (the fast path on)."""
    import torch

    from serray.models.wap import _zero_padded

    h = model.pos_conv(_zero_padded(h, mask), mask)
    torch.backends.mha.set_fastpath_enabled(True)
    out = []
    for layer in model.layers:
        h = layer(h, src_key_padding_mask=mask)
        out.append(h)
    return out


def measure(name: str, repeats: int, n_utts: int) -> float:
    import torch

    from serray.models.wap import WAPTransformer

    d, ff, layers, heads = SIZES[name]
    torch.manual_seed(0)
    model = WAPTransformer(80, d_model=d, num_layers=layers, num_heads=heads, ff_dim=ff, pos_conv_kernel=65).eval()
    batches = list(_batches(n_utts, 16))
    times = {"fast": [], "serray": []}
    with torch.no_grad():
        for rep in range(repeats + 1):  # the first round warms up both
            for side in ("fast", "serray") if rep % 2 == 0 else ("serray", "fast"):
                t0 = time.perf_counter()
                for x, mask in batches:
                    h = model.embed(x)
                    (_fast_path_layers if side == "fast" else WAPTransformer.layer_outputs)(model, h, mask)
                if rep:
                    times[side].append(time.perf_counter() - t0)
        # the same numbers at every valid frame
        x, mask = batches[-1]
        a = model.combine(_fast_path_layers(model, model.embed(x), mask), mask)
        b = model.encode(model.embed(x), mask)
        diff = float((a - b)[~mask].abs().max())
    fast, ours = statistics.median(times["fast"]), statistics.median(times["serray"])
    frames = sum(int((~m).sum()) for _, m in batches)
    print(f"{name:9s} d_model {d:4d}: fast path {fast:.3f} s, serray {ours:.3f} s for {frames} frames "
          f"({frames / ours:,.0f} frames/s) -> {fast / ours:.2f}x; max |diff| {diff:.1e}")
    assert diff < 1e-3, f"the two paths disagree by {diff}"
    return fast / ours


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes only, fewer repeats")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    repeats, n = (2, 32) if args.quick else (args.repeats, 96)
    ratios = {name: measure(name, repeats, n if name != "paper" else 32)
              for name in SIZES if not (args.quick and name == "paper")}
    print(f"RESULT wap_cpu ratio={ratios['demo']:.3f} target={TARGET}")


if __name__ == "__main__":
    main()
