"""Speech: FSDD / Speech Commands / wavfolder tasks, audio models, waveform attacks, the ADR recipe."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from robustkd_tasks.speech import AudioDataError, WavFolder, fix_length, read_wav

from robustkd import create_task
from robustkd.attacks import PGD, attacks_for, create_attack
from robustkd.attacks.speech import SNRMeter
from robustkd.registry import MODELS, RegistryError
from robustkd.task import DataNotFoundError
from robustkd.threat import SNRBall, ThreatModel, snr_db

REPO = Path(__file__).resolve().parents[1]
SNR_TOL_DB = 1e-4  # float32 rounding of the L2 projection; the bound itself is exact


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These small models run fastest single-threaded; two threads on a busy 2-core machine are
    an order of magnitude slower (oversubscription). Restored after this module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fsdd(shared: Path):
    return create_task("fsdd", data_dir=str(shared / "data" / "fsdd"))


@pytest.fixture(scope="module")
def fsdd_batch(fsdd):
    """30 real test recordings (3 per digit), plus two loud clipped copies near full scale to
    exercise the [-1, 1] clamp."""
    data = fsdd.dataset("test")
    x = torch.stack([data[i]["inputs"] for i in range(0, 300, 10)])
    y = torch.stack([data[i]["labels"] for i in range(0, 300, 10)])
    loud = (3 * x[:2] / x[:2].abs().amax(1, keepdim=True)).clamp(-0.999, 0.999)  # clipped, many samples near the rails
    return {"inputs": torch.cat([x, loud]), "labels": torch.cat([y, y[:2]])}


def _model(task, name="mel_cnn", **kw):
    torch.manual_seed(0)
    return task.build_model(name, width=8, **kw).eval()


def _write(path: Path, data: np.ndarray, rate: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data, rate, subtype="PCM_16")
    return path


def _tone(n: int = 4000, freq: float = 440.0, rate: int = 8000) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * freq * np.arange(n) / rate)).astype(np.float32)


# -- FSDD ---------------------------------------------------------------------------------
def test_fsdd_split_is_take_and_speaker_correct(fsdd):
    train, test = fsdd.dataset("train"), fsdd.dataset("test")
    assert (len(train), len(test)) == (2700, 300)
    assert all(m["take"] < 5 for m in test.meta) and all(m["take"] >= 5 for m in train.meta)
    assert not set(train.files) & set(test.files)
    # every speaker and digit: takes 0-4 exactly in test, 5-49 in train
    test_keys = {(m["speaker"], m["digit"], m["take"]) for m in test.meta}
    speakers = {m["speaker"] for m in train.meta}
    assert len(speakers) == 6 and speakers == {m["speaker"] for m in test.meta}
    assert test_keys == {(s, d, t) for s in speakers for d in range(10) for t in range(5)}
    assert all(int(f.name.split("_")[0]) == int(y) for f, y in zip(test.files, test.labels))
    assert train.waves.shape == (2700, 8000) and train.waves.dtype == torch.float32
    assert float(train.waves.abs().max()) <= 1.0
    assert torch.bincount(test.labels).tolist() == [30] * 10


def test_fsdd_accepts_recordings_folder_and_refuses_bad_names(shared, tmp_path):
    task = create_task("fsdd", data_dir=str(shared / "data" / "fsdd" / "recordings"))
    assert task.num_classes == 10 and task.sample_rate == 8000
    _write(tmp_path / "recordings" / "3_alice_7.wav", _tone(), 8000)
    _write(tmp_path / "recordings" / "hello.wav", _tone(), 8000)
    with pytest.raises(AudioDataError, match="hello.wav"):
        create_task("fsdd", data_dir=str(tmp_path))
    with pytest.raises(DataNotFoundError, match="does not exist"):
        create_task("fsdd", data_dir=str(tmp_path / "nowhere"))


def test_fix_length_centres():
    w = torch.arange(1, 5, dtype=torch.float32)
    assert fix_length(w, 8).tolist() == [0, 0, 1, 2, 3, 4, 0, 0]
    assert fix_length(torch.arange(10.0), 4).tolist() == [3, 4, 5, 6]


# -- bad input ---------------------------------------------------------------------------------
def test_bad_wavs_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage that is not audio")
    with pytest.raises(AudioDataError, match="corrupt.wav"):
        read_wav(corrupt)
    zero_bytes = tmp_path / "zero.wav"
    zero_bytes.write_bytes(b"")
    with pytest.raises(AudioDataError, match="zero.wav"):
        read_wav(zero_bytes)
    empty = _write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 8000)
    with pytest.raises(AudioDataError, match="empty.wav.*no samples"):
        read_wav(empty)
    stereo = _write(tmp_path / "stereo.wav", np.stack([_tone(), _tone()], 1), 8000)
    with pytest.raises(AudioDataError, match="stereo.wav.*2 channels"):
        read_wav(stereo)
    assert read_wav(stereo, downmix=True)[0].shape == (4000,)
    fast = _write(tmp_path / "fast.wav", _tone(rate=16000), 16000)
    with pytest.raises(AudioDataError, match="fast.wav.*16000 Hz.*resample=True"):
        read_wav(fast, sample_rate=8000)
    wave, rate = read_wav(fast, sample_rate=8000, resample=True)
    assert rate == 8000 and wave.shape == (2000,)


def test_bad_files_fail_when_a_task_loads_them(tmp_path):
    _write(tmp_path / "first" / "a.wav", _tone(), 8000)
    _write(tmp_path / "second" / "b.wav", _tone(rate=16000), 16000)  # another rate than the first file
    task = create_task("wavfolder", data_dir=str(tmp_path), test_fraction=0.0)
    with pytest.raises(AudioDataError, match="b.wav.*16000 Hz"):
        task.dataset("train")
    ok = create_task("wavfolder", data_dir=str(tmp_path), test_fraction=0.0, sample_rate=8000, resample=True)
    assert ok.dataset("train").waves.shape == (2, 8000)


def test_folder_without_labelled_files(tmp_path):
    _write(tmp_path / "loose.wav", _tone(), 8000)  # no label folder
    (tmp_path / "empty_label").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not audio")
    with pytest.raises(DataNotFoundError, match="no labelled audio files"):
        create_task("wavfolder", data_dir=str(tmp_path))


# -- wavfolder and Speech Commands layouts ----------------------------------------------------------
def test_wavfolder_split_layouts(tmp_path):
    for split in ("train", "test"):
        for label in ("cat", "dog"):
            for i in range(3):
                _write(tmp_path / "tt" / split / label / f"{i}.wav", _tone(freq=300 + 100 * i), 8000)
    task = create_task("wavfolder", data_dir=str(tmp_path / "tt"))
    assert task.classes == ["cat", "dog"] and len(task.dataset("train")) == 6 and len(task.dataset("test")) == 6
    for label in ("a", "b"):
        for i in range(20):
            _write(tmp_path / "flat" / label / f"{label}{i}.wav", _tone(), 8000)
    flat = WavFolder(tmp_path / "flat", test_fraction=0.25)
    train, test = flat.dataset("train"), flat.dataset("test")
    assert len(train) + len(test) == 40 and 0 < len(test) < 40
    assert not set(train.files) & set(test.files)
    again = WavFolder(tmp_path / "flat", test_fraction=0.25)  # the split is stable
    assert again.dataset("test").files == test.files


def test_speech_commands_layout_and_offline_error(tmp_path):
    base = tmp_path / "SpeechCommands" / "speech_commands_v0.02"
    for word in ("go", "stop"):
        for spk in ("aaaa1111", "bbbb2222", "cccc3333"):
            _write(base / word / f"{spk}_nohash_0.wav", _tone(16000, rate=16000), 16000)
    _write(base / "_background_noise_" / "noise.wav", _tone(16000, rate=16000), 16000)
    (base / "validation_list.txt").write_text("go/bbbb2222_nohash_0.wav\nstop/bbbb2222_nohash_0.wav\n")
    (base / "testing_list.txt").write_text("go/cccc3333_nohash_0.wav\nstop/cccc3333_nohash_0.wav\n")
    task = create_task("speech_commands", data_dir=str(tmp_path), download=False)
    assert task.classes == ["go", "stop"] and task.sample_rate == 16000
    train, test = task.dataset("train"), task.dataset("test")
    assert len(train) == 2 and len(test) == 2 and train.waves.shape == (2, 16000)
    assert {m["speaker"] for m in test.meta} == {"cccc3333"}
    assert len(task.dataset("validation")) == 2
    with pytest.raises(DataNotFoundError, match="SpeechCommands/speech_commands_v0.02"):
        create_task("speech_commands", data_dir=str(tmp_path / "missing"), download=False)


# -- threat models and attacks ------------------------------------------------------------------------
def test_threat_model_dispatch(fsdd):
    assert isinstance(fsdd.threat_model(), SNRBall) and fsdd.threat_model().snr_db == 30.0
    snr = fsdd.threat_model(snr_db=20)
    assert isinstance(snr, SNRBall) and snr.snr_db == 20 and snr.domain == (-1.0, 1.0)
    linf = fsdd.threat_model(eps=0.01)
    assert type(linf) is ThreatModel and linf.norm == "linf" and linf.eps == 0.01 and linf.domain == (-1.0, 1.0)
    with pytest.raises(ValueError, match="not both"):
        fsdd.threat_model(eps=0.01, snr_db=20)
    atk = create_attack("pgd20:snr_db=30", fsdd)
    assert isinstance(atk, PGD) and isinstance(atk.threat, SNRBall) and atk.steps == 20
    assert create_attack("snr_pgd7:snr_db=40", fsdd).threat.snr_db == 40
    assert create_attack("linf_pgd5:eps=0.003", fsdd).threat.eps == 0.003
    fgm = create_attack("snr_fgsm:snr_db=20", fsdd).describe()
    assert fgm["attack"] == "snr_fgsm" and fgm["snr_db"] == 20 and fgm["steps"] == 1
    assert {"snr_pgd", "snr_fgsm", "linf_pgd", "linf_fgsm", "pgd"} <= set(attacks_for(fsdd))
    images = create_task("synthetic", n_train=4, n_test=4)
    assert "snr_pgd" not in attacks_for(images)
    with pytest.raises(RegistryError, match="WaveformInputs"):
        create_attack("snr_pgd", images)


@pytest.mark.parametrize("spec", ["pgd10:snr_db=40", "snr_pgd10:snr_db=30", "pgd10:snr_db=20", "snr_fgsm:snr_db=20"])
def test_snr_attacks_respect_the_bound_and_the_range(fsdd, fsdd_batch, spec):
    model = _model(fsdd)
    attack = create_attack(spec, fsdd)
    bound = attack.threat.snr_db
    x = fsdd_batch["inputs"]
    delta = attack(model, fsdd_batch).delta
    snr = snr_db(x, delta)
    assert (snr >= bound - SNR_TOL_DB).all(), f"SNR {float(snr.min()):.6f} dB below the {bound} dB bound"
    assert float((snr - bound).abs().median()) < 0.01  # the attack uses its budget
    adv = x + delta
    assert float(adv.min()) >= -1.0 and float(adv.max()) <= 1.0
    with torch.no_grad():  # and it is an attack: loss goes up
        ce = torch.nn.functional.cross_entropy
        assert ce(model(adv), fsdd_batch["labels"]) > ce(model(x), fsdd_batch["labels"])


def test_linf_attack_respects_amplitude_and_range(fsdd, fsdd_batch):
    model = _model(fsdd, "m5")
    for spec in ("pgd10:eps=0.004", "linf_fgsm:eps=0.004"):
        delta = create_attack(spec, fsdd)(model, fsdd_batch).delta
        adv = fsdd_batch["inputs"] + delta
        assert float(delta.abs().max()) <= 0.004 + 1e-7
        assert float(adv.min()) >= -1.0 and float(adv.max()) <= 1.0
        # the clamp binds on the loud (clipped at 0.999) examples: some samples end exactly at a rail
        assert bool((adv[-2:].abs() == 1.0).any())


def test_snr_meter_reports_every_example(fsdd, fsdd_batch):
    from robustkd.attacks.speech import MeasuredAttack

    measured = MeasuredAttack(create_attack("pgd3:snr_db=30", fsdd))
    measured(_model(fsdd), fsdd_batch)
    s = measured.meter.summary()
    assert s["num_examples"] == len(fsdd_batch["labels"]) and s["num_below_bound"] == 0
    assert s["min_snr_db"] >= 30 - SNR_TOL_DB and s["bound_snr_db"] == 30
    x = fsdd_batch["inputs"][:2]
    assert torch.isinf(snr_db(x, torch.zeros_like(x))).all()
    m = SNRMeter(20.0)
    m.update(x, 0.5 * x)  # 6 dB: far below a 20 dB bound
    assert m.summary()["num_below_bound"] == 2


# -- models ---------------------------------------------------------------------------------------------
def _tiny_wav2vec2_weights(path: Path) -> dict:
    import torchaudio.models as tm

    arch = dict(extractor_mode="group_norm", extractor_conv_layer_config=[(16, 10, 5), (16, 3, 2), (16, 2, 2)],
                extractor_conv_bias=False, encoder_embed_dim=32, encoder_projection_dropout=0.0,
                encoder_pos_conv_kernel=16, encoder_pos_conv_groups=4, encoder_num_layers=1, encoder_num_heads=2,
                encoder_attention_dropout=0.0, encoder_ff_interm_features=64, encoder_ff_interm_dropout=0.0,
                encoder_dropout=0.0, encoder_layer_norm_first=False, encoder_layer_drop=0.0)
    torch.manual_seed(0)
    torch.save(tm.wav2vec2_model(**arch, aux_num_out=None).state_dict(), path)
    return arch


@pytest.mark.parametrize("name", ["mel_cnn", "m5", "wav2vec2"])
def test_models_are_differentiable_to_the_waveform(name, tmp_path):
    from robustkd_tasks.speech_models import m5, mel_cnn, wav2vec2

    x = (0.1 * torch.randn(3, 16000)).requires_grad_(True)
    if name == "wav2vec2":
        weights = tmp_path / "w2v2.pt"
        model = wav2vec2(4, 16000, weights=str(weights), arch=_tiny_wav2vec2_weights(weights))
    else:
        model = {"mel_cnn": mel_cnn, "m5": m5}[name](4, 16000, width=8)
    assert MODELS.get(name)._robustkd_modality == "audio"
    model.eval()
    logits = model(x)
    assert logits.shape == (3, 4)
    (grad,) = torch.autograd.grad(logits[:, 0].sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert (grad.abs().sum(1) > 0).all()  # every example's waveform gets a gradient


def test_wav2vec2_needs_local_weights_and_16k(tmp_path):
    from robustkd_tasks.speech_models import wav2vec2

    with pytest.raises(ValueError, match="weights=PATH"):
        wav2vec2(10, 16000)
    with pytest.raises(FileNotFoundError, match="do not exist"):
        wav2vec2(10, 16000, weights=str(tmp_path / "nope.pt"))
    weights = tmp_path / "w.pt"
    arch = _tiny_wav2vec2_weights(weights)
    with pytest.raises(ValueError, match="16 kHz"):
        wav2vec2(10, 8000, weights=str(weights), arch=arch)
    with pytest.raises(ValueError, match="do not fit"):
        wav2vec2(10, 16000, weights=str(weights), arch="base")


def test_task_builds_audio_models_only(fsdd):
    assert {"mel_cnn", "m5", "wav2vec2"} <= set(fsdd.model_names())
    with pytest.raises(ValueError, match="not an audio model"):
        fsdd.build_model("small_cnn")
    batch = {"inputs": fsdd.dataset("test").waves[:4], "labels": fsdd.dataset("test").labels[:4]}
    fsdd.validate_batch(batch)
    fsdd.check_model(_model(fsdd), batch)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        fsdd.validate_batch({"inputs": batch["inputs"] * 10 + 2, "labels": batch["labels"]})


# -- the recipe ----------------------------------------------------------------------------------------
def test_short_adr_run_on_fsdd_writes_report(shared, tmp_path):
    sys.path.insert(0, str(REPO / "recipes"))
    try:
        import speech_adr
    finally:
        sys.path.remove(str(REPO / "recipes"))
    out = tmp_path / "run"
    report = speech_adr.main([
        "--dataset", "fsdd", "--data-dir", str(shared / "data" / "fsdd"), "--method", "adr",
        "--max-train-samples", "100", "--max-eval-samples", "32", "--epochs", "1", "--batch-size", "32",
        "--attack-steps", "2", "--width", "8", "--eval-attacks", "pgd2:snr_db=30", "--output-dir", str(out),
        "--final-attacks", "pgd3:snr_db=40,pgd3:snr_db=30,pgd3:snr_db=20,pgd3:eps=0.002", "--no-progress",
        "--curve-steps", "2"])
    saved = json.loads((out / "report.json").read_text())
    assert saved["model"]["method"] == "adr" and saved["task"]["name"] == "fsdd" and saved["model"]["name"] == "mel_cnn"
    specs = ["pgd3:snr_db=40", "pgd3:snr_db=30", "pgd3:snr_db=20", "pgd3:eps=0.002"]
    assert sorted(saved["metrics"]["adversarial"]) == sorted(specs)
    assert sorted(saved["ema"]["robust_accuracy"]) == sorted(specs)
    ema = json.loads((out / "ema" / "report.json").read_text())
    assert ema["achieved_snr"]["pgd3:snr_db=20"]["num_below_bound"] == 0
    for spec in specs[:3]:
        meas = saved["achieved_snr"][spec]
        assert meas["num_examples"] == 32 and meas["num_below_bound"] == 0
        assert meas["min_snr_db"] >= meas["bound_snr_db"] - SNR_TOL_DB
    assert saved["achieved_snr"]["pgd3:eps=0.002"]["max_abs_delta"] <= 0.002 + 1e-7
    assert saved["attacks"]["pgd3:snr_db=20"]["type"] == "SNRBall"
    assert saved["threat_models"]["train"]["snr_db"] == 30.0
    assert report["data"] == {"sample_rate": 8000, "clip_seconds": 1.0, "num_train": 2700, "num_test": 300}
    assert saved["threat_models"]["eval_default"]["snr_db"] == 30.0  # the run's one threat model
    meta = json.loads((out / "checkpoints" / "epoch-1" / "run_config.json").read_text())
    assert meta["sample_rate"] == 8000 and meta["clip_seconds"] == 1.0  # the recipe's on_init_end
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and "pgd2:snr_db=30" in json.loads(lines[0])["robust_accuracy"]
    assert (out / "training_curve.png").exists() and (out / "model.safetensors").exists()
    assert 0.0 <= saved["metrics"]["clean"]["accuracy"] <= 1.0


def test_mtard_on_fsdd_with_teachers_from_a_speech_run(shared, tmp_path):
    """MTARD through the same recipe: a (1-epoch) standard run is loaded back as both teachers."""
    sys.path.insert(0, str(REPO / "recipes"))
    try:
        import speech_adr
    finally:
        sys.path.remove(str(REPO / "recipes"))
    common = ["--dataset", "fsdd", "--data-dir", str(shared / "data" / "fsdd"), "--max-train-samples", "64",
              "--max-eval-samples", "16", "--epochs", "1", "--batch-size", "32", "--attack-steps", "2",
              "--width", "8", "--eval-every", "0", "--final-attacks", "pgd2:snr_db=30", "--no-progress",
              "--curve-steps", "2"]
    teacher = tmp_path / "teacher"
    speech_adr.main(common + ["--method", "standard", "--output-dir", str(teacher)])
    with pytest.raises(ValueError, match="--clean-teacher"):
        speech_adr.main(common + ["--method", "mtard", "--output-dir", str(tmp_path / "x")])
    out = tmp_path / "mtard"
    report = speech_adr.main(common + ["--method", "mtard", "--clean-teacher", str(teacher), "--robust-teacher", "ema",
                                       "--output-dir", str(out)])
    assert report["model"]["method"] == "mtard" and (out / "report.json").exists()
    assert report["achieved_snr"]["pgd2:snr_db=30"]["num_below_bound"] == 0


# -- the conformance kit on the built-in speech plug-ins -------------------------------------------
def test_fsdd_passes_the_task_conformance_kit(fsdd):
    from robustkd.testing import check_task

    check_task(fsdd, model="mel_cnn", models=["mel_cnn", "m5"], max_samples=64)


@pytest.mark.parametrize("spec", ["snr_pgd5:snr_db=30", "snr_fgsm:snr_db=20", "linf_pgd5:eps=0.002"])
def test_speech_attacks_pass_the_attack_conformance_kit(fsdd, spec):
    from robustkd.testing import check_attack

    check_attack(spec, fsdd, _model(fsdd))
