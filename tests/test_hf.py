"""RobustTrainer on any Hugging Face classification model whose task is registered: text, image and audio.

Each test builds a tiny randomly initialised model from a config (BERT with the MiniLM tokenizer, ViT,
wav2vec2), trains it robustly for a few steps inside ``transformers.Trainer`` and evaluates it under
attack, through the same API a user calls. ``robustkd.hf`` itself knows no modality: the task comes
from the registry, by the model's ``main_input_name``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from robustkd.attacks.base import create_attack

SHARED = Path(os.environ.get("ROBUSTKD_SHARED", Path(__file__).resolve().parents[2] / "shared"))
MINILM = SHARED / "models" / "all-MiniLM-L6-v2"


def _args(tmp_path: Path):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                             per_device_eval_batch_size=4, num_train_epochs=1, learning_rate=1e-3,
                             save_strategy="no", report_to=[], use_cpu=True, seed=0, logging_steps=1,
                             dataloader_num_workers=0)


def _train_and_evaluate(model, processor, train, val, tmp_path, robust):
    from robustkd.hf import RobustTrainer

    before = [p.detach().clone() for p in model.parameters()]
    trainer = RobustTrainer(model=model, args=_args(tmp_path), train_dataset=train, eval_dataset=val,
                            processing_class=processor, robust=robust)
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    assert any(not torch.equal(a, p.detach().cpu()) for a, p in zip(before, model.parameters())), "no step taken"
    metrics = trainer.evaluate()
    for spec in robust.eval_attacks:
        assert 0.0 <= metrics[f"eval_robust_accuracy/{spec}"] <= 1.0
    assert "eval_ema_clean_accuracy" in metrics  # ADR keeps an EMA teacher
    return trainer, metrics


def _dataset(columns: dict):
    from datasets import Dataset

    return Dataset.from_dict(columns).with_format("torch")


def test_robust_trainer_on_a_vit_image_classifier(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from robustkd.hf import RobustConfig

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=1,
                    num_attention_heads=2, intermediate_size=64, num_labels=3)
    model = ViTForImageClassification(cfg)
    processor = ViTImageProcessor(do_resize=False, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])
    pixels = torch.rand(12, 3, 16, 16)
    normed = processor(list(pixels.numpy()), do_rescale=False, return_tensors="pt")["pixel_values"]
    labels = torch.arange(12) % 3
    train = _dataset({"pixel_values": normed[:8], "labels": labels[:8]})
    val = _dataset({"pixel_values": normed[8:], "labels": labels[8:]})
    robust = RobustConfig(method="adr", attack_steps=2, eval_attacks=("pgd2", "fgsm"))
    trainer, _ = _train_and_evaluate(model, processor, train, val, tmp_path, robust)
    task = trainer.robust.task
    assert task.name == "hf_image" and task.num_classes == 3
    # the attacks act on raw pixels: the processor's normalisation is undone and reapplied
    batch = {"pixel_values": normed[8:], "labels": labels[8:]}
    assert torch.allclose(task.perturbation_base(model, batch), pixels[8:], atol=1e-5)
    adv = create_attack("pgd3", task)(model.eval(), batch)
    assert float(adv.delta.abs().max()) <= 8 / 255 + 1e-6
    x = pixels[8:] + adv.delta
    assert float(x.min()) >= -1e-6 and float(x.max()) <= 1 + 1e-6


def test_robust_trainer_on_a_wav2vec2_audio_classifier(tmp_path):
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForSequenceClassification

    from robustkd.hf import RobustConfig
    from robustkd.threat import snr_db

    torch.manual_seed(0)
    cfg = Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
                         num_conv_pos_embedding_groups=2, classifier_proj_size=16, num_labels=3, mask_time_prob=0.0)
    model = Wav2Vec2ForSequenceClassification(cfg)
    model.freeze_feature_encoder()  # as HF's audio-classification example; train-mode attacks need it
    extractor = Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True)
    waves = [w.numpy() for w in 0.3 * torch.randn(12, 1600)]
    values = extractor(waves, sampling_rate=16000, return_tensors="pt")["input_values"]
    labels = torch.arange(12) % 3
    train = _dataset({"input_values": values[:8], "labels": labels[:8]})
    val = _dataset({"input_values": values[8:], "labels": labels[8:]})
    robust = RobustConfig(method="adr", attack_steps=2, eval_attacks=("pgd2:snr_db=30", "snr_pgd2:snr_db=20"),
                          task_options={"snr_db": 30.0})
    trainer, _ = _train_and_evaluate(model, extractor, train, val, tmp_path, robust)
    task = trainer.robust.task
    assert task.name == "hf_audio" and task.sample_rate == 16000
    batch = {"input_values": values[8:], "labels": labels[8:]}
    adv = create_attack("snr_pgd3:snr_db=25", task)(model.eval(), batch)
    assert (snr_db(values[8:], adv.delta) >= 25 - 1e-3).all()


@pytest.mark.skipif(not MINILM.exists(), reason="needs the MiniLM tokenizer in ../shared/models")
def test_robust_trainer_on_a_bert_text_classifier(tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from robustkd.hf import RobustConfig

    tok = AutoTokenizer.from_pretrained(str(MINILM))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2)
    model = BertForSequenceClassification(cfg)
    texts = ["a good film", "a bad film", "great acting", "awful plot", "fun and nice", "dull and poor",
             "very good", "very bad", "nice story", "boring story", "fine", "poor"]
    enc = tok(texts, padding="max_length", max_length=12, truncation=True, return_tensors="pt")
    labels = torch.tensor([i % 2 for i in range(12)])
    cols = {k: v for k, v in enc.items()}
    train = _dataset({**{k: v[:8] for k, v in cols.items()}, "labels": labels[:8]})
    val = _dataset({**{k: v[8:] for k, v in cols.items()}, "labels": labels[8:]})
    robust = RobustConfig(method="adr", attack_steps=2, eps=0.1, max_length=12, eval_attacks=("embedding_pgd2",))
    trainer, _ = _train_and_evaluate(model, tok, train, val, tmp_path, robust)
    assert trainer.robust.task.name == "hf_text"


def test_a_model_without_a_registered_task_is_refused_clearly():
    from robustkd.hf import RobustCallback
    from robustkd.registry import RegistryError

    class Odd(torch.nn.Module):
        main_input_name = "point_cloud"

    with pytest.raises(RegistryError, match=r"no registered task takes models whose input is 'point_cloud'"):
        RobustCallback(Odd())


# -- a script written from the Trainer docs, with RobustTrainer in Trainer's place --------------------
SST2 = SHARED / "data" / "sst2" / "data"


@pytest.fixture(scope="module")
def sst2():
    """A tokenized SST-2 sample as the Trainer docs make one (``datasets.map`` over the tokenizer), a tiny
    BERT factory with the MiniLM vocabulary (no dropout) and the docs' padding collator."""
    from datasets import load_dataset
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, DataCollatorWithPadding

    tok = AutoTokenizer.from_pretrained(str(MINILM))
    raw = load_dataset("parquet", data_files={"train": str(SST2 / "train-00000-of-00001.parquet"),
                                              "validation": str(SST2 / "validation-00000-of-00001.parquet")})

    def tokenize(batch):
        return tok(batch["sentence"], truncation=True, max_length=16)

    train = raw["train"].shuffle(seed=0).select(range(12)).map(tokenize, batched=True)
    val = raw["validation"].shuffle(seed=0).select(range(12)).map(tokenize, batched=True)

    def model_init(num_labels: int = 2):
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32, num_labels=num_labels,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return BertForSequenceClassification(cfg)

    return {"tok": tok, "train": train, "val": val.select(range(6)), "other": val.select(range(6, 12)),
            "model_init": model_init, "collator": DataCollatorWithPadding(tok)}


