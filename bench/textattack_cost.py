"""Seconds per attacked sentence: a TextAttack recipe through robustkd against TextAttack's own ``Attacker``.

    python bench/textattack_cost.py                       # DeepWordBug, MiniLM, 6 SST-2 sentences, 2 rounds
    python bench/textattack_cost.py --recipe pruthi --sentences 4

Both sides attack the same model (the MiniLM encoder in ../shared/models with a seeded 2-class
head) on the same validation sentences, labelled with the model's own clean predictions so that
every sentence is attacked (none skipped). robustkd's side is ``TextAttackAdapter.attack_texts``
(its model wrapper: dynamic padding, ``--eval-batch-size`` texts per query); TextAttack's side is
``textattack.Attacker`` with ``HuggingFaceModelWrapper`` (padding to the tokenizer's maximum length).
Rounds alternate which side goes first, in one process; prints one JSON object with per-sentence
times, their ratio (median over rounds), queries and whether both sides reached the same verdicts.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ROBUSTKD_SHARED", REPO.parent / "shared"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="deepwordbug")
    p.add_argument("--model", default=str(SHARED / "models" / "all-MiniLM-L6-v2"))
    p.add_argument("--data-dir", default=str(SHARED / "data" / "sst2" / "data"))
    p.add_argument("--sentences", type=int, default=6)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32, help="robustkd: texts per model query")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import textattack
    from robustkd_tasks.text import TextClassification
    from textattack.attack_recipes import DeepWordBugGao2018  # noqa: F401 - fails early without TextAttack
    from textattack.models.wrappers import HuggingFaceModelWrapper

    from robustkd import create_task
    from robustkd.attacks.text import TEXTATTACK_RECIPES, TextAttackAdapter

    task = create_task("sst2", data_dir=args.data_dir, max_length=64)
    assert isinstance(task, TextClassification)  # the built-in text task: texts, encode(), tokenizer
    torch.manual_seed(0)
    model = task.build_model(args.model).eval()
    data = task.dataset("test")
    idx = task.sample_indices("test", args.sentences, seed=0) or list(range(args.sentences))
    texts = [data.texts[i] for i in idx]
    with torch.no_grad():
        labels = task.logits(model, task.encode(texts)).argmax(1).tolist()  # every sentence is attacked

    adapter = TextAttackAdapter(task, args.recipe, batch_size=args.batch_size)
    recipe_cls = getattr(textattack.attack_recipes, TEXTATTACK_RECIPES[adapter.recipe][0])

    def ours() -> list[dict]:
        adapter.reset()
        return adapter.attack_texts(model, texts, labels)

    def theirs() -> list:
        attack = recipe_cls.build(HuggingFaceModelWrapper(model, task.tokenizer))
        attack_args = textattack.AttackArgs(num_examples=len(texts), silent=True, disable_stdout=True, random_seed=0)
        dataset = textattack.datasets.Dataset(list(zip(texts, labels)))
        return textattack.Attacker(attack, dataset, attack_args).attack_dataset()

    def timed(fn):
        start = time.perf_counter()
        out = fn()
        return (time.perf_counter() - start) / len(texts), out

    rows = []
    for r in range(args.rounds):
        if r % 2 == 0:
            (t_ours, rec), (t_theirs, res) = timed(ours), timed(theirs)
        else:
            (t_theirs, res), (t_ours, rec) = timed(theirs), timed(ours)
        rows.append((t_ours, t_theirs))
        print(f"round {r}: robustkd {t_ours:.2f}s/sentence, TextAttack Attacker {t_theirs:.2f}s/sentence", flush=True)
    names = {"SuccessfulAttackResult": "success", "FailedAttackResult": "failed", "SkippedAttackResult": "skipped",
             "MaximizedAttackResult": "maximized"}
    their_status = [names.get(type(x).__name__, type(x).__name__) for x in res]
    our_status = [x["status"] for x in rec]
    print(json.dumps({
        "recipe": adapter.recipe, "model": Path(args.model).name, "sentences": len(texts), "rounds": len(rows),
        "seconds_per_sentence": {"robustkd": statistics.median(r[0] for r in rows),
                                 "textattack_attacker": statistics.median(r[1] for r in rows)},
        "ratio": statistics.median(r[0] / r[1] for r in rows),
        "queries": {"robustkd": [x["num_queries"] for x in rec],
                    "textattack_attacker": [x.perturbed_result.num_queries for x in res]},
        "same_verdicts": our_status == their_status, "verdicts": {"robustkd": our_status, "textattack": their_status},
        "robustkd_batch_size": args.batch_size, "threads": args.threads, "load_average_1min": os.getloadavg()[0],
    }, indent=1))


if __name__ == "__main__":
    main()
