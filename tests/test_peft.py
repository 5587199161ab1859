"""Robust fine-tuning of a PEFT (LoRA) model with RobustTrainer: ADR's EMA teacher averages only the
trainable (adapter) weights, is saved with the adapters and restored from them."""
from __future__ import annotations

import os
from pathlib import Path

import peft  # the peft extra (part of dev): missing, the test fails, never skips
import torch

SHARED = Path(os.environ.get("ROBUSTKD_SHARED", Path(__file__).resolve().parents[2] / "shared"))
MINILM = SHARED / "models" / "all-MiniLM-L6-v2"


def _lora_model():
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(str(MINILM), num_labels=2)
    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
    return peft.get_peft_model(base, config)


def _trainer(out: Path, max_steps: int):
    from datasets import Dataset
    from transformers import AutoTokenizer, DataCollatorWithPadding, TrainingArguments

    from robustkd.hf import RobustConfig, RobustTrainer

    tok = AutoTokenizer.from_pretrained(str(MINILM))
    texts = ["a good film", "a bad film", "great acting", "awful plot", "fun and nice", "dull and poor",
             "very good", "very bad"]
    data = Dataset.from_dict({"text": texts, "label": [i % 2 for i in range(8)]})
    data = data.map(lambda b: tok(b["text"], truncation=True, max_length=12), batched=True, remove_columns=["text"])
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=max_steps, save_steps=2,
                             learning_rate=1e-2, report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    return RobustTrainer(model=_lora_model(), args=args, train_dataset=data, processing_class=tok,
                         data_collator=DataCollatorWithPadding(tok),
                         robust=RobustConfig(method="adr", eps=0.1, attack_steps=1, ema_decay=0.5, max_length=12))


def test_adr_on_lora_keeps_an_adapter_only_ema_saved_and_restored_with_the_adapters(tmp_path):
    from safetensors.torch import load_file

    from robustkd.hf import EMA_FILE, AdapterEMATeacher

    out = tmp_path / "run"
    trainer = _trainer(out, 2)
    trainer.train()
    model, ema = trainer.model, trainer.robust.ema
    assert isinstance(ema, AdapterEMATeacher) and ema.num_updates == 2
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(ema.tensors) == trainable
    assert all("lora_" in n or "modules_to_save" in n for n in ema.tensors)  # adapters and the new head only
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    assert ema.nbytes() < full / 50  # adapter memory, not a second model
    params = dict(model.named_parameters())
    assert any(not torch.equal(t, params[n]) for n, t in ema.tensors.items())  # an average, not the student
    # the teacher is the base with the EMA adapters, and the student's weights come back after it ran
    before = {n: p.detach().clone() for n, p in params.items() if p.requires_grad}
    batch = trainer.robust.task.encode(["a good film", "a bad film"])
    teacher = ema.logits(trainer.robust.task, batch)
    with torch.no_grad():
        student = trainer.robust.task.logits(model.eval(), batch)
    assert not torch.allclose(teacher, student)
    assert all(torch.equal(before[n], params[n]) for n in before)

    saved = load_file(str(out / "checkpoint-2" / EMA_FILE))
    assert set(saved) == trainable and all(torch.equal(saved[n], ema.tensors[n]) for n in saved)
    # resuming loads the adapters (Trainer) and their EMA (robustkd) from the checkpoint
    resumed = _trainer(out, 2)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.robust.ema.num_updates == 2
    assert all(torch.equal(resumed.robust.ema.tensors[n], saved[n]) for n in saved)
    # save_model: the adapters, and the EMA adapters as a PEFT folder that from_pretrained loads
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "ema" / "adapter_config.json").exists()
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(str(MINILM), num_labels=2)
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "final" / "ema")).eval()
    with torch.no_grad():
        assert torch.allclose(trainer.robust.task.logits(loaded, batch), teacher, atol=1e-5)