def _hf_args(tmp_path, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, per_device_eval_batch_size=4,
                learning_rate=1e-3, report_to=[], use_cpu=True, seed=0, logging_steps=1, disable_tqdm=True,
                dataloader_num_workers=0, save_strategy="no")
    base.update(kw)
    return TrainingArguments(**base)


def _robust(**kw):
    from robustkd.hf import RobustConfig

    base = dict(method="adr", attack_steps=1, eps=0.1, max_length=16, eval_attacks=("embedding_pgd2",))
    base.update(kw)
    return RobustConfig(**base)


def _trainer(sst2, tmp_path, robust=None, model=None, **kw):
    from robustkd.hf import RobustTrainer

    datasets = {k: kw.pop(k) for k in ("train_dataset", "eval_dataset") if k in kw}
    extra = {k: kw.pop(k) for k in ("callbacks", "compute_metrics", "compute_loss_func") if k in kw}
    return RobustTrainer(model=model or sst2["model_init"](), args=_hf_args(tmp_path, **kw),
                         train_dataset=datasets.get("train_dataset", sst2["train"]),
                         eval_dataset=datasets.get("eval_dataset", sst2["val"]), processing_class=sst2["tok"],
                         data_collator=sst2["collator"], robust=robust or _robust(), **extra)


def test_dict_eval_datasets_and_robust_metrics_in_the_one_dict_callbacks_see(sst2, tmp_path):
    """Items 1-2: eval_dataset as a dict evaluates each set (robust metrics too, eval_<name>_...); robust
    metrics are in the metrics dict on_evaluate receives and in the one logged row per evaluation, so
    EarlyStoppingCallback acts on a robust metric (threshold 1.0: no evaluation improves by that much,
    so training stops at the second evaluation instead of running its 4 steps)."""
    from transformers import EarlyStoppingCallback, TrainerCallback

    seen: list[dict] = []

    class Spy(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kw):
            seen.append(dict(metrics))

    metric = "eval_val_ema_robust_accuracy/embedding_pgd2"
    trainer = _trainer(sst2, tmp_path, eval_dataset={"val": sst2["val"], "other": sst2["other"]}, max_steps=4,
                       eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                       load_best_model_at_end=True, metric_for_best_model=metric,
                       callbacks=[Spy(), EarlyStoppingCallback(early_stopping_patience=1, early_stopping_threshold=1.0)])
    trainer.train()
    assert trainer.state.global_step == 2  # early stopping saw the robust metric
    for name in ("val", "other"):
        rows = [m for m in seen if f"eval_{name}_loss" in m]
        assert len(rows) == 2
        for m in rows:
            for key in ("clean_accuracy", "robust_accuracy/embedding_pgd2", "ema_clean_accuracy",
                        "ema_robust_accuracy/embedding_pgd2"):
                assert 0.0 <= m[f"eval_{name}_{key}"] <= 1.0, key
            assert m[f"eval_{name}_robust_num_examples"] == 6
    # one logged row per evaluation of a set, holding Trainer's and the robust metrics
    logged = [h for h in trainer.state.log_history if any(k.startswith("eval_") for k in h)]
    assert len(logged) == 4 and all(any("robust_accuracy" in k for k in h) for h in logged)
    metrics = trainer.evaluate()  # outside training: both sets, every metric
    assert {"eval_val_ema_robust_accuracy/embedding_pgd2", "eval_other_robust_accuracy/embedding_pgd2"} <= set(metrics)
    assert trainer.evaluate(sst2["other"], metric_key_prefix="x")["x_robust_num_examples"] == 6


