"""Evaluations with randomness are seeded from the run's seed and record it (TextAttack included), and
the sanity checks use the steps they need, whatever the budget curve uses."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from robustkd.cli import main as cli_main

SHARED = Path(os.environ.get("ROBUSTKD_SHARED", Path(__file__).resolve().parents[2] / "shared"))
MINILM = SHARED / "models" / "all-MiniLM-L6-v2"
SST2 = SHARED / "data" / "sst2" / "data" / "validation-00000-of-00001.parquet"


def _tiny_run(tmp_path, cifar_task):
    from robustkd.checkpoint import save_model_dir

    torch.manual_seed(0)
    model = cifar_task.build_model("small_cnn", width=4)
    run = tmp_path / "run"
    save_model_dir(run, model, model, {"task": "cifar10", "model": "small_cnn", "model_kwargs": {"width": 4},
                                      "num_classes": 10, "method": "standard", "data_dir": cifar_task.data_dir})
    return run


def test_large_budget_check_uses_its_own_steps_and_the_report_records_the_points(cifar_task, tmp_path):
    """Item 9: with --curve-steps 2 the large_budget check still runs PGD-10; the report records how its
    points were chosen (a seeded sample here)."""
    from robustkd.eval.sanity import LARGE_BUDGET_STEPS

    run = _tiny_run(tmp_path, cifar_task)
    cli_main(["eval", "--checkpoint", str(run), "--attacks", "pgd:steps=1", "--max-eval-samples", "4", "--batch-size",
              "4", "--curve-factors", "0,1", "--curve-steps", "2", "--seed", "3", "--output-dir", str(tmp_path / "ev"),
              "--no-progress"])
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["curve"]["attack"]["steps"] == 2
    assert report["curve"]["large_budget"]["steps"] == LARGE_BUDGET_STEPS == 10
    check = next(c for c in report["sanity"]["checks"] if c["name"] == "large_budget")
    assert check["values"]["steps"] == 10 and "PGD-10" in check["detail"]
    assert report["points"] == {"split": "test", "selection": "seeded_sample", "num_examples": 4,
                                "split_size": len(cifar_task.dataset("test")), "seed": 3}


@pytest.mark.textattack
def test_textattack_evaluate_is_seeded_as_textattacks_own_attacker():
    """Item 8: textattack_evaluate(seed=S) gives TextAttack's Attacker(AttackArgs(random_seed=S)) results on
    the same model and sentences, whatever the random state before the call, and records S."""
    import random

    import pandas as pd
    import textattack
    from robustkd_tasks.text import TextClassification
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from robustkd.attacks.text import TEXTATTACK_RECIPES, TextAttackAdapter, textattack_evaluate

    tok = AutoTokenizer.from_pretrained(str(MINILM))
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32,
                                                     max_position_embeddings=64, num_labels=2,
                                                     initializer_range=1.0)).eval()
    task = TextClassification.for_model(model, tok, max_length=48)
    rows = pd.read_parquet(SST2).sample(n=6, random_state=0)
    texts, labels = list(rows["sentence"]), [int(y) for y in rows["label"]]

    random.seed(123)
    torch.manual_seed(123)
    ours = textattack_evaluate(task, model, texts, labels, "deepwordbug", seed=7, keep_examples=10)
    random.seed(999)
    again = textattack_evaluate(task, model, texts, labels, "deepwordbug", seed=7, keep_examples=10)
    assert ours == again and ours["seed"] == 7

    adapter = TextAttackAdapter(task, "deepwordbug")
    attack = getattr(textattack.attack_recipes, TEXTATTACK_RECIPES["deepwordbug"][0]).build(
        adapter._build(model).goal_function.model)
    dataset = textattack.datasets.Dataset(list(zip(texts, labels)))
    args = textattack.AttackArgs(num_examples=len(texts), random_seed=7, silent=True, disable_stdout=True)
    results = textattack.Attacker(attack, dataset, args).attack_dataset()
    theirs = [r.perturbed_result.attacked_text.text for r in results
              if isinstance(r, textattack.attack_results.SuccessfulAttackResult)]
    assert theirs and [e["perturbed_text"] for e in ours["successful_examples"]] == theirs
    standing = sum(isinstance(r, (textattack.attack_results.FailedAttackResult,
                                  textattack.attack_results.MaximizedAttackResult)) for r in results)
    assert ours["accuracy_under_attack"] == standing / len(texts)
