"""RobustTrainer on any Hugging Face classification model whose task is registered: text, image and audio.

Each test builds a tiny randomly initialised model from a config (BERT with the MiniLM tokenizer, ViT,
wav2vec2), trains it robustly for a few steps inside ``transformers.Trainer`` and evaluates it under
attack, through the same API a user calls. ``robustkd.hf`` itself knows no modality: the task comes
from the registry, by the model's ``main_input_name``.
"""
from __future__ import annotations

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
