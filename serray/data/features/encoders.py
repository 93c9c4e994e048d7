"""Frozen upstream encoders: waveform(s) -> frame features.

Four kinds behind one interface (:class:`Encoder`):

* ``fbank``: torchaudio's Kaldi log-mel filterbank (100 frames/s);
* ``fbank_pitch``: the same filterbank plus two prosody channels per frame, log-F0 (interpolated
  over unvoiced frames) and the voicing probability, from openSMILE's pitch tracker: Kaldi's
  "fbank + pitch" front end, for which a 25 ms log-mel alone carries pitch only as a shallow
  harmonic ripple (nearly none for low voices);
* ``egemaps`` / ``compare``: openSMILE's low-level descriptors made for emotion (100 frames/s), their
  unvoiced-frame sentinels replaced and a voicing channel added
  (:func:`serray.data.features.opensmile.clean_llds`);
* a Hugging Face HuBERT / wav2vec2 / WavLM checkpoint, by hub name or local directory
  (50 frames/s), keeping a configurable list of hidden layers.

Both are padding-invariant: a batch gives every utterance the same features it gets alone.
fbank is computed per utterance; HF models with layer-norm feature extractors (the *large*
checkpoints) take a padded batch with an attention mask, while group-norm ones (the *base*
checkpoints), whose normalisation would see the padding, are run one utterance at a time.
"""

from __future__ import annotations

import logging
from typing import List, Optional, Sequence

import numpy as np
import torch

from serray.errors import ConfigError

log = logging.getLogger(__name__)


class Encoder:
    """Interface: ``encode(wavs) -> [array [T, D] or [L, T, D]]`` plus identity facts."""

    name: str
    dim: int
    num_layers: int  # how many layers each output keeps (1 -> arrays are [T, D])
    layers: List[int]
    frame_rate: float  # frames per second
    sample_rate: int

    def encode(self, wavs: Sequence[np.ndarray]) -> List[np.ndarray]:  # pragma: no cover - interface
        raise NotImplementedError

    def num_frames(self, num_samples: int) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def identity(self) -> dict:
        """What later stages check features and checkpoints against."""
        return {"encoder": self.name, "layers": list(self.layers), "dim": self.dim,
                "num_layers": self.num_layers, "frame_rate": self.frame_rate, "sample_rate": self.sample_rate}


class FbankEncoder(Encoder):
    """Kaldi-compatible log-mel filterbank (25 ms window, 10 ms shift, no dither)."""

    def __init__(self, num_mel_bins: int = 80, sample_rate: int = 16000):
        self.name, self.dim, self.num_layers, self.layers = "fbank", num_mel_bins, 1, []
        self.num_mel_bins, self.sample_rate = num_mel_bins, sample_rate
        self.frame_length = int(round(0.025 * sample_rate))
        self.frame_shift = int(round(0.010 * sample_rate))
        self.frame_rate = sample_rate / self.frame_shift

    def num_frames(self, num_samples: int) -> int:
        return 0 if num_samples < self.frame_length else 1 + (num_samples - self.frame_length) // self.frame_shift

    def encode(self, wavs: Sequence[np.ndarray]) -> List[np.ndarray]:
        import torchaudio.compliance.kaldi as kaldi

        out = []
        for w in wavs:
            x = torch.from_numpy(np.asarray(w, dtype=np.float32)).unsqueeze(0) * 32768.0
            f = kaldi.fbank(x, num_mel_bins=self.num_mel_bins, sample_frequency=self.sample_rate, dither=0.0,
                            energy_floor=0.0)
            out.append(f.numpy())
        return out


class FbankPitchEncoder(FbankEncoder):
    """Kaldi fbank + [log-F0 in semitones, voicing probability] per frame
    (:func:`serray.data.features.opensmile.pitch_track`, on the fbank's own 25 ms / 10 ms grid)."""

    def __init__(self, num_mel_bins: int = 80, sample_rate: int = 16000):
        from serray.data.features.opensmile import pitch_smile

        super().__init__(num_mel_bins, sample_rate)
        self.name, self.dim = "fbank_pitch", num_mel_bins + PITCH_CHANNELS
        self.smile = pitch_smile()

    def encode(self, wavs: Sequence[np.ndarray]) -> List[np.ndarray]:
        from serray.data.features.opensmile import pitch_track

        out = []
        for w, fb in zip(wavs, super().encode(wavs)):
            pitch = pitch_track(w, self.sample_rate, len(fb), self.smile)
            out.append(np.concatenate([fb, pitch], axis=1).astype(np.float32))
        return out


