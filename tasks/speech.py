"""Spoken-word classification: FSDD digits, Speech Commands keywords, any folder of labelled WAVs, and
``hf_audio`` (a transformers audio classifier inside :class:`robustkd.hf.RobustTrainer`).

Inputs are raw mono waveforms in [-1, 1] of a fixed length ``(N, num_samples)``; feature
extraction (log-mel, wav2vec2) lives inside the models (:mod:`robustkd_tasks.speech_models`) so
attacks perturb the waveform. Files are decoded, resampled, fitted to ``num_samples`` and cached by
:mod:`robustkd_tasks.audio_data`; this module says which files form each split of each data set
and registers the tasks.

The default threat model is an SNR ball (perturbation energy ``snr_db`` below each clean
signal's, clamped to [-1, 1]); ``threat_model(eps=..., norm="linf")`` gives an amplitude ball.
"""
from __future__ import annotations

import hashlib
import re
from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustkd.extras import require
from robustkd.registry import MODELS, register_task
from robustkd.task import Batch, ContinuousTask, DataNotFoundError, check_norm
from robustkd.threat import SNRBall, ThreatModel

from . import speech_models
from .audio_data import (
    AUDIO_DOMAIN,
    AUDIO_EXTENSIONS,
    AudioDataError,
    WaveformDataset,
    audio_files,
    decode_files,
    fix_length,
    load_waveforms,
    read_wav,
)
from .hf_model import HFModelTask


class SpeechClassification(ContinuousTask):
    """Fixed-length mono waveforms in [-1, 1]; subclasses say which files form each split.

    ``sample_rate`` is the rate the models see; files at another rate are an error unless
    ``resample``; files with samples beyond [-1, 1] are an error unless ``normalize_loud`` (each such
    file divided by its peak). ``clip_seconds`` sets the fixed length. The default threat model is
    ``SNRBall(snr_db)``; ``eps`` sets the default amplitude budget for L-inf/L2 balls.
    """

    modality = "audio"
    input_domain = AUDIO_DOMAIN
    default_eval_attacks = ("pgd20:snr_db=40", "pgd20:snr_db=30", "pgd20:snr_db=20")

    def __init__(self, name: str, classes: Sequence[str], *, sample_rate: int | None, clip_seconds: float = 1.0,
                 resample: bool = False, downmix: bool = False, snr_db: float = 30.0, eps: float = 0.002,
                 norm: str = "linf", cache_dir: str | None = None, normalize_loud: bool = False):
        require("soundfile", "speech", f"the {name} task")  # before any work: one line naming the extra
        self.name, self.classes = name, list(classes)
        self.num_classes = len(self.classes)
        self.sample_rate, self.clip_seconds = sample_rate, float(clip_seconds)
        self.resample, self.downmix, self.cache_dir = resample, downmix, cache_dir
        self.normalize_loud = bool(normalize_loud)  # float WAVs beyond [-1, 1]: refused unless True
        self.snr_db, self.eps, self.norm = float(snr_db), float(eps), check_norm(norm)
        self._datasets: dict[str, WaveformDataset] = {}

    @property
    def num_samples(self) -> int:
        if self.sample_rate is None:
            raise RuntimeError(f"{self.name}: the sample rate is known once a split is loaded (or pass sample_rate=)")
        return int(round(self.sample_rate * self.clip_seconds))

    # -- data ---------------------------------------------------------------------------------
    @abstractmethod
    def split_files(self, split: str) -> tuple[list[Path], list[int], list[dict]]:
        """The files of ``split``, their class indices and per-file metadata (each data set's layout)."""

    def dataset(self, split: str) -> WaveformDataset:
        if split not in self._datasets:
            files, labels, meta = self.split_files(split)
            if not files:
                raise DataNotFoundError(f"{self.name}: the {split!r} split has no audio files")
            if self.sample_rate is None:  # take the data's own rate from the first file
                _, self.sample_rate = read_wav(files[0], downmix=self.downmix, normalize_loud=self.normalize_loud)
            waves, _ = load_waveforms(files, self.num_samples, self.sample_rate, self.resample, self.downmix,
                                      self.cache_dir, self.normalize_loud)
            self._datasets[split] = WaveformDataset(waves, torch.tensor(labels, dtype=torch.long), files, meta)
        return self._datasets[split]

    def validate_batch(self, batch: Batch) -> None:
        super().validate_batch(batch)
        x = batch["inputs"]
        if x.dim() != 2 or (self.sample_rate is not None and x.shape[1] != self.num_samples):
            raise ValueError(f"{self.name} expects waveform batches of shape (N, {self.num_samples}) "
                             f"({self.clip_seconds:g} s at {self.sample_rate} Hz), got {tuple(x.shape)}")
        lo, hi = float(x.min()), float(x.max())
        if lo < AUDIO_DOMAIN[0] or hi > AUDIO_DOMAIN[1]:
            raise ValueError(f"waveform values span [{lo:.3f}, {hi:.3f}] but must lie in [-1, 1]: feed raw "
                             "audio; robustkd audio models extract features inside.")

    # -- models -------------------------------------------------------------------------------
    def build_model(self, name: str, **kwargs: Any) -> nn.Module:
        """A registered audio model (``mel_cnn``, ``m5``, ``wav2vec2``) for this task's classes and rate."""
        factory = MODELS.get(name)
        if getattr(factory, "_robustkd_modality", None) != "audio":
            raise ValueError(f"the model {name!r} is not an audio model; audio models: {', '.join(self.model_names())}")
        if self.sample_rate is None:
            self.dataset("train")  # learn the data's rate before sizing the front-end
        return factory(num_classes=self.num_classes, sample_rate=self.sample_rate, **kwargs)

    def model_names(self) -> list[str]:
        return [e.name for e in MODELS.entries() if getattr(e.obj, "_robustkd_modality", None) == "audio"]

    # -- threat models ------------------------------------------------------------------------
    def threat_model(self, eps: float | None = None, norm: str | None = None, snr_db: float | None = None,
                     **kwargs: Any) -> ThreatModel:
        """``snr_db`` -> an SNR ball; ``eps``/``norm`` -> an amplitude ball in [-1, 1]; neither -> the
        task's default SNR ball."""
        if kwargs:
            raise TypeError(f"unknown threat-model options {sorted(kwargs)} for {self.name}: use eps, norm or snr_db")
        if snr_db is not None:
            if eps is not None or norm is not None:
                raise ValueError("give either snr_db (an SNR ball) or eps/norm (an amplitude ball), not both")
            return SNRBall(float(snr_db), AUDIO_DOMAIN)
        if eps is None and norm is None:
            return SNRBall(self.snr_db, AUDIO_DOMAIN)
        return ThreatModel(self.eps if eps is None else float(eps), check_norm(norm or self.norm), domain=AUDIO_DOMAIN)

    def snr_threat(self, snr_db: float | None = None) -> SNRBall:
        """The SNR ball at ``snr_db`` (default: the task's budget): the ``WaveformInputs`` capability the
        waveform attacks (``snr_pgd``, ``linf_pgd``, ...) require."""
        return SNRBall(self.snr_db if snr_db is None else float(snr_db), AUDIO_DOMAIN)


