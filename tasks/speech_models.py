"""Spoken-word classifiers whose feature extraction lives inside the model.

Every model takes a raw waveform batch ``(N, L)`` in [-1, 1] and returns logits, so attacks
perturb the waveform itself (not a spectrogram a real adversary could not write). Registered
in the model registry with ``modality="audio"``:

* ``mel_cnn`` -- a small 2-D CNN on a torchaudio log-mel front-end (fast on a CPU);
* ``m5`` -- the M5 raw-waveform 1-D CNN (Dai et al., 2017);
* ``wav2vec2`` -- torchaudio's wav2vec 2.0 encoder with a mean-pooled linear head; it needs
  local weights (no download): a torchaudio/fairseq-style state dict file or a Hugging Face
  ``Wav2Vec2Model`` folder.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustkd.extras import require
from robustkd.registry import register_model


def _as_batch(x: Tensor) -> Tensor:
    """Accept ``(N, L)`` or ``(N, 1, L)`` waveforms; return ``(N, L)``."""
    if x.dim() == 3 and x.shape[1] == 1:
        return x[:, 0]
    if x.dim() != 2:
        raise ValueError(f"audio models take waveforms of shape (N, samples) or (N, 1, samples), got {tuple(x.shape)}")
    return x


class LogMel(nn.Module):
    """Waveform -> standardised log-mel spectrogram ``(N, 1, n_mels, frames)``; differentiable, so
    gradients reach the waveform. 25 ms windows, 10 ms hop, per-utterance standardisation (which
    makes the model indifferent to recording gain)."""

    def __init__(self, sample_rate: int, n_mels: int = 40, win_ms: float = 25.0, hop_ms: float = 10.0,
                 standardize: bool = True):
        super().__init__()
        torchaudio = require("torchaudio", "speech", "the mel_cnn model's log-mel front-end")

        win = int(round(sample_rate * win_ms / 1000))
        n_fft = 2 ** math.ceil(math.log2(win))
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=n_fft, win_length=win, hop_length=int(round(sample_rate * hop_ms / 1000)),
            n_mels=n_mels, f_min=20.0, f_max=sample_rate / 2, power=2.0)
        # torch's periodic window is a slice of a longer tensor: own it, so safetensors can save it
        self.mel.spectrogram.window = self.mel.spectrogram.window.clone()
        self.standardize = standardize

    def forward(self, x: Tensor) -> Tensor:
        z = torch.log(self.mel(_as_batch(x)) + 1e-6).unsqueeze(1)
        if self.standardize:
            mean = z.mean(dim=(2, 3), keepdim=True)
            std = z.std(dim=(2, 3), keepdim=True)
            z = (z - mean) / (std + 1e-5)
        return z


class MelCNN(nn.Module):
    """Three conv blocks (conv-BN-ReLU-pool) over a log-mel front-end, global average pooling."""

    def __init__(self, num_classes: int, sample_rate: int, n_mels: int = 40, width: int = 32):
        super().__init__()
        self.frontend = LogMel(sample_rate, n_mels)

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                    nn.MaxPool2d(2)]

        w = width
        self.features = nn.Sequential(*block(1, w), *block(w, 2 * w), *block(2 * w, 4 * w),
                                      nn.Conv2d(4 * w, 4 * w, 3, padding=1, bias=False), nn.BatchNorm2d(4 * w),
                                      nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(4 * w, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(self.frontend(x)))


class M5(nn.Module):
    """M5 (Dai et al., "Very deep CNNs for raw waveforms", 2017): a wide strided first conv
    (about 10 ms receptive field) then three small conv blocks, on the raw waveform."""

    def __init__(self, num_classes: int, sample_rate: int, width: int = 32):
        super().__init__()
        kernel = max(8, int(round(sample_rate * 0.005)))  # 80 taps at 16 kHz, 40 at 8 kHz
        stride = max(1, kernel // 20)
        w = width

        def block(cin: int, cout: int, k: int, s: int = 1) -> list[nn.Module]:
            return [nn.Conv1d(cin, cout, k, s, padding=k // 2, bias=False), nn.BatchNorm1d(cout),
                    nn.ReLU(inplace=True), nn.MaxPool1d(4)]

        self.features = nn.Sequential(*block(1, w, kernel, stride), *block(w, w, 3), *block(w, 2 * w, 3),
                                      *block(2 * w, 2 * w, 3), nn.AdaptiveAvgPool1d(1))
        self.fc = nn.Linear(2 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(_as_batch(x).unsqueeze(1)).flatten(1))


# -- wav2vec 2.0 -------------------------------------------------------------------------------
W2V2_ARCHS = ("base", "large", "large_lv60k", "xlsr_300m")


class Wav2Vec2Classifier(nn.Module):
    """A wav2vec 2.0 encoder, mean-pooled over time, then a linear head. The waveform is
    standardised per utterance inside (what the pretrained encoders expect)."""

    def __init__(self, encoder: nn.Module, num_classes: int, normalize_waveform: bool = True,
                 freeze_feature_extractor: bool = True):
        super().__init__()
        self.encoder = encoder
        self.normalize_waveform = normalize_waveform
        projection = encoder.get_submodule("encoder.feature_projection.projection")
        if not isinstance(projection, nn.Linear):
            raise TypeError(f"the encoder's feature projection is a {type(projection).__name__}, not the Linear layer of "
                            "a torchaudio wav2vec2 model")
        self.head = nn.Linear(projection.out_features, num_classes)
        if freeze_feature_extractor:  # the usual fine-tuning recipe; gradients still reach the input
            for p in encoder.get_submodule("feature_extractor").parameters():
                p.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        x = _as_batch(x)
        if self.normalize_waveform:
            x = (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-5)
        features, _ = self.encoder(x)
        return self.head(features.mean(1))


def _w2v2_architecture(arch: str | dict[str, Any]) -> nn.Module:
    tm = require("torchaudio.models", "speech", "the wav2vec2 model")

    if isinstance(arch, dict):  # explicit wav2vec2_model(...) arguments (custom or tiny test encoders)
        return tm.wav2vec2_model(**{**arch, "aux_num_out": None})
    factories = {"base": tm.wav2vec2_base, "large": tm.wav2vec2_large, "large_lv60k": tm.wav2vec2_large_lv60k,
                 "xlsr_300m": tm.wav2vec2_xlsr_300m}
    if arch not in factories:
        raise ValueError(f"unknown wav2vec2 architecture {arch!r}: use one of {', '.join(W2V2_ARCHS)} or a dict of "
                         "torchaudio.models.wav2vec2_model arguments")
    return factories[arch](aux_num_out=None)


def _load_state_dict(path: Path) -> dict[str, Tensor]:
    state: Any  # a state dict, a wrapper around one, or anything else (refused below)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)  # never unpickles code
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return {k: v for k, v in state.items() if not k.startswith("aux.")}  # drop a CTC head if present


def load_wav2vec2_encoder(weights: str | Path, arch: str | dict[str, Any] = "base") -> nn.Module:
    """A torchaudio ``Wav2Vec2Model`` from local weights: a Hugging Face ``Wav2Vec2Model`` folder
    (``config.json`` + weights, converted with torchaudio's importer) or a state dict file
    (``.pt``/``.pth``/``.bin``/``.safetensors``) for the torchaudio architecture ``arch``."""
    path = Path(weights).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"wav2vec2 weights {str(path)!r} do not exist: pass weights=PATH to a local state "
                                "dict or a Hugging Face Wav2Vec2 folder (robustkd never downloads them)")
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is a folder without config.json: not a Hugging Face Wav2Vec2 model")
        import_huggingface_model = require("torchaudio.models.wav2vec2.utils", "speech",
                                           "the wav2vec2 model").import_huggingface_model
        from transformers import Wav2Vec2Model as HFWav2Vec2Model

        return import_huggingface_model(HFWav2Vec2Model.from_pretrained(str(path), local_files_only=True))
    encoder = _w2v2_architecture(arch)
    try:
        missing, unexpected = encoder.load_state_dict(_load_state_dict(path), strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"the weights in {path} do not fit the wav2vec2 architecture {arch!r} "
                         f"({str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else exc}): "
                         "pick the matching arch=") from exc
    if missing or unexpected:
        raise ValueError(f"the weights in {path} do not fit the wav2vec2 architecture {arch!r}: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}. Pick the matching arch=.")
    return encoder


@register_model("mel_cnn", modality="audio")
def mel_cnn(num_classes: int = 10, sample_rate: int = 16000, **kwargs: Any) -> nn.Module:
    """Small CNN on a log-mel front-end inside the model (about 0.3 M parameters at width 32)."""
    return MelCNN(num_classes, sample_rate, **kwargs)


@register_model("m5", modality="audio")
def m5(num_classes: int = 10, sample_rate: int = 16000, **kwargs: Any) -> nn.Module:
    """M5 raw-waveform 1-D CNN (Dai et al. 2017)."""
    return M5(num_classes, sample_rate, **kwargs)


@register_model("wav2vec2", modality="audio")
def wav2vec2(num_classes: int = 10, sample_rate: int = 16000, *, weights: str | None = None,
             arch: str | dict[str, Any] = "base", freeze_feature_extractor: bool = True) -> nn.Module:
    """torchaudio's wav2vec 2.0 with a classification head; needs local ``weights`` (16 kHz)."""
    if weights is None:
        raise ValueError("the wav2vec2 model needs pretrained weights: build it with weights=PATH (a torchaudio "
                         "state dict file or a Hugging Face Wav2Vec2 folder); robustkd does not download them")
    if sample_rate != 16000:
        raise ValueError(f"wav2vec2 encoders are trained on 16 kHz audio but the task runs at {sample_rate} Hz: "
                         "build the task with sample_rate=16000, resample=True")
    return Wav2Vec2Classifier(load_wav2vec2_encoder(weights, arch), num_classes,
                              freeze_feature_extractor=freeze_feature_extractor)


__all__ = ["LogMel", "M5", "MelCNN", "Wav2Vec2Classifier", "load_wav2vec2_encoder", "m5", "mel_cnn", "wav2vec2"]
