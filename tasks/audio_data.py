"""Audio data: decoding labelled recordings to fixed-length mono waveforms in [-1, 1].

WAV/FLAC/OGG files are decoded with soundfile (libsndfile; no ffmpeg), optionally downmixed and
resampled to the task's rate with ``torchaudio.functional.resample``, centred and zero-padded or
cropped to ``num_samples``, and kept as one float tensor per split (:class:`WaveformDataset`),
decoded once per process and optionally also cached on disk (``cache_dir``). A file that cannot be
used as it is raises :class:`AudioDataError` naming the file and the fix.
"""
from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from robustkd.extras import require
from robustkd.task import Batch

AUDIO_DOMAIN = (-1.0, 1.0)
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")


class AudioDataError(ValueError):
    """An audio file that cannot be used as it is (corrupt, empty, stereo, wrong rate); the message
    names the file and the fix."""


# -- decoding ---------------------------------------------------------------------------------
def read_wav(path: str | Path, *, sample_rate: int | None = None, resample: bool = False,
             downmix: bool = False, normalize_loud: bool = False) -> tuple[Tensor, int]:
    """Decode one file to a float32 mono waveform in [-1, 1] (and its rate after resampling).

    Refuses, naming the file: unreadable/corrupt files, files without samples, multi-channel
    files (unless ``downmix``), a rate other than ``sample_rate`` unless ``resample``, and samples
    beyond [-1, 1] (a float WAV written unscaled; clipping would distort it) unless ``normalize_loud``,
    which divides such a file by its peak.
    """
    sf = require("soundfile", "speech", "reading audio files")

    path = Path(path)
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # noqa: BLE001 - libsndfile raises several types for bad files
        raise AudioDataError(f"cannot decode audio file {path}: {type(exc).__name__}: {exc}. The file is corrupt, "
                             "truncated or not a WAV/FLAC/OGG: fix or remove it.") from exc
    if data.shape[0] == 0:
        raise AudioDataError(f"audio file {path} holds no samples (empty recording): remove it from the data folder")
    if data.shape[1] != 1:
        if not downmix:
            raise AudioDataError(f"audio file {path} has {data.shape[1]} channels but speech tasks take mono audio: "
                                 "convert it to mono, or build the task with downmix=True to average the channels (recipes: "
                                 "--task-kwargs '{\"downmix\": true}')")
        data = data.mean(axis=1, keepdims=True)
    peak = float(np.abs(data).max())
    if peak > AUDIO_DOMAIN[1] and np.isfinite(peak):
        if not normalize_loud:
            raise AudioDataError(f"audio file {path} has samples up to {peak:.4g} but audio lies in [-1, 1] (a float "
                                 f"WAV {peak:.3g}x too loud; clipping would distort it): rescale the file (divide it by "
                                 "its peak), or build the task with normalize_loud=True to scale such files down to a "
                                 "peak of 1 (recipes: --task-kwargs '{\"normalize_loud\": true}')")
        data = data / peak
    wave = torch.from_numpy(np.ascontiguousarray(data[:, 0]))
    if sample_rate is not None and rate != sample_rate:
        if not resample:
            raise AudioDataError(f"audio file {path} is sampled at {rate} Hz but the task expects {sample_rate} Hz: "
                                 f"build the task with resample=True (--resample) to convert it, or choose "
                                 f"sample_rate={rate}")
        AF = require("torchaudio.functional", "speech", "resampling audio")

        wave = AF.resample(wave, rate, sample_rate)
        rate = sample_rate
    if not torch.isfinite(wave).all():
        raise AudioDataError(f"audio file {path} contains NaN or infinite samples")
    return wave.clamp_(*AUDIO_DOMAIN), int(rate)


def fix_length(wave: Tensor, num_samples: int) -> Tensor:
    """Centre the recording in a window of ``num_samples``: zero-pad both sides or crop the middle."""
    n = wave.shape[-1]
    if n == num_samples:
        return wave
    if n > num_samples:
        start = (n - num_samples) // 2
        return wave[..., start:start + num_samples]
    left = (num_samples - n) // 2
    return torch.nn.functional.pad(wave, (left, num_samples - n - left))


def decode_files(files: Sequence[Path], num_samples: int, sample_rate: int | None, resample: bool,
                 downmix: bool = False, normalize_loud: bool = False) -> tuple[Tensor, int]:
    """Decode ``files`` into one ``(N, num_samples)`` float tensor; every file must share one rate
    (the first file's when ``sample_rate`` is None)."""
    out = torch.zeros(len(files), num_samples)
    rate = sample_rate
    for i, f in enumerate(files):
        wave, r = read_wav(f, sample_rate=rate, resample=resample, downmix=downmix, normalize_loud=normalize_loud)
        rate = r if rate is None else rate
        out[i] = fix_length(wave, num_samples)
    return out, int(rate or 0)


def _cache_key(files: Sequence[Path], *parts: Any) -> str:
    h = hashlib.sha1()
    for f in files:
        st = f.stat()
        h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(repr(parts).encode())
    return h.hexdigest()[:16]


def load_waveforms(files: Sequence[Path], num_samples: int, sample_rate: int | None, resample: bool,
                   downmix: bool = False, cache_dir: str | None = None,
                   normalize_loud: bool = False) -> tuple[Tensor, int]:
    """:func:`decode_files`, memoised in the process and (with ``cache_dir``) on disk, keyed by the
    files' paths, sizes and modification times and the decoding settings."""
    key = _cache_key(files, num_samples, sample_rate, resample, downmix, *(("normalize_loud",) if normalize_loud else ()))
    return _load_cached(key, tuple(files), num_samples, sample_rate, resample, downmix, cache_dir, normalize_loud)


@functools.lru_cache(maxsize=16)
def _load_cached(key: str, files: tuple[Path, ...], num_samples: int, sample_rate: int | None, resample: bool,
                 downmix: bool, cache_dir: str | None, normalize_loud: bool = False) -> tuple[Tensor, int]:
    if cache_dir is not None:
        path = Path(cache_dir).expanduser() / f"waveforms-{key}.pt"
        if path.exists():
            saved = torch.load(str(path), weights_only=True)
            return saved["waves"], int(saved["rate"])
    waves, rate = decode_files(files, num_samples, sample_rate, resample, downmix, normalize_loud)
    if cache_dir is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"waves": waves, "rate": rate}, str(tmp))
        tmp.replace(path)
    return waves, rate


# -- data sets ----------------------------------------------------------------------------------
class WaveformDataset(Dataset):
    """Waveforms ``(N, L)`` and int64 labels; items are ``{"inputs", "labels"}`` dicts. ``files``
    and ``meta`` keep where each example came from (for split checks and error messages)."""

    def __init__(self, waves: Tensor, labels: Tensor, files: Sequence[Path] = (), meta: Sequence[dict] = ()):
        self.waves, self.labels = waves, labels
        self.files, self.meta = list(files), list(meta)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Batch:
        return {"inputs": self.waves[i], "labels": self.labels[i]}


def audio_files(folder: Path) -> list[Path]:
    """The audio files (:data:`AUDIO_EXTENSIONS`) directly in ``folder``, sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)


__all__ = ["AUDIO_DOMAIN", "AUDIO_EXTENSIONS", "AudioDataError", "WaveformDataset", "audio_files", "decode_files",
           "fix_length", "load_waveforms", "read_wav"]
