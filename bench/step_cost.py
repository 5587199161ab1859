"""Seconds per training step: robustkd PGD-AT and ADR against a bare PyTorch PGD-AT loop (and the reference ADR step).

    python bench/step_cost.py                                 # CIFAR ResNet-18, batch 32, PGD-10, 2 threads
    python bench/step_cost.py --vs-reference ../ref/ADR       # + the reference ADR code's own step

``--vs-reference PATH`` imports the reference implementation (yuyuwu5/ADR: ``PATH/src``; it is run,
never copied: ``AdvTrainer._train_one_epoch`` on a one-batch loader, with its PGD attacker, its ADR
label rectifier, timm's ``ModelEmaV2`` and its step-indexed timm LR scheduler) and times it in the
same rounds. Every side then uses the reference's own ResNet-18 (with its normalisation inside).
The reference imports ``gin`` only for configuration: when gin-config is not installed a stand-in
whose ``configurable`` decorator returns the class unchanged is used.

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


def load_reference(path: str):
    """The reference's ``AdvTrainer``, ``ADR``, ``PGD`` and ResNet-18 factory, imported from ``path/src``."""
    import importlib
    import types

    src = Path(path).expanduser().resolve() / "src"
    if not (src / "advTrainer.py").exists():
        raise SystemExit(f"error: {src}/advTrainer.py not found: --vs-reference takes the path of a yuyuwu5/ADR checkout")
    try:
        import gin  # noqa: F401
    except ImportError:
        stub = types.ModuleType("gin")
        stub.__dict__["configurable"] = lambda obj=None, **_: obj if obj is not None else (lambda o: o)
        sys.modules["gin"] = stub
    sys.path.insert(0, str(src))
    trainer_mod = importlib.import_module("advTrainer")
    pgd_mod = importlib.import_module("util.pgd_attack")
    model_mod = importlib.import_module("model.create_model")
    return trainer_mod, pgd_mod, model_mod


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
    parser.add_argument("--vs-reference", nargs="?", const=str(REPO.parent / "ref" / "ADR"), default=None,
                        metavar="PATH", help="also time the reference ADR step (a yuyuwu5/ADR checkout; default "
                        "../ref/ADR); all sides then use the reference ResNet-18")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from robustkd import TrainConfig, Trainer, create_method, create_task
    from robustkd.attacks.pgd import PGD

    # augmentation is data loading: outside the timed step on every side (the batch is augmented once here)
    task = create_task("cifar10", data_dir=args.data_dir, augment=False)
    batch = create_task("cifar10", data_dir=args.data_dir).augment_batch(
        next(iter(task.dataloader("train", args.batch_size, seed=0))))
    x, y = batch["inputs"], batch["labels"]
    os.environ.setdefault("TQDM_DISABLE", "1")  # the reference's per-epoch progress bar (read at tqdm import)
    ref = load_reference(args.vs_reference) if args.vs_reference else None

    def make_model():
        if ref is None:
            return task.build_model(args.model)
        return ref[2].create_model("resnet18", "cifar10")

    def robustkd_trainer(method_name: str, out: str) -> Trainer:
        torch.manual_seed(0)
        method = create_method(method_name, task, PGD(task, steps=args.steps, step_size=2 / 255))
        cfg = TrainConfig(batch_size=args.batch_size, max_train_samples=args.batch_size, max_eval_samples=8,
                          eval_attacks=[], output_dir=out, progress=False, cpu=True)
        return Trainer(task, make_model(), method, cfg)

    with tempfile.TemporaryDirectory() as tmp:
        pgd_at = robustkd_trainer("pgd_at", f"{tmp}/pgd")
        adr = robustkd_trainer("adr", f"{tmp}/adr")
        torch.manual_seed(0)
        bare_model = make_model().train()
        bare_opt = torch.optim.SGD(bare_model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

        def bare():
            bare_pgd_at_step(bare_model, bare_opt, x, y, steps=args.steps)

        reference = None
        if ref is not None:
            reference = reference_step(ref, make_model(), x, y, args.steps)
        sides = [bare, lambda: pgd_at.train_step(batch), lambda: adr.train_step(batch)] + ([reference] if reference else [])
        for fn in sides:
            fn()  # warm-up
        rows = []
        for r in range(max(args.rounds, 1)):
            b1 = timed(bare)
            p = timed(lambda: pgd_at.train_step(batch))
            b2 = timed(bare)
            if reference is not None and r % 2:  # alternate which of the two ADR steps goes first
                ref_t = timed(reference)
                a = timed(lambda: adr.train_step(batch))
            else:
                a = timed(lambda: adr.train_step(batch))
                ref_t = timed(reference) if reference is not None else float("nan")
            rows.append((b1, p, b2, a, ref_t))
            print(f"round: bare {b1:.3f}s pgd_at {p:.3f}s bare {b2:.3f}s adr {a:.3f}s reference_adr {ref_t:.3f}s",
                  file=sys.stderr)

    med = statistics.median
    out = {
        "model": "reference resnet18" if ref else args.model, "batch_size": args.batch_size, "pgd_steps": args.steps,
        "threads": args.threads, "rounds": len(rows), "load_average_1min": os.getloadavg()[0],
        "seconds_per_step": {"bare_pgd_at": med([r[0] for r in rows] + [r[2] for r in rows]),
                             "robustkd_pgd_at": med([r[1] for r in rows]), "robustkd_adr": med([r[3] for r in rows])},
        "ratio_pgd_at": med([r[1] / r[0] for r in rows]),
        "ratio_adr": med([r[3] / r[2] for r in rows]),
        "targets": {"ratio_pgd_at": 1.03, "ratio_adr": 1.08},
    }
    if ref is not None:
        out["seconds_per_step"]["reference_adr"] = med([r[4] for r in rows])
        out["ratio_adr_vs_reference"] = med([r[3] / r[4] for r in rows])
        out["targets"]["ratio_adr_vs_reference"] = 1.0
        out["reference"] = args.vs_reference
    print(json.dumps(out, indent=1))


def reference_step(ref, model, x, y, steps, device=torch.device("cpu")):
    """One step of the reference's own training loop (``AdvTrainer._train_one_epoch`` on one batch):
    ADR labels from the EMA teacher, its PGD-10 in train mode, CE on the adversarial batch, SGD,
    its scheduler step, the EMA update and its torchmetrics bookkeeping."""
    from timm.scheduler import CosineLRScheduler
    from timm.utils import ModelEmaV2

    trainer_mod, pgd_mod, _ = ref
    trainer = trainer_mod.AdvTrainer(
        device=device, hparam={"n_class": 10}, adv_train_mode="PGD-AT", model_ema_decay=0.995,
        temperature_low=0.8, temperature_high=1.8, interpolation_low=0.7, interpolation_high=0.9,
        adv_attacker=pgd_mod.PGD(eps=8, alpha=2, steps=steps))
    trainer.model_ema = ModelEmaV2(model, decay=0.995)
    trainer.adr = trainer_mod.ADR(10, 200, 1000, 0.8, 1.8, 0.7, 0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    scheduler = CosineLRScheduler(optimizer, t_initial=200 * 1000, t_in_epochs=False)
    loader = [(x, y)]
    state = {"step": 0}

    def step():
        trainer._train_one_epoch(loader, model, optimizer, scheduler, state["step"])
        state["step"] += 1

    return step


if __name__ == "__main__":
    main()