# -- FSDD -----------------------------------------------------------------------------------------
FSDD_NAME = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)$")


class FSDD(SpeechClassification):
    """Free Spoken Digit Dataset: ``{digit}_{speaker}_{take}.wav`` at 8 kHz. The usual split:
    takes 0..``test_takes - 1`` of every speaker and digit are the test set, the rest train."""

    def __init__(self, data_dir: str | Path | None, *, test_takes: int = 5, sample_rate: int | None = 8000, **kwargs: Any):
        super().__init__("fsdd", [str(d) for d in range(10)], sample_rate=sample_rate, **kwargs)
        self.root = _fsdd_recordings(data_dir)
        self.test_takes = int(test_takes)
        self._index = self._scan()

    def _scan(self) -> list[tuple[Path, int, str, int]]:
        entries = []
        for f in sorted(p for p in self.root.iterdir() if p.suffix.lower() == ".wav"):
            m = FSDD_NAME.match(f.stem)
            if m is None:
                raise AudioDataError(f"{f} does not follow FSDD's {{digit}}_{{speaker}}_{{take}}.wav naming: "
                                     "rename or remove it (or use the wavfolder task for other layouts)")
            entries.append((f, int(m.group(1)), m.group(2), int(m.group(3))))
        if not entries:
            raise DataNotFoundError(f"{self.root} holds no FSDD recordings ({{digit}}_{{speaker}}_{{take}}.wav): "
                                    "point --data-dir at FSDD's folder or its recordings/ subfolder")
        return entries

    def split_files(self, split: str) -> tuple[list[Path], list[int], list[dict]]:
        if split not in ("train", "test"):
            raise ValueError(f"FSDD has the splits 'train' and 'test', not {split!r}")
        rows = [e for e in self._index if (e[3] < self.test_takes) == (split == "test")]
        return ([r[0] for r in rows], [r[1] for r in rows],
                [{"speaker": r[2], "take": r[3], "digit": r[1]} for r in rows])