def test_load_best_model_at_end_restores_the_best_checkpoints_ema(sst2, tmp_path):
    """Item 3: save_model() after load_best_model_at_end writes the best checkpoint's model *and* its EMA
    (the metric is constant, so the first checkpoint stays the best and differs from the last)."""
    from safetensors.torch import load_file

    from robustkd.hf import EMA_FILE, EMA_NOTE

    trainer = _trainer(sst2, tmp_path, max_steps=2, eval_strategy="steps", eval_steps=1, save_strategy="steps",
                       save_steps=1, load_best_model_at_end=True, metric_for_best_model="robust_num_examples")
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith("checkpoint-1")
    saved = load_file(str(Path(best) / EMA_FILE))
    last = load_file(str(tmp_path / "out" / "checkpoint-2" / EMA_FILE))
    ema = trainer.robust.ema.model.state_dict()
    assert any(not torch.equal(saved[k], last[k]) for k in saved)
    assert all(torch.equal(ema[k].cpu(), v) for k, v in saved.items())
    assert trainer.robust.ema.num_updates == 1
    trainer.save_model(str(tmp_path / "final"))
    note = json.loads((tmp_path / "final" / "ema" / EMA_NOTE).read_text())
    assert note["from_checkpoint"] == best and note["num_updates"] == 1


