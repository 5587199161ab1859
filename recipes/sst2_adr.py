"""Robust fine-tuning of a Hugging Face encoder on SST-2 (ADR by default).

    accelerate launch recipes/sst2_adr.py --model ../shared/models/all-MiniLM-L6-v2 \
        --data-dir ../shared/data/sst2/data

ADR with embedding-space PGD (per-token L2 ball of radius eps times each token embedding's norm,
padding and special tokens fixed), AdamW lr 5e-5, batch 32, max_length 64. ``--method`` switches to
standard fine-tuning, pgd_at, trades, adr_trades, or mtard (``--clean-teacher``/``--robust-teacher``).
Reports clean accuracy and accuracy under embedding PGD-20 and token substitution on the
validation split, and accuracy under a TextAttack recipe (DeepWordBug by default) on the same
validation sentences as the other attacks (at most ``--textattack-examples`` of them), for the model
and its EMA copy. ``--attack-step-size`` is relative to each token's radius here. The TextAttack
result is the report's ``textattack`` section (``ema/report.json`` for the EMA copy).
"""
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from robustkd.attacks.text import textattack_evaluate
from robustkd.callbacks import TrainerCallback
from robustkd.config import Recipe, parse
from robustkd.eval.robustness import resolve_attacks
from robustkd.recipe import build_task, main_guard, run_recipe


@dataclass
class TextArgs:
    _argument_group_name = "text"
    max_length: int = field(default=64, metadata={"help": "tokens per text; longer texts are truncated (counted)"})
    text_column: Optional[str] = field(default=None, metadata={"help": "text column (default: sentence/text)"})
    label_column: Optional[str] = field(default=None, metadata={"help": "label column (default: label)"})
    textattack_recipe: str = field(default="deepwordbug", metadata={
        "help": "TextAttack recipe for the final report ('none' to skip)"})
    textattack_examples: int = field(default=200, metadata={"help": "at most this many of the evaluation sentences: the seeded sample every other attack of the report uses (--max-eval-samples), or its first N"})
    textattack_query_budget: Optional[int] = field(default=None, metadata={"help": "TextAttack query budget"})
    textattack_on: Literal["both", "student"] = field(default="both", metadata={
        "help": "attack the model and its EMA copy, or the model only"})


RECIPE = Recipe(__doc__.split("\n\n")[0], defaults=dict(
    dataset="sst2", model="sentence-transformers/all-MiniLM-L6-v2", method="adr", epochs=3, batch_size=32, lr=5e-5,
    weight_decay=0.01, eps="0.1", attack_step_size="0.25", attack_steps=5, eval_attacks="embedding_pgd10",
    final_attacks="embedding_pgd20,token_substitution", output_dir="runs/sst2_adr", optimizer="adamw", norm="l2",
    lr_schedule="constant", eval_batch_size=64, robust_teacher="ema"), extra=(TextArgs,))


class TextAttackReport(TrainerCallback):
    """The report's ``textattack`` section: a TextAttack recipe on the report's evaluation points
    (``--max-eval-samples``, ``--seed``), capped at ``--textattack-examples`` (a prefix of that seeded
    sample; validation rows are sorted by label, so never the first rows of the split). The sample is
    drawn when the section is built, after the model (and so the tokenizer) is loaded."""

    def __init__(self, s: dict[str, Any]):
        self.s = s

    def on_report(self, trainer, which: str, model, attacks) -> dict[str, Any]:
        s = self.s
        if s["textattack_recipe"].lower() == "none" or (which == "ema" and s["textattack_on"] == "student"):
            return {}
        task = trainer.task
        data = task.dataset("test")
        cap = min(s["max_eval_samples"] or len(data), s["textattack_examples"] or len(data))
        idx = task.sample_indices("test", cap, s["seed"])
        idx = list(range(len(data))) if idx is None else idx
        texts, labels = [data.texts[i] for i in idx], [data.labels[i] for i in idx]
        result = textattack_evaluate(task, model, texts, labels, s["textattack_recipe"], seed=s["seed"],
                                     query_budget=s["textattack_query_budget"],
                                     batch_size=s["eval_batch_size"])
        sample = ("the evaluation points" if len(idx) == len(data) or len(idx) == s["max_eval_samples"]
                  else "a seeded prefix of the evaluation points")
        return {"textattack": {"recipe": s["textattack_recipe"], "sample": sample, **result}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse(RECIPE, argv)
    s = cfg.settings
    task = build_task(s, max_length=s["max_length"],
                      **{k: s[k] for k in ("text_column", "label_column") if s[k]})
    if s["textattack_recipe"].lower() != "none":  # an unknown or offline-unavailable recipe fails before training
        resolve_attacks([f"textattack:{s['textattack_recipe']}"], task)
    # --attack-step-size is relative to each token's radius: the text task's training attack takes relative steps
    return run_recipe(cfg, task=task, callbacks=[TextAttackReport(s)])


if __name__ == "__main__":
    main_guard(main)