def _fsdd_recordings(data_dir: str | Path | None) -> Path:
    if data_dir is None:
        raise DataNotFoundError("the fsdd task needs --data-dir: FSDD's folder (with recordings/) or the recordings/ "
                                "folder itself, e.g. ../shared/data/fsdd")
    root = Path(data_dir).expanduser()
    if (root / "recordings").is_dir():
        root = root / "recordings"
    if not root.is_dir():
        raise DataNotFoundError(f"--data-dir {str(data_dir)!r} does not exist or is not a directory (FSDD's folder "
                                "with recordings/ expected)")
    return root


# -- Speech Commands ---------------------------------------------------------------------------
SC_SPLITS = {"train": "training", "validation": "validation", "val": "validation", "test": "testing"}


class SpeechCommands(SpeechClassification):
    """Speech Commands (Warden 2018) in torchaudio's ``SPEECHCOMMANDS`` layout
    (``ROOT/SpeechCommands/speech_commands_v0.02/<word>/*.wav`` with ``validation_list.txt`` and
    ``testing_list.txt``): 35 words (v0.02) at 16 kHz, 1 s. Downloads with torchaudio when
    ``download`` and the folder is missing; otherwise (and offline) a clear error."""

    def __init__(self, data_dir: str | Path | None, *, version: str = "speech_commands_v0.02", download: bool = True,
                 sample_rate: int | None = 16000, **kwargs: Any):
        self.root, self.version, self.download = _sc_root(data_dir, version), version, download
        self.path = self.root / "SpeechCommands" / version
        self._ensure()
        classes = sorted(p.name for p in self.path.iterdir() if p.is_dir() and not p.name.startswith("_"))
        if not classes:
            raise DataNotFoundError(f"{self.path} holds no word folders: not a Speech Commands copy")
        super().__init__("speech_commands", classes, sample_rate=sample_rate, **kwargs)

    def _ensure(self) -> None:
        if self.path.is_dir():
            return
        if not self.download:
            raise DataNotFoundError(f"no Speech Commands at {self.path}: pass --data-dir ROOT holding "
                                    f"SpeechCommands/{self.version}/ (torchaudio's layout), or allow the download")
        SPEECHCOMMANDS = require("torchaudio.datasets", "speech", "Speech Commands").SPEECHCOMMANDS

        try:
            self.root.mkdir(parents=True, exist_ok=True)
            SPEECHCOMMANDS(str(self.root), url=self.version, download=True)
        except Exception as exc:  # noqa: BLE001 - offline, refused, disk full: all need the same fix
            raise DataNotFoundError(
                f"Speech Commands is not at {self.path} and could not be downloaded ({type(exc).__name__}: "
                f"{str(exc)[:200]}). With no network, pass --data-dir ROOT holding SpeechCommands/{self.version}/ "
                "(torchaudio's SPEECHCOMMANDS layout). robustkd never substitutes other data.") from exc

    def split_files(self, split: str) -> tuple[list[Path], list[int], list[dict]]:
        SPEECHCOMMANDS = require("torchaudio.datasets", "speech", "Speech Commands").SPEECHCOMMANDS

        if split not in SC_SPLITS:
            raise ValueError(f"Speech Commands has the splits train, validation and test, not {split!r}")
        try:
            walker = SPEECHCOMMANDS(str(self.root), url=self.version, download=False, subset=SC_SPLITS[split])._walker
        except FileNotFoundError as exc:
            raise DataNotFoundError(f"{self.path} lacks the split list {Path(exc.filename).name}: an incomplete "
                                    "Speech Commands copy") from exc
        index = {c: i for i, c in enumerate(self.classes)}
        files = [Path(w) for w in walker]
        labels = []
        for f in files:
            if f.parent.name not in index:
                raise AudioDataError(f"{f} is listed in a split file but its folder {f.parent.name!r} is not a word "
                                     "folder of this copy")
            labels.append(index[f.parent.name])
        meta = [{"speaker": f.stem.split("_nohash_")[0], "word": f.parent.name} for f in files]
        return files, labels, meta