def test_trainer_options_a_robust_loss_cannot_honour_are_refused(sst2, tmp_path):
    """Item 4 (and issue 24 item 7): one clear line each, before any training."""
    with pytest.raises(ValueError, match="compute_loss_func"):
        _trainer(sst2, tmp_path, compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.loss)
    with pytest.raises(ValueError, match="label_smoothing_factor=0"):
        _trainer(sst2, tmp_path, label_smoothing_factor=0.1)
    with pytest.raises(ValueError, match=r"num_labels=3 but the train dataset's column 'label' has 2 classes"):
        _trainer(sst2, tmp_path, model=sst2["model_init"](3))
    from datasets import Value

    plain = sst2["train"].cast_column("label", Value("int64"))  # no ClassLabel: the labels themselves
    with pytest.raises(ValueError, match=r"num_labels=3 .*labels are 0\.\.1"):
        _trainer(sst2, tmp_path, model=sst2["model_init"](3), train_dataset=plain)
    bad = plain.map(lambda b: {"label": [2 * y for y in b["label"]]}, batched=True)
    with pytest.raises(ValueError, match=r"labels 0\.\.2 but the model has num_labels=2"):
        _trainer(sst2, tmp_path, train_dataset=bad)
    with pytest.raises(ValueError, match="eval_every=1"):
        _trainer(sst2, tmp_path, robust=_robust(eval_every=2), metric_for_best_model="ema_robust_accuracy/embedding_pgd2",
                 eval_strategy="steps", save_strategy="steps")
    assert not (tmp_path / "out").exists()


