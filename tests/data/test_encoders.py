"""Tests for serray.data.features.encoders: fbank and Hugging Face (tiny random HuBERT, loaded by path)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from serray.data.audio import load_audio
from serray.data.features.encoders import (FbankEncoder, HFEncoder, build_encoder, check_identity, describe_encoder,
                                  resolve_device)
from serray.errors import ConfigError, DataError

SR = 16000


def enc_cfg(name="fbank", layers=(), **kw):
    base = dict(name=str(name), layers=list(layers), sample_rate=SR, num_mel_bins=80, local_files_only=True,
                device="cpu")
    base.update(kw)
    return OmegaConf.create(base)


def speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    """Band-limited noise with a syllable-rate envelope (not silence, not a pure tone)."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * SR))
    x = np.convolve(rng.standard_normal(n), np.hanning(16), mode="same")
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 4.0 * np.arange(n) / SR + rng.uniform(0, 6))
    x = x * env
    return (0.2 * x / np.abs(x).max()).astype(np.float32)


@pytest.fixture(scope="module")
def corpus_wavs(synthetic_root):
    """Two real utterances of the synthetic corpus: the shortest and, as the long one, 4 concatenated."""
    paths = sorted(synthetic_root.glob("Session1/sentences/wav/*/Ses*.wav"))[:6]
    wavs = sorted((load_audio(p) for p in paths), key=len)
    return wavs[0], np.concatenate(wavs[1:5])


# ---------------------------------------------------------------- fbank


@pytest.mark.parametrize("n", [400, 401, 559, 560, 16000, 16123, 40000])
def test_fbank_frame_count(n):
    enc = build_encoder(enc_cfg())
    assert isinstance(enc, FbankEncoder)
    f = enc.encode([speechlike(n / SR)[:n]])[0]
    assert f.shape == (1 + (n - 400) // 160, 80)
    assert enc.num_frames(n) == f.shape[0]
    assert f.dtype == np.float32 and np.isfinite(f).all()


def test_fbank_frame_rate_and_short_input():
    enc = FbankEncoder()
    assert enc.frame_rate == 100.0 and enc.dim == 80 and enc.num_layers == 1
    for seconds in (0.5, 1.0, 2.37):
        n = int(seconds * SR)
        assert abs(enc.num_frames(n) - seconds * 100) <= 2
    assert enc.num_frames(399) == 0
    assert enc.num_frames(0) == 0


def test_fbank_batch_equals_single(corpus_wavs):
    short, long = corpus_wavs
    enc = FbankEncoder()
    alone = enc.encode([short])[0]
    batch = enc.encode([long, short])
    np.testing.assert_array_equal(batch[1], alone)
    assert batch[0].shape[0] == enc.num_frames(len(long))


def test_fbank_num_mel_bins():
    enc = build_encoder(enc_cfg(num_mel_bins=40))
    assert enc.encode([speechlike(0.5)])[0].shape[1] == 40 == enc.dim


def test_fbank_rejects_layers():
    with pytest.raises(ConfigError, match="fbank"):
        build_encoder(enc_cfg(layers=[1]))


def test_describe_fbank_matches_identity():
    cfg = enc_cfg(num_mel_bins=64)
    assert describe_encoder(cfg) == build_encoder(cfg).identity()


# ---------------------------------------------------------------- Hugging Face (tiny HuBERT)


@pytest.fixture(scope="module")
def hf_last(tiny_hubert):
    return build_encoder(enc_cfg(tiny_hubert, layers=[]))


@pytest.fixture(scope="module")
def hf_two(tiny_hubert):
    return build_encoder(enc_cfg(tiny_hubert, layers=[0, 2]))


def test_hf_last_layer_shape(hf_last, corpus_wavs):
    assert isinstance(hf_last, HFEncoder)
    assert hf_last.layers == [2] and hf_last.num_layers == 1 and hf_last.dim == 32
    assert hf_last.frame_rate == 50.0
    for w in corpus_wavs:
        f = hf_last.encode([w])[0]
        t = int(hf_last.model._get_feat_extract_output_lengths(torch.tensor(len(w))))
        assert f.shape == (t, 32)
        assert t == hf_last.num_frames(len(w))
        assert abs(t - len(w) / SR * 50) <= 2
        assert np.isfinite(f).all()


def test_hf_two_layers_shape(hf_two, corpus_wavs):
    assert hf_two.layers == [0, 2] and hf_two.num_layers == 2
    w = corpus_wavs[0]
    f = hf_two.encode([w])[0]
    t = int(hf_two.model._get_feat_extract_output_lengths(torch.tensor(len(w))))
    assert f.shape == (2, t, 32)
    # layer 2 (the last) of the 2-layer output is what layers=[] returns
    assert not np.allclose(f[0], f[1])


def test_hf_layers_match_model_hidden_states(tiny_hubert, hf_two):
    """Layer indices are hidden_states indices (0 = transformer input), checked against the model itself."""
    from transformers import HubertModel

    w = speechlike(1.0)
    model = HubertModel.from_pretrained(str(tiny_hubert)).eval()
    x = torch.from_numpy(w)[None]
    x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)  # layer-norm models normalise input
    with torch.inference_mode():
        hs = model(x, output_hidden_states=True).hidden_states
    f = hf_two.encode([w])[0]
    np.testing.assert_allclose(f[0], hs[0][0].numpy(), atol=1e-5)
    np.testing.assert_allclose(f[1], hs[2][0].numpy(), atol=1e-5)