def _sc_root(data_dir: str | Path | None, version: str) -> Path:
    if data_dir is None:
        raise DataNotFoundError("the speech_commands task needs --data-dir ROOT (where SpeechCommands/ is or will "
                                "be downloaded to)")
    root = Path(data_dir).expanduser()
    if root.name == version and root.parent.name == "SpeechCommands":  # the inner folder itself
        return root.parent.parent
    if root.name == "SpeechCommands":
        return root.parent
    return root


# -- any folder of labelled WAVs ----------------------------------------------------------------------
class WavFolder(SpeechClassification):
    """Labelled audio in class subfolders: ``ROOT/train/<label>/*.wav`` and ``ROOT/test/<label>/*.wav``
    (or ``val/``), or ``ROOT/<label>/*.wav`` split by a stable hash of each file name, so a file
    keeps its split when others are added (``test_fraction`` of them go to test)."""

    def __init__(self, data_dir: str | Path | None, *, test_fraction: float = 0.2, sample_rate: int | None = None,
                 **kwargs: Any):
        if data_dir is None:
            raise DataNotFoundError("the wavfolder task needs --data-dir: a folder of <label>/*.wav subfolders")
        self.root = Path(data_dir).expanduser()
        if not self.root.is_dir():
            raise DataNotFoundError(f"--data-dir {str(data_dir)!r} does not exist or is not a directory")
        self.test_fraction = float(test_fraction)
        self.split_dirs: dict[str, Path] = {}
        for split, names in (("train", ("train",)), ("test", ("test", "val"))):
            found = [self.root / d for d in names if (self.root / d).is_dir()]
            if found:  # test/ before val/
                self.split_dirs[split] = found[0]
        label_roots = list(self.split_dirs.values()) or [self.root]
        classes = sorted({p.name for r in label_roots for p in r.iterdir() if p.is_dir() and audio_files(p)})
        if not classes:
            raise DataNotFoundError(
                f"{self.root} holds no labelled audio files: expected <label>/*.wav subfolders (or train/<label>/ and "
                f"test/<label>/); found {', '.join(sorted(p.name for p in self.root.iterdir())[:10]) or 'nothing'}")
        super().__init__("wavfolder", classes, sample_rate=sample_rate, **kwargs)
        if self.sample_rate is None:  # the data's own rate, from the first file (every file must share it)
            first = next((f for split in ("train", "test") for f in self._files_or_none(split)), None)
            if first is not None:
                _, self.sample_rate = read_wav(first, downmix=self.downmix, normalize_loud=self.normalize_loud)

    def _files_or_none(self, split: str) -> list[Path]:
        try:
            return self.split_files(split)[0]
        except DataNotFoundError:
            return []

    def split_files(self, split: str) -> tuple[list[Path], list[int], list[dict]]:
        if split not in ("train", "test"):
            raise ValueError(f"wavfolder has the splits 'train' and 'test', not {split!r}")
        index = {c: i for i, c in enumerate(self.classes)}
        if self.split_dirs:
            if split not in self.split_dirs:
                raise DataNotFoundError(f"{self.root} has no {split}/ folder (found {sorted(self.split_dirs)})")
            base = self.split_dirs[split]
            files = [f for c in self.classes if (base / c).is_dir() for f in audio_files(base / c)]
        else:
            files = [f for c in self.classes for f in audio_files(self.root / c)
                     if _hash_is_test(f.relative_to(self.root), self.test_fraction) == (split == "test")]
        return files, [index[f.parent.name] for f in files], [{"label": f.parent.name} for f in files]


def _hash_is_test(rel: Path, fraction: float) -> bool:
    digest = int(hashlib.sha1(str(rel.as_posix()).encode()).hexdigest(), 16)
    return (digest % 10_000) < fraction * 10_000