def test_gradient_accumulation_equals_a_larger_batch_for_a_model_whose_forward_takes_kwargs(tmp_path):
    """Item 4: ViT's forward takes **kwargs (Trainer would then skip dividing by the accumulation steps);
    the robust loss is a batch mean, so 2 x 2 accumulated examples must give the update of one batch of 4."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from robustkd.hf import RobustConfig, RobustTrainer

    pixels = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    processor = ViTImageProcessor(do_resize=False, image_mean=[0.5] * 3, image_std=[0.25] * 3)
    data = _dataset({"pixel_values": (pixels - 0.5) / 0.25, "labels": torch.tensor([0, 1, 2, 0])})
    cfg = ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    weights = []
    for batch, accumulate in ((4, 1), (2, 2)):
        torch.manual_seed(0)
        model = ViTForImageClassification(cfg)
        args = _hf_args(tmp_path / f"b{batch}", per_device_train_batch_size=batch, gradient_accumulation_steps=accumulate,
                        max_steps=1, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", weight_decay=0.0)
        trainer = RobustTrainer(model=model, args=args, train_dataset=data, processing_class=processor,
                                robust=RobustConfig(method="pgd_at", attack="pgd:random_start=zero", attack_steps=1))
        assert trainer.model_accepts_loss_kwargs is False
        trainer.train()
        weights.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*weights):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_plain_trainer_checkpoint_continues_with_a_fresh_ema(sst2, tmp_path):
    """Item 5: a plain Trainer checkpoint is refused with the fix named; fresh_ema=True continues it with an
    EMA started from its weights."""
    from transformers import Trainer


    model = sst2["model_init"]()
    plain = Trainer(model=model, args=_hf_args(tmp_path, max_steps=1, save_strategy="steps", save_steps=1),
                    train_dataset=sst2["train"], processing_class=sst2["tok"], data_collator=sst2["collator"])
    plain.train()
    trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.raises(FileNotFoundError, match=r"fresh_ema=True"):
        _trainer(sst2, tmp_path, max_steps=2).train(resume_from_checkpoint=True)
    starts = {}
    from transformers import TrainerCallback

    class Spy(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):  # the EMA before its first update
            if not starts:
                starts.update({k: v.detach().clone() for k, v in trainer.robust.ema.model.state_dict().items()})

    trainer = _trainer(sst2, tmp_path, robust=_robust(fresh_ema=True), max_steps=2, callbacks=[Spy()])
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 2 and trainer.robust.ema.num_updates == 1
    assert all(torch.equal(starts[k], v) for k, v in trained.items())


def test_schedule_keys_are_the_documented_ones_and_robust_evaluation_has_its_own_budget(sst2, tmp_path):
    """Item 5: the logged schedule keys are docs/text.md's; eval_samples picks a seeded sample (the same
    every time) and eval_every runs the robust metrics at every N-th evaluation of training only."""
    trainer = _trainer(sst2, tmp_path, robust=_robust(eval_samples=3, eval_every=2), max_steps=4,
                       eval_strategy="steps", eval_steps=1)
    trainer.train()
    doc = (Path(__file__).resolve().parents[1] / "docs" / "text.md").read_text()
    logged = {k for h in trainer.state.log_history for k in h if k.startswith("robust/")}
    assert logged == {"robust/adr_tau", "robust/adr_lambda"}
    assert all(f"`{k}`" in doc for k in logged)
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [("eval_robust_accuracy/embedding_pgd2" in h) for h in evals] == [False, True, False, True]
    assert all(h["eval_robust_num_examples"] == 3 for h in evals if "eval_robust_num_examples" in h)
    points = trainer.robust_points(sst2["val"])
    assert len(points) == 3 and points["sentence"] == trainer.robust_points(sst2["val"])["sentence"]
    assert "eval_robust_accuracy/embedding_pgd2" in trainer.evaluate()  # evaluate() by hand: always


def test_evaluation_attacks_are_built_once_and_every_evaluation_runs_them(sst2, tmp_path, monkeypatch):
    """RobustConfig(eval_attacks=...) is built into attacks once, with the trainer; each evaluate() runs those."""
    import robustkd.hf as hf

    built = []
    real = hf.build_attacks
    monkeypatch.setattr(hf, "build_attacks", lambda *a, **k: built.append(a[0]) or real(*a, **k))
    trainer = _trainer(sst2, tmp_path, robust=_robust(eval_attacks=("embedding_pgd2", "embedding_pgd1")))
    assert built == [("embedding_pgd2", "embedding_pgd1")]
    attacks = trainer.robust.eval_attacks
    assert list(attacks) == ["embedding_pgd2", "embedding_pgd1"]
    assert [a.steps for a in attacks.values()] == [2, 1]
    calls = {spec: 0 for spec in attacks}
    for spec, attack in attacks.items():
        perturb = attack.perturb

        def counted(*a, spec=spec, perturb=perturb, **k):
            calls[spec] += 1
            return perturb(*a, **k)

        attack.perturb = counted
    first = trainer.evaluate()
    after_first = dict(calls)
    second = trainer.evaluate()
    assert all(n > 0 for n in after_first.values())
    assert all(calls[s] == 2 * after_first[s] for s in calls)  # the same attack objects ran again
    assert len(built) == 1
    assert first["eval_robust_accuracy/embedding_pgd1"] == second["eval_robust_accuracy/embedding_pgd1"]