#: The channels ``fbank_pitch`` adds to the filterbank.
PITCH_CHANNELS = 2


class OpenSmileEncoder(Encoder):
    """openSMILE low-level descriptors (``egemaps``: 25, ``compare``: 65 per frame, 100 frames/s),
    features made for emotion (:mod:`serray.data.features.opensmile`), sentinels replaced and a voicing
    channel added (26 / 66 per frame); each signal processed alone."""

    def __init__(self, name: str, sample_rate: int = 16000):
        from serray.data.features.opensmile import FRAME_RATE, LLD_DIMS, smile_for

        self.smile = smile_for(name, "LowLevelDescriptors")
        self.name, self.num_layers, self.layers = name, 1, []
        self.dim, self.frame_rate, self.sample_rate = LLD_DIMS[name], FRAME_RATE, sample_rate

    def num_frames(self, num_samples: int) -> int:
        from serray.data.features.opensmile import lld_frames

        return lld_frames(num_samples, self.sample_rate)

    def encode(self, wavs: Sequence[np.ndarray]) -> List[np.ndarray]:
        import warnings

        from serray.data.features.opensmile import clean_llds

        out = []
        for w in wavs:
            with warnings.catch_warnings():  # "Segment too short": featurization skips those first
                warnings.simplefilter("ignore", UserWarning)
                frame = self.smile.process_signal(np.asarray(w, dtype=np.float32), self.sample_rate)
            out.append(clean_llds(frame, self.name))
        return out


#: ``encoder.name`` values served by openSMILE alone, and those that need it (not exportable to ONNX).
OPENSMILE_ENCODERS = ("egemaps", "compare")
NEEDS_OPENSMILE = (*OPENSMILE_ENCODERS, "fbank_pitch")
#: Encoders computed by code in serray (no model files to load, bundle or download).
BUILTIN_ENCODERS = ("fbank", "fbank_pitch", *OPENSMILE_ENCODERS)


def encoder_section(features: dict, name: Optional[str] = None) -> dict:
    """The ``encoder`` config keys that rebuild the encoder of stored features / a checkpoint's
    ``features`` identity (``name`` overrides the identity's, e.g. a bundled model directory)."""
    enc = str(name or features["encoder"])
    dim = int(features["dim"])
    return {"name": enc, "layers": list(features.get("layers") or []), "sample_rate": int(features.get("sample_rate", 16000)),
            "num_mel_bins": dim - PITCH_CHANNELS if features["encoder"] == "fbank_pitch" else dim}


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("encoder.device=cuda but no CUDA device is visible")
    return torch.device(device)


class HFEncoder(Encoder):
    """A Hugging Face speech SSL model (HuBERT / wav2vec2 / WavLM), frozen, in eval mode."""

    def __init__(self, name: str, layers: Sequence[int] = (), sample_rate: int = 16000,
                 local_files_only: bool = False, device: str = "auto"):
        from transformers import AutoModel

        config = _hf_config(name, local_files_only)
        try:
            model = AutoModel.from_pretrained(name, local_files_only=local_files_only)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load the weights of encoder.name='{name}': {str(e).splitlines()[0]}") from None
        if not hasattr(model, "feature_extractor") or not hasattr(model, "_get_feat_extract_output_lengths"):
            raise ConfigError(f"encoder.name='{name}' is a {type(model).__name__}, not a HuBERT/wav2vec2/WavLM speech encoder")
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.name, self.layers, self.frame_rate = name, _hf_layers(config, name, layers), _hf_frame_rate(config, sample_rate)
        self.num_layers, self.dim, self.sample_rate = len(self.layers), config.hidden_size, sample_rate
        self.batchable = getattr(config, "feat_extract_norm", "group") == "layer"
        # large checkpoints expect zero-mean unit-variance input (their feature extractor's do_normalize)
        self.normalize = self.batchable

    def num_frames(self, num_samples: int) -> int:
        return int(self.model._get_feat_extract_output_lengths(torch.tensor(num_samples)).item())

    @torch.inference_mode()
    def _forward(self, wavs: Sequence[np.ndarray]) -> List[np.ndarray]:
        lengths = [len(w) for w in wavs]
        x = torch.zeros(len(wavs), max(lengths))
        mask = torch.zeros(len(wavs), max(lengths), dtype=torch.long)
        for i, w in enumerate(wavs):
            w = torch.from_numpy(np.asarray(w, dtype=np.float32))
            if self.normalize:
                w = (w - w.mean()) / torch.sqrt(w.var(unbiased=False) + 1e-7)
            x[i, : len(w)], mask[i, : len(w)] = w, 1
        kwargs = {"attention_mask": mask.to(self.device)} if self.batchable else {}
        out = self.model(x.to(self.device), output_hidden_states=True, **kwargs)
        hidden = torch.stack([out.hidden_states[l] for l in self.layers], dim=1).float().cpu()  # [B, L, T, D]
        feats = []
        for i, n in enumerate(lengths):
            t = self.num_frames(n)
            h = hidden[i, :, :t].numpy()
            feats.append(h[0] if self.num_layers == 1 else h)
        return feats

    def encode(self, wavs: Sequence[np.ndarray]) -> List[np.ndarray]:
        if self.batchable:
            return self._forward(wavs)
        return [self._forward([w])[0] for w in wavs]


