"""Text path: task, attacks, teachers, ADR/MTARD through the task-agnostic code, RobustTrainer, TextAttack.

Everything runs on a tiny randomly initialised BERT built from a config and a small local
vocabulary written to tmp_path, with a tiny synthetic sentiment data set in the SST-2 layout.
"""
from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pandas as pd
import pytest
import torch

from robustkd import TASKS, create_attack, create_task
from robustkd.attacks.text import ResourceMissingError, textattack_evaluate
from robustkd.teachers import EMATeacher, FrozenTeacher

WORDS = ("the a movie film good bad great awful fun boring plot acting is was not very and but it this "
         "story fine poor nice dull").split()


def _sentences(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        y = i % 2
        words = rng.choices(WORDS[:6] + WORDS[10:20], k=rng.randint(3, 10)) + (["good", "great"] if y else ["bad", "awful"])
        rng.shuffle(words)
        rows.append({"idx": i, "sentence": " ".join(words), "label": y})
    return rows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    root = tmp_path_factory.mktemp("tiny_text")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "##s", "##ing", "##ly"]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(str(root / "vocab.txt"))
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2)
    torch.manual_seed(0)
    model_dir = root / "model"
    BertForSequenceClassification(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = root / "data"
    data.mkdir()
    pd.DataFrame(_sentences(48, 0)).to_parquet(data / "train-00000-of-00001.parquet")
    pd.DataFrame(_sentences(16, 1)).to_parquet(data / "validation-00000-of-00001.parquet")
    return {"root": root, "model_dir": str(model_dir), "data_dir": str(data), "vocab": vocab, "config": cfg}


@pytest.fixture()
def task_model(tiny):
    task = create_task("sst2", data_dir=tiny["data_dir"], max_length=32)
    model = task.build_model(tiny["model_dir"]).eval()
    return task, model


def _batch(task, n: int = 8):
    return next(iter(task.dataloader("test", n, shuffle=False)))


def test_registered_and_batches_are_dynamically_padded(task_model):
    task, model = task_model
    assert "sst2" in TASKS.names() and "text_classification" in TASKS.names()
    batch = _batch(task)
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape[1] == int(lengths.max())  # padded to the longest, not to max_length
    assert (batch["input_ids"][:, 0] == task.tokenizer.cls_token_id).all()
    task.validate_batch(batch)
    task.check_model(model, batch)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_embedding_pgd_stays_in_ball_and_off_padding_and_specials(task_model, norm):
    task, model = task_model
    batch = _batch(task)
    attack = create_attack("embedding_pgd", task, eps=0.2, norm=norm, steps=5)
    assert attack.threat.per_token and attack.threat.relative and attack.threat.domain is None
    adv = attack(model, batch)
    delta = adv.delta
    mask = task.perturbation_mask(batch)
    special = task.special_mask(batch["input_ids"]) | (batch["attention_mask"] == 0)
    assert torch.equal(mask, ~special)
    assert delta[special].abs().max() == 0  # padding, [CLS] and [SEP] never move
    emb = task.embeddings(model, batch["input_ids"]).detach()
    radius = 0.2 * emb.norm(dim=-1)
    size = delta.norm(dim=-1) if norm == "l2" else delta.abs().amax(-1)
    assert (size <= radius + 1e-5).all()
    assert (size[mask] > 0).any()
    # the attack raises the loss
    ce = torch.nn.functional.cross_entropy
    with torch.no_grad():
        assert ce(task.logits(model, *adv), batch["labels"]) >= ce(task.logits(model, batch), batch["labels"])


def test_token_substitution_respects_budget_and_never_touches_specials(task_model):
    task, model = task_model
    batch = _batch(task)
    attack = create_attack("token_substitution", task, fraction=0.25, stop_on_success=False)
    adv = attack(model, batch)
    assert adv.delta is None
    new, old = adv.batch["input_ids"], batch["input_ids"]
    changed = new != old
    special = task.special_mask(old) | (batch["attention_mask"] == 0)
    assert not changed[special].any()
    assert changed.any()
    words = batch["word_ids"]
    for i in range(len(old)):
        n_words = len(set(words[i][words[i] >= 0].tolist()))
        changed_words = len(set(words[i][changed[i]].tolist()))
        assert changed_words <= max(1, int(0.25 * n_words))
        assert changed_words == int(adv.batch["words_changed"][i])
    substituted = set(new[changed].tolist())
    assert not substituted & set(task.tokenizer.all_special_ids)
    assert all(not task.tokenizer.convert_ids_to_tokens(t).startswith("##") for t in substituted)
    with torch.no_grad():  # it is usable as an evaluation attack
        task.logits(model, *adv)


def test_teachers_see_their_own_embeddings_plus_delta(task_model):
    task, student = task_model
    batch = _batch(task)
    delta = create_attack("embedding_pgd", task, steps=2)(student, batch).delta
    other = copy.deepcopy(student)
    with torch.no_grad():
        other.get_input_embeddings().weight.mul_(3.0).add_(0.5)
    ema = EMATeacher(student, decay=0.5)
    ema.update(other)  # EMA weights now differ from the student's
    for teacher in (ema, FrozenTeacher(other)):
        own = teacher.model.get_input_embeddings()(batch["input_ids"])
        with torch.no_grad():
            expected = teacher.model(inputs_embeds=own + delta, attention_mask=batch["attention_mask"],
                                     token_type_ids=batch["token_type_ids"]).logits
            via_student = teacher.model(inputs_embeds=student.get_input_embeddings()(batch["input_ids"]) + delta,
                                        attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"]).logits
        got = teacher.logits(task, batch, delta)
        assert torch.allclose(got, expected, atol=1e-5)
        assert not torch.allclose(got, via_student, atol=1e-3)


@pytest.mark.parametrize("method", ["adr", "mtard"])
def test_distillation_methods_run_on_text_unchanged(task_model, tmp_path, method):
    from robustkd import TrainConfig, Trainer
    from robustkd.distill import create_method

    task, model = task_model
    attack = create_attack("embedding_pgd", task, steps=2, random_start="normal" if method == "mtard" else "uniform")
    kwargs = {}
    if method == "mtard":
        kwargs = {"clean_teacher": FrozenTeacher(copy.deepcopy(model)), "robust_teacher": "ema"}
    m = create_method(method, task, attack, **kwargs)
    evals = ["embedding_pgd2", "token_substitution"] if method == "adr" else ["embedding_pgd2"]
    cfg = TrainConfig(epochs=1, batch_size=8, eval_batch_size=8, optimizer="adamw", lr=1e-3, weight_decay=0.0,
                      lr_schedule="constant", eval_attacks=evals, max_train_samples=16,
                      max_eval_samples=8, output_dir=str(tmp_path), cpu=True, progress=False,
                      ema_decay=0.9 if method == "mtard" else None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = Trainer(task, model.train(), m, cfg).fit()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    rec = history[-1]
    assert 0.0 <= rec["clean_accuracy"] <= 1.0
    assert set(rec["robust_accuracy"]) == set(evals)
    assert "ema_clean_accuracy" in rec and (tmp_path / "ema.safetensors").exists()


def _hf_dataset(task, split):

    raw = task.raw(split)
    return raw.map(lambda b: task.tokenizer(b["sentence"], truncation=True, max_length=32), batched=True)


def test_robust_trainer_trains_saves_resumes_with_ema_and_evaluates(tiny, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback, TrainingArguments

    from robustkd.hf import EMA_FILE, RobustConfig, RobustTrainer

    tok = AutoTokenizer.from_pretrained(tiny["model_dir"])
    task = create_task("sst2", data_dir=tiny["data_dir"], tokenizer=tok)
    train, val = _hf_dataset(task, "train"), _hf_dataset(task, "test")

    def make(out, max_steps):
        model = AutoModelForSequenceClassification.from_pretrained(tiny["model_dir"])
        args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=8, per_device_eval_batch_size=8,
                                 max_steps=max_steps, save_steps=2, logging_steps=1, learning_rate=1e-3,
                                 report_to=[], use_cpu=True, seed=0, disable_tqdm=True)  # safetensors: the default (4.x), the only format (5)
        return RobustTrainer(model=model, args=args, train_dataset=train, eval_dataset=val, processing_class=tok,
                             robust=RobustConfig(method="adr", attack="embedding_pgd", attack_steps=2, eps=0.1,
                                                 ema_decay=0.9, eval_attacks=("embedding_pgd3",)))

    out = tmp_path / "run"
    trainer = make(out, 2)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    assert any(not torch.equal(before[k], v.cpu()) for k, v in trainer.model.state_dict().items())
    ckpt = out / "checkpoint-2"
    assert (ckpt / EMA_FILE).exists() and (ckpt / "robustkd_state.pt").exists()
    saved_ema = load_file(str(ckpt / EMA_FILE))
    assert trainer.robust.ema.num_updates == 2
    assert any("robust/" in k for h in trainer.state.log_history for k in h)  # ADR's schedule is logged

    seen = {}

    class Spy(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            ema = resumed.robust.ema
            seen["num_updates"] = ema.num_updates
            seen["weights"] = {k: v.detach().clone() for k, v in ema.model.state_dict().items()}

    resumed = make(out, 3)
    resumed.add_callback(Spy())
    resumed.train(resume_from_checkpoint=True)
    assert seen["num_updates"] == 2
    for k, v in saved_ema.items():
        assert torch.equal(seen["weights"][k], v), k  # restored, not a fresh copy of the student
    assert resumed.state.global_step == 3 and resumed.robust.ema.num_updates == 3
    metrics = resumed.evaluate()
    assert "eval_loss" in metrics and 0.0 <= metrics["eval_robust_accuracy/embedding_pgd3"] <= 1.0
    assert "eval_ema_clean_accuracy" in metrics
    resumed.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "ema" / "config.json").exists()


@pytest.mark.textattack
def test_textattack_deepwordbug_runs_offline(task_model, tmp_path):
    task, model = task_model
    data = task.dataset("test")
    out = tmp_path / "ta.json"
    summary = textattack_evaluate(task, model, data.texts[:4], data.labels[:4], "deepwordbug", output=out)
    assert summary["num_examples"] == 4 and sum(summary["counts"].values()) == 4
    for key in ("accuracy_under_attack", "attack_success_rate", "avg_fraction_words_perturbed",
                "avg_queries_per_example", "successful_examples", "clean_accuracy"):
        assert key in summary
    assert summary["accuracy_under_attack"] <= summary["clean_accuracy"]
    assert json.loads(out.read_text())["recipe"] == "deepwordbug"
    # through the attack contract, as an evaluation attack
    attack = create_attack("textattack:deepwordbug", task)
    batch = _batch(task, 2)
    adv = attack(model, batch)
    assert adv.delta is None and len(attack.records) == 2


@pytest.mark.textattack
def test_textattack_recipe_needing_downloads_names_the_resource(task_model):
    task, _ = task_model
    with pytest.raises(ResourceMissingError, match="counter-fitted|Universal Sentence Encoder"):
        create_attack("textattack:textfooler", task)
    with pytest.raises(ValueError, match="known: .*deepwordbug"):
        create_attack("textattack:nosuchrecipe", task)


def test_bad_inputs_fail_up_front(tiny, tmp_path):
    from transformers import BertTokenizerFast

    with pytest.raises(ValueError, match=r"no text column 'review'.*\['idx', 'sentence', 'label'\]"):
        t = create_task("text_classification", data_dir=tiny["data_dir"], text_column="review")
        t.columns()
    task = create_task("text_classification", data_dir=tiny["data_dir"], num_classes=1,
                       tokenizer=tiny["model_dir"])
    with pytest.raises(ValueError, match=r"outside 0\.\.0"):
        task.dataset("train")
    rows = _sentences(6, 2)
    rows[3]["sentence"] = "   "
    bad = tmp_path / "bad"
    bad.mkdir()
    pd.DataFrame(rows).to_csv(bad / "train.csv", index=False)
    pd.DataFrame(rows).to_csv(bad / "test.csv", index=False)
    with pytest.raises(ValueError, match="empty"):
        create_task("text_classification", data_dir=str(bad), tokenizer=tiny["model_dir"]).dataset("train")
    assert len(create_task("text_classification", data_dir=str(bad), tokenizer=tiny["model_dir"],
                           drop_empty=True).dataset("train")) == 5
    with pytest.warns(UserWarning, match="truncated"):
        short = create_task("sst2", data_dir=tiny["data_dir"], tokenizer=tiny["model_dir"], max_length=6)
        short.dataset("train")
    assert short.truncated["train"] > 0
    assert max(len(e["input_ids"]) for e in short.dataset("train").encodings) == 6
    # a tokenizer with a bigger vocabulary than the model's embedding table
    big_vocab = tiny["vocab"] + [f"word{i}" for i in range(100)]
    (tmp_path / "big.txt").write_text("\n".join(big_vocab) + "\n")
    big = create_task("sst2", data_dir=tiny["data_dir"], tokenizer=BertTokenizerFast(str(tmp_path / "big.txt")))
    with pytest.raises(ValueError, match="does not match the model's vocabulary"):
        big.build_model(tiny["model_dir"])
    with pytest.raises(Exception, match="--data-dir"):
        create_task("sst2", data_dir=str(tmp_path / "missing")).raw("train")


@pytest.mark.textattack
def test_sst2_recipe_writes_report(tiny, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("sst2_adr", Path(__file__).resolve().parents[1] / "recipes" / "sst2_adr.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    out = tmp_path / "recipe"
    report = recipe.main(["--model", tiny["model_dir"], "--data-dir", tiny["data_dir"], "--epochs", "1",
                          "--batch-size", "8", "--max-train-samples", "16", "--attack-steps", "2",
                          "--eval-attacks", "embedding_pgd2", "--final-attacks", "embedding_pgd3,token_substitution",
                          "--textattack-examples", "3", "--output-dir", str(out), "--cpu", "--no-progress",
                          "--max-eval-samples", "8", "--curve-steps", "2"])
    saved = json.loads((out / "report.json").read_text())
    ema = json.loads((out / "ema" / "report.json").read_text())
    assert saved["task"]["name"] == "sst2" and saved["model"]["method"] == "adr"
    assert set(saved["metrics"]["adversarial"]) == {"embedding_pgd3", "token_substitution"}
    assert saved["textattack"]["num_examples"] == 3 and ema["textattack"]["recipe"] == "deepwordbug"
    assert 0.0 <= saved["textattack"]["accuracy_under_attack"] <= 1.0
    assert report["metrics"]["clean"]["accuracy"] == saved["metrics"]["clean"]["accuracy"]
    # --attack-step-size 0.25 (the recipe's default) is relative to each token's radius
    assert saved["method"]["attack"]["rel_step_size"] == 0.25 and saved["method"]["attack"]["step_size"] is None


def test_a_text_tasks_step_size_is_relative_as_its_own_training_attack_takes_it(task_model, cifar_task):
    """--attack-step-size on the text task is relative to each token's radius (its embedding_pgd's way), on
    images absolute: the rule build_method reads from the task, for every recipe and RobustTrainer."""
    from robustkd.config import build_method, steps_are_relative

    tiny_text_task, tiny_image_task = task_model[0], cifar_task

    assert steps_are_relative(tiny_text_task) and not steps_are_relative(tiny_image_task)
    settings = {"method": "pgd_at", "attack_steps": 2, "attack_step_size": "0.25", "eps": "0.1", "norm": "l2"}
    attack = build_method(settings, tiny_text_task).attack
    assert attack.rel_step_size == 0.25 and attack.step_size is None
    attack = build_method(settings, tiny_text_task, relative_step=False).attack  # RobustTrainer's step_size=
    assert attack.step_size == 0.25 and attack.rel_step_size is None
    attack = build_method({**settings, "eps": "8/255", "norm": "linf", "attack_step_size": "2/255"},
                          tiny_image_task).attack
    assert attack.step_size == 2 / 255 and attack.rel_step_size is None
