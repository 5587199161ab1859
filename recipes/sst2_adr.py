"""Robust fine-tuning of a Hugging Face encoder on SST-2 (ADR by default).

    accelerate launch recipes/sst2_adr.py --model ../shared/models/all-MiniLM-L6-v2 \
        --data-dir ../shared/data/sst2/data

ADR with embedding-space PGD (per-token L2 ball of radius eps times each token embedding's norm,
padding and special tokens fixed), AdamW lr 5e-5, batch 32, max_length 64. ``--method`` switches to
standard fine-tuning, pgd_at, trades, adr_trades, or mtard (``--clean-teacher``/``--robust-teacher``).
Reports clean accuracy and accuracy under embedding PGD-20 and token substitution on the
validation split, and accuracy under a TextAttack recipe (DeepWordBug by default) on
``--textattack-examples`` randomly sampled validation sentences, for the model and its EMA copy.
``--attack-step-size`` is relative to each token's radius here.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from robustkd.attacks.pgd import PGD
from robustkd.attacks.text import textattack_evaluate
from robustkd.checkpoint import load_model
from robustkd.distill.methods import METHODS, Method
from robustkd.eval.robustness import resolve_attacks
from robustkd.recipe import build_task, common_parser, main_guard, run_recipe
from robustkd.task import Task
from robustkd.threat import eps_from_pixels


def parser() -> argparse.ArgumentParser:
    p = common_parser(__doc__.split("\n\n")[0], dataset="sst2", model="sentence-transformers/all-MiniLM-L6-v2",
                      method="adr", epochs=3, batch_size=32, lr=5e-5, weight_decay=0.01, eps="0.1",
                      attack_step_size="0.25", attack_steps=5, eval_attacks="embedding_pgd10",
                      final_attacks="embedding_pgd20,token_substitution", output_dir="runs/sst2_adr")
    p.set_defaults(optimizer="adamw", norm="l2", lr_schedule="constant", eval_batch_size=64)
    text = p.add_argument_group("text")
    text.add_argument("--max-length", type=int, default=64, help="tokens per text; longer texts are truncated (counted)")
    text.add_argument("--text-column", default=None, help="text column (default: sentence/text)")
    text.add_argument("--label-column", default=None, help="label column (default: label)")
    text.add_argument("--textattack-recipe", default="deepwordbug", help="TextAttack recipe for the final report "
                      "('none' to skip)")
    text.add_argument("--textattack-examples", type=int, default=200, help="validation sentences (random sample)")
    text.add_argument("--textattack-query-budget", type=int, default=None)
    text.add_argument("--textattack-on", default="both", choices=["both", "student"],
                      help="attack the model and its EMA copy, or the model only")
    text.add_argument("--clean-teacher", default=None, help="MTARD: clean teacher (recipe output dir or HF model dir)")
    text.add_argument("--robust-teacher", default="ema", help="MTARD: robust teacher, or 'ema'")
    return p


def build_text_method(args: argparse.Namespace, task: Task) -> Method:
    """The method with an embedding-PGD training attack (step size relative to each token's radius)."""
    trades_like = args.method in ("trades", "adr_trades")
    attack = None
    if args.method != "standard":
        threat = task.threat_model(eps=eps_from_pixels(args.eps), norm=args.norm)
        attack = PGD(task, threat, steps=args.attack_steps, rel_step_size=float(eps_from_pixels(args.attack_step_size)),
                     loss="kl" if trades_like else "ce",
                     random_start="normal" if (trades_like or args.method == "mtard") else "uniform")
    kwargs: dict[str, Any] = {}
    if trades_like:
        kwargs["beta"] = args.beta
    if args.method == "mtard":
        from robustkd.teachers import load_teacher

        if not args.clean_teacher:
            raise ValueError("--method mtard needs --clean-teacher (e.g. a --method standard run's --output-dir)")
        kwargs["clean_teacher"] = load_teacher(args.clean_teacher, task, name="clean")
        kwargs["robust_teacher"] = "ema" if args.robust_teacher == "ema" else load_teacher(args.robust_teacher, task, name="robust")
    return METHODS.get(args.method)(task, attack, **kwargs)


def textattack_report(args: argparse.Namespace, task: Task) -> dict[str, Any]:
    """TextAttack on a seeded random sample of the validation split, for the model and its EMA copy."""
    data = task.dataset("test")
    idx = list(range(len(data)))
    random.Random(args.seed).shuffle(idx)  # validation rows are sorted by label: sample, do not slice
    idx = idx[:args.textattack_examples]
    texts, labels = [data.texts[i] for i in idx], [data.labels[i] for i in idx]
    out: dict[str, Any] = {}
    for which in ("student", "ema"):
        if which == "ema" and (args.textattack_on == "student" or not (Path(args.output_dir) / "ema.safetensors").exists()):
            continue
        model = load_model(args.output_dir, task, which=which)
        out[which] = textattack_evaluate(task, model, texts, labels, args.textattack_recipe,
                                         query_budget=args.textattack_query_budget)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    task = build_task(args, max_length=args.max_length,
                      **{k: v for k, v in (("text_column", args.text_column), ("label_column", args.label_column)) if v})
    if args.textattack_recipe.lower() != "none":  # an unknown or offline-unavailable recipe fails before training
        resolve_attacks([f"textattack:{args.textattack_recipe}"], task)
    report = run_recipe(args, task=task, method=build_text_method(args, task))
    if args.textattack_recipe.lower() != "none":
        from accelerate import PartialState

        state = PartialState()
        if state.is_main_process:
            ta = textattack_report(args, task)
            spec = f"textattack:{args.textattack_recipe}"
            report["textattack"] = ta
            report.setdefault("robust_accuracy", {})[spec] = ta["student"]["accuracy_under_attack"]
            if "ema" in ta and "ema" in report:
                report["ema"].setdefault("robust_accuracy", {})[spec] = ta["ema"]["accuracy_under_attack"]
            report["attacks"][spec] = {"attack": "textattack", "recipe": args.textattack_recipe,
                                       "num_examples": ta["student"]["num_examples"], "sample": "seeded random"}
            out = Path(args.output_dir)
            (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
            (out / f"textattack_{args.textattack_recipe}.json").write_text(json.dumps(ta, indent=2))
            summary = {w: {k: v for k, v in s.items() if k != "successful_examples"} for w, s in ta.items()}
            print(json.dumps({spec: summary}, indent=1))
        state.wait_for_everyone()
    return report


if __name__ == "__main__":
    main_guard(main)