# -- Hugging Face audio classifiers inside transformers.Trainer (robustkd.hf) -------------------------------
class HFAudioTask(HFModelTask):
    """A data-less task around a transformers audio classifier (``input_values`` in: wav2vec2, HuBERT, ...)
    and its feature extractor, for :class:`robustkd.hf.RobustTrainer`. Attacks perturb ``input_values``
    (padding masked by ``attention_mask``) in an SNR ball measured on those values (``snr_db``, 30 dB by
    default), or an amplitude ball with ``eps``/``norm``; there is no domain clamp because the extractor
    may have standardised the waveform."""

    modality = "audio"
    default_eval_attacks = ("pgd20:snr_db=40", "pgd20:snr_db=30", "pgd20:snr_db=20")
    input_name = "input_values"
    auto_class = "AutoModelForAudioClassification"
    model_kind = "audio-classification"
    threat_options = "use eps, norm or snr_db"

    def __init__(self, model: nn.Module, processor: Any = None, *, snr_db: float = 30.0, eps: float = 0.002,
                 norm: str = "linf", name: str = "hf_audio"):
        super().__init__(model, name=name)
        self.sample_rate = getattr(processor, "sampling_rate", None)
        self.snr_db, self.eps, self.norm = float(snr_db), float(eps), check_norm(norm)

    def perturbation_mask(self, batch: Batch) -> Tensor | None:
        mask = batch.get("attention_mask")
        return None if mask is None else mask.to(batch["input_values"].dtype)

    def model_kwargs(self, batch: Batch) -> dict[str, Tensor]:
        """The padding mask, when the extractor returned one."""
        return {"attention_mask": batch["attention_mask"]} if "attention_mask" in batch else {}

    def logits(self, model: nn.Module, batch: Batch, delta: Tensor | None = None) -> Tensor:
        try:
            return super().logits(model, batch, delta)
        except RuntimeError as exc:
            if "leaf variables" not in str(exc):
                raise
            raise RuntimeError("the model's feature encoder marks its input as requiring grad in train mode, which "
                               "fails on a perturbed input: freeze it (model.freeze_feature_encoder(), as Hugging "
                               "Face's audio-classification example does) or attack in eval mode") from exc

    def threat_model(self, eps: float | None = None, norm: str | None = None, snr_db: float | None = None,
                     **kwargs: Any) -> ThreatModel:
        """``snr_db`` (or neither option) -> an SNR ball; ``eps``/``norm`` -> an amplitude ball."""
        self.refuse_threat_options(kwargs)
        if snr_db is not None and (eps is not None or norm is not None):
            raise ValueError("give either snr_db (an SNR ball) or eps/norm (an amplitude ball), not both")
        if eps is None and norm is None:
            return self.snr_threat(snr_db)
        return ThreatModel(self.eps if eps is None else float(eps), check_norm(norm or self.norm), domain=None)

    def snr_threat(self, snr_db: float | None = None) -> SNRBall:
        """The SNR ball on ``input_values`` (the ``WaveformInputs`` capability)."""
        return SNRBall(self.snr_db if snr_db is None else float(snr_db), domain=None)


# -- registration -------------------------------------------------------------------------------------
@register_task("hf_audio", hf_input="input_values")
def hf_audio(model: nn.Module, processor: Any = None, **kwargs: Any) -> HFAudioTask:
    """Any transformers audio classifier (``input_values`` in) inside RobustTrainer; snr_db/eps/norm options."""
    return HFAudioTask(model, processor, **kwargs)


@register_task("fsdd")
def fsdd(data_dir: str | None = None, **kwargs: Any) -> FSDD:
    """Free Spoken Digit Dataset: 10 digits, 8 kHz, takes 0-4 test (local folder)."""
    return FSDD(data_dir, **kwargs)


@register_task("speech_commands")
def speech_commands(data_dir: str | None = None, **kwargs: Any) -> SpeechCommands:
    """Speech Commands v0.02 (35 words, 16 kHz) in torchaudio's layout; downloads when online."""
    return SpeechCommands(data_dir, **kwargs)


@register_task("wavfolder")
def wavfolder(data_dir: str | None = None, **kwargs: Any) -> WavFolder:
    """Any folder of labelled audio: <label>/*.wav, or train/<label>/ and test/<label>/."""
    return WavFolder(data_dir, **kwargs)


__all__ = ["AUDIO_DOMAIN", "AUDIO_EXTENSIONS", "AudioDataError", "FSDD", "HFAudioTask", "SpeechClassification",
           "SpeechCommands", "WavFolder", "WaveformDataset", "audio_files", "decode_files", "fix_length", "fsdd",
           "hf_audio", "load_waveforms", "read_wav", "speech_commands", "speech_models", "wavfolder"]