def test_hf_negative_layer_index(tiny_hubert):
    enc = build_encoder(enc_cfg(tiny_hubert, layers=[-1]))
    assert enc.layers == [2]


@pytest.mark.parametrize("layers", [[3], [0, 5], [-4]])
def test_hf_layer_out_of_range(tiny_hubert, layers):
    with pytest.raises(ConfigError) as e:
        build_encoder(enc_cfg(tiny_hubert, layers=layers))
    assert "out of range" in str(e.value) and "0..2" in str(e.value)
    with pytest.raises(ConfigError):
        describe_encoder(enc_cfg(tiny_hubert, layers=layers))


def _fp16_close(a: np.ndarray, b: np.ndarray) -> None:
    """Agreement within what the float16 storage keeps anyway (atol 2e-3 relative to the scale)."""
    scale = max(1.0, float(np.abs(b).max()))
    np.testing.assert_allclose(a, b, atol=2e-3 * scale, rtol=0)


@pytest.mark.parametrize("which", ["layer", "group"])
def test_hf_padding_invariance(which, tiny_hubert, tiny_hubert_group, corpus_wavs):
    path = tiny_hubert if which == "layer" else tiny_hubert_group
    enc = build_encoder(enc_cfg(path, layers=[0, 2]))
    assert enc.batchable is (which == "layer")
    short, long = corpus_wavs
    assert len(long) > 3 * len(short)
    alone = enc.encode([short])[0]
    in_batch = enc.encode([long, short, speechlike(2.0)])
    assert in_batch[1].shape == alone.shape
    _fp16_close(in_batch[1], alone)
    _fp16_close(in_batch[0], enc.encode([long])[0])
    # and the float16 round trip that featurization stores stays within the same tolerance
    _fp16_close(alone.astype(np.float16).astype(np.float32), alone)


def test_hf_describe_matches_identity(tiny_hubert, hf_two, hf_last):
    assert describe_encoder(enc_cfg(tiny_hubert, layers=[0, 2])) == hf_two.identity()
    assert describe_encoder(enc_cfg(tiny_hubert, layers=[])) == hf_last.identity()
    ident = hf_two.identity()
    assert ident == {"encoder": str(tiny_hubert), "layers": [0, 2], "dim": 32, "num_layers": 2,
                     "frame_rate": 50.0, "sample_rate": SR}


def test_hf_missing_model_is_config_error(tmp_path):
    for name in ("serray-tests/definitely-not-a-model", str(tmp_path / "nope")):
        with pytest.raises(ConfigError) as e:
            build_encoder(enc_cfg(name))
        assert name in str(e.value)
        with pytest.raises(ConfigError):
            describe_encoder(enc_cfg(name))


def test_hf_empty_dir_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot load"):
        build_encoder(enc_cfg(tmp_path))


def test_hf_config_without_weights_is_config_error(tiny_hubert, tmp_path):
    (tmp_path / "config.json").write_text((tiny_hubert / "config.json").read_text())
    with pytest.raises(ConfigError, match="weights"):
        build_encoder(enc_cfg(tmp_path))


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="cuda"):
            resolve_device("cuda")


def test_check_identity():
    a = {"encoder": "fbank", "layers": [], "dim": 80}
    check_identity(a, dict(a), "x", "y")
    with pytest.raises(DataError) as e:
        check_identity(a, {"encoder": "/m/hubert", "layers": [0], "dim": 32}, "stored", "config")
    assert "fbank" in str(e.value) and "/m/hubert" in str(e.value)
