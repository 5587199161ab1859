"""Seconds per training step: robustkd PGD-AT and ADR against a bare PyTorch PGD-AT loop.

    python bench/step_cost.py            # CIFAR ResNet-18, batch 32, PGD-10, 2 threads

Prints one JSON object. The three are measured interleaved in one process (bare, robustkd
PGD-AT, bare, robustkd ADR, ... per round) and each ratio is the median of the per-round
ratios, because this machine drifts by about +-10 % between runs. Targets: ratio_pgd_at <= 1.03,
ratio_adr <= 1.08 (ADR adds one teacher forward and an EMA update to eleven forward-backward passes).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ROBUSTKD_SHARED", REPO.parent / "shared"))


def bare_pgd_at_step(model, optimizer, x, y, eps=8 / 255, alpha=2 / 255, steps=10):
    """Madry et al.'s PGD-AT step written directly in PyTorch (attack in train mode, as ADR's reference)."""
    delta = (torch.rand_like(x) * 2 - 1) * eps
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
    loss = F.cross_entropy(model(x + delta), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="PGD steps")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (>= 5) after one warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default=str(SHARED / "data" / "cifar10" / "plain_text"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from robustkd import TrainConfig, Trainer, create_method, create_task
    from robustkd.attacks.pgd import PGD

    task = create_task("cifar10", data_dir=args.data_dir)
    batch = next(iter(task.dataloader("train", args.batch_size, seed=0)))
    x, y = batch["inputs"], batch["labels"]

    def robustkd_trainer(method_name: str, out: str) -> Trainer:
        torch.manual_seed(0)
        method = create_method(method_name, task, PGD(task, steps=args.steps, step_size=2 / 255))
        cfg = TrainConfig(batch_size=args.batch_size, max_train_samples=args.batch_size, max_eval_samples=8,
                          eval_attacks=[], output_dir=out, progress=False, cpu=True)
        return Trainer(task, task.build_model(args.model), method, cfg)

    with tempfile.TemporaryDirectory() as tmp:
        pgd_at = robustkd_trainer("pgd_at", f"{tmp}/pgd")
        adr = robustkd_trainer("adr", f"{tmp}/adr")
        torch.manual_seed(0)
        bare_model = task.build_model(args.model).train()
        bare_opt = torch.optim.SGD(bare_model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

        def bare():
            bare_pgd_at_step(bare_model, bare_opt, x, y, steps=args.steps)

        for fn in (bare, lambda: pgd_at.train_step(batch), lambda: adr.train_step(batch)):
            fn()  # warm-up
        rows = []
        for _ in range(max(args.rounds, 1)):
            b1 = timed(bare)
            p = timed(lambda: pgd_at.train_step(batch))
            b2 = timed(bare)
            a = timed(lambda: adr.train_step(batch))
            rows.append((b1, p, b2, a))
            print(f"round: bare {b1:.3f}s pgd_at {p:.3f}s bare {b2:.3f}s adr {a:.3f}s", file=sys.stderr)

    med = statistics.median
    print(json.dumps({
        "model": args.model, "batch_size": args.batch_size, "pgd_steps": args.steps, "threads": args.threads,
        "rounds": len(rows),
        "seconds_per_step": {"bare_pgd_at": med([r[0] for r in rows] + [r[2] for r in rows]),
                             "robustkd_pgd_at": med([r[1] for r in rows]), "robustkd_adr": med([r[3] for r in rows])},
        "ratio_pgd_at": med([r[1] / r[0] for r in rows]),
        "ratio_adr": med([r[3] / r[2] for r in rows]),
        "targets": {"ratio_pgd_at": 1.03, "ratio_adr": 1.08},
    }, indent=1))


if __name__ == "__main__":
    main()