def _hf_config(name: str, local_files_only: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, local_files_only=local_files_only)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"cannot load encoder.name='{name}' as a Hugging Face model: {str(e).splitlines()[0]} "
            "(give a local directory saved with save_pretrained, or a hub name on a machine that can download it)"
        ) from None


def _hf_layers(config, name: str, layers: Sequence[int]) -> List[int]:
    total = config.num_hidden_layers + 1  # hidden_states[0] is the transformer input
    chosen = list(layers) or [total - 1]
    bad = [l for l in chosen if not -total <= l < total]
    if bad:
        raise ConfigError(f"encoder.layers {bad} out of range for '{name}' ({total} hidden states: 0..{total - 1})")
    return [l % total for l in chosen]


def _hf_frame_rate(config, sample_rate: int) -> float:
    return sample_rate / int(np.prod(config.conv_stride))


def describe_encoder(cfg) -> dict:
    """The identity an ``encoder`` config section produces (name, layers, dim, frame rate), without loading weights."""
    if cfg.name in ("fbank", "fbank_pitch"):
        enc = FbankEncoder(num_mel_bins=cfg.num_mel_bins, sample_rate=cfg.sample_rate)
        extra = PITCH_CHANNELS if cfg.name == "fbank_pitch" else 0
        return {**enc.identity(), "encoder": cfg.name, "dim": enc.dim + extra}
    if cfg.name in OPENSMILE_ENCODERS:
        from serray.data.features.opensmile import identity

        return identity(cfg.name, cfg.sample_rate)
    config = _hf_config(cfg.name, cfg.local_files_only)
    layers = _hf_layers(config, cfg.name, list(cfg.layers))
    return {"encoder": cfg.name, "layers": layers, "dim": config.hidden_size, "num_layers": len(layers),
            "frame_rate": _hf_frame_rate(config, cfg.sample_rate), "sample_rate": cfg.sample_rate}


def build_encoder(cfg) -> Encoder:
    """Build the encoder an ``encoder`` config section names."""
    if cfg.name in ("fbank", "fbank_pitch"):
        if cfg.layers:
            raise ConfigError(f"encoder.layers applies to Hugging Face encoders only; {cfg.name} has one layer")
        cls = FbankEncoder if cfg.name == "fbank" else FbankPitchEncoder
        return cls(num_mel_bins=cfg.num_mel_bins, sample_rate=cfg.sample_rate)
    if cfg.name in OPENSMILE_ENCODERS:
        if cfg.layers:
            raise ConfigError(f"encoder.layers applies to Hugging Face encoders only; {cfg.name} has one layer")
        return OpenSmileEncoder(cfg.name, sample_rate=cfg.sample_rate)
    return HFEncoder(cfg.name, layers=list(cfg.layers), sample_rate=cfg.sample_rate,
                     local_files_only=cfg.local_files_only, device=cfg.device)


def check_identity(found: dict, expected: dict, what_found: str, what_expected: str) -> None:
    """Raise a :class:`DataError` naming both sides when two encoder identities differ."""
    from serray.errors import DataError

    keys = ("encoder", "layers", "dim")
    diff = {k: (found.get(k), expected.get(k)) for k in keys if found.get(k) != expected.get(k)}
    if diff:
        parts = "; ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diff.items())
        raise DataError(f"{what_found} and {what_expected} disagree ({what_found} vs {what_expected}) on {parts}")


__all__ = ["Encoder", "FbankEncoder", "FbankPitchEncoder", "HFEncoder", "OpenSmileEncoder", "build_encoder", "check_identity", "describe_encoder", "resolve_device"]
