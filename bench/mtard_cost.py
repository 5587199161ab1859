"""Cost of one MTARD training step in robustkd against a bare loop doing the reference's work.

The bare side is a plain PyTorch step written from the reading of the reference training loop
(B-MTARD, ``resnet18_mtard_cifar10.py`` + ``mtard_loss.mtard_inner_loss_ce``), per step:

* PGD-10 on the student in eval mode, start ``x + 0.001 * N(0, 1)``, mean cross-entropy, step
  2/255, projection onto the 8/255 box and [0, 1];
* student in train mode on ``x_adv`` and on ``x``; robust teacher on ``x_adv``, clean teacher on
  ``x`` (no gradient);
* the reference KL ``mean(p * (log(p + 1e-5) - log_softmax(s)))`` for both teachers with their
  temperatures, the entropy statistic ``mean(p * log(p + 1e-5))``, the temperature sign step and
  the Normalization Loss Balance from host floats (``.item()``, as the reference);
* ``w_adv * L_adv + w_nat * L_nat`` backward and an SGD step (momentum 0.9, weight decay 2e-4).

robustkd's side is ``Trainer.train_step`` with ``MTARD(kl_scale="reference")`` and the same PGD.
Extra work robustkd does per step (and why): the teachers' Shannon entropies at their
temperatures (logged as ``mtard_entropy_*``), a 7-value statistics vector summed over processes
(identical temperatures and weights on every rank; a no-op in one process), the balance rules as
tensor operations on the device (no host sync), Accelerate's ``accumulate``/``backward`` wrappers.

Rounds are interleaved in one process (alternating which side goes first) and the result is the
median of the per-round time ratios, so drift in machine load cancels out. Prints one JSON object.

    python bench/mtard_cost.py                          # ResNet-18 everywhere, batch 32, 2 threads
    python bench/mtard_cost.py --model small_cnn --rounds 5
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F


def reference_kl(student_logits, probs):
    """The reference's KL term: elementwise ``p (log(p + 1e-5) - log q)``, averaged over batch and classes."""
    return (probs * (torch.log(probs + 1e-5) - F.log_softmax(student_logits, dim=1))).mean()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18", help="student and teacher architecture (resnet18, small_cnn, ...)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=1, help="steps per side per round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cpu", action="store_true", help="force CPU even when a GPU is present")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from robustkd import create_task
    from robustkd.attacks.pgd import PGD
    from robustkd.distill.mtard import MTARD
    from robustkd.teachers import FrozenTeacher
    from robustkd.trainer import TrainConfig, Trainer

    n = args.batch_size
    task = create_task("synthetic", n_train=n, n_test=n)
    torch.manual_seed(0)
    student = task.build_model(args.model)
    clean, robust = task.build_model(args.model).eval(), task.build_model(args.model).eval()
    bare_student = copy.deepcopy(student)
    bare_clean, bare_robust = copy.deepcopy(clean), copy.deepcopy(robust)

    eps, alpha, steps = 8 / 255, 2 / 255, 10
    attack = PGD(task, task.threat_model(eps=eps), steps=steps, step_size=alpha, random_start="normal",
                 init_std=0.001, loss="ce")
    method = MTARD(task, attack, clean_teacher=FrozenTeacher(clean, "clean"), robust_teacher=FrozenTeacher(robust, "robust"),
                   kl_scale="reference", entropy_balance="reference", loss_balance=True)
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(epochs=1, batch_size=n, lr=0.1, weight_decay=2e-4, eval_attacks=[], eval_every=0,
                          max_train_samples=n, output_dir=out, progress=False, cpu=args.cpu)
        trainer = Trainer(task, student, method, cfg)
        device = trainer.accelerator.device
        batch = {k: v.to(device) for k, v in next(iter(trainer.train_loader)).items()}
        x, y = batch["inputs"], batch["labels"]
        for m in (bare_student, bare_clean, bare_robust):
            m.to(device)
        bare_clean.requires_grad_(False)
        bare_robust.requires_grad_(False)
        opt = torch.optim.SGD(bare_student.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
        bare: dict[str, Any] = {"t_adv": 1.0, "t_nat": 1.0, "w_adv": 0.5, "w_nat": 0.5, "l0": None}

        def bare_step() -> None:
            s = bare_student
            s.eval()  # the reference attacks the student in eval mode
            x_adv = x + 0.001 * torch.randn_like(x)
            for _ in range(steps):
                x_adv.requires_grad_(True)
                (grad,) = torch.autograd.grad(F.cross_entropy(s(x_adv), y), x_adv)
                x_adv = x_adv.detach() + alpha * grad.sign()
                x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
            s.train()
            opt.zero_grad()
            s_adv = s(x_adv)
            s_nat = s(x)
            with torch.no_grad():
                p_adv = F.softmax(bare_robust(x_adv) / bare["t_adv"], dim=1)
                p_nat = F.softmax(bare_clean(x) / bare["t_nat"], dim=1)
            l_adv, l_nat = reference_kl(s_adv, p_adv), reference_kl(s_nat, p_nat)
            e_adv = (p_adv * torch.log(p_adv + 1e-5)).mean()
            e_nat = (p_nat * torch.log(p_nat + 1e-5)).mean()
            # temperatures: a sign step on the entropy ratio, clamped to [1, 10] (host floats)
            bare["t_adv"] = min(max(bare["t_adv"] - 0.001 * torch.sign(e_adv / e_nat - 1).item(), 1.0), 10.0)
            bare["t_nat"] = min(max(bare["t_nat"] - 0.001 * torch.sign(e_nat / e_adv - 1).item(), 1.0), 10.0)
            la, ln = l_adv.item(), l_nat.item()
            if bare["l0"] is None:
                bare["l0"] = (la, ln)
            ra, rn = la / bare["l0"][0], ln / bare["l0"][1]
            wa = max(bare["w_adv"] - 0.025 * (bare["w_adv"] - ra / (ra + rn)), 0.0)
            wn = max(bare["w_nat"] - 0.025 * (bare["w_nat"] - rn / (ra + rn)), 0.0)
            bare["w_adv"], bare["w_nat"] = wa / (wa + wn), wn / (wa + wn)
            (bare["w_adv"] * l_adv + bare["w_nat"] * l_nat).backward()
            opt.step()

        def ours_step() -> None:
            trainer.model.train()
            trainer.train_step(batch)

        def timed(fn) -> tuple[float, float]:
            """(wall seconds, process CPU seconds) per step; CPU time is far less sensitive to other
            processes competing for the cores, so both are reported."""
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return (time.perf_counter() - wall) / args.steps, (time.process_time() - cpu) / args.steps

        ours_step()  # warm-up
        bare_step()
        ratios, cpu_ratios, ours_t, bare_t = [], [], [], []
        for r in range(args.rounds):
            if r % 2 == 0:
                a, b = timed(ours_step), timed(bare_step)
            else:
                b, a = timed(bare_step), timed(ours_step)
            ours_t.append(a[0])
            bare_t.append(b[0])
            ratios.append(a[0] / b[0])
            cpu_ratios.append(a[1] / b[1])
    print(json.dumps({
        "ratio_mtard": statistics.median(ratios), "ratio_mtard_cpu": statistics.median(cpu_ratios), "target": 1.0,
        "load_average_1min": os.getloadavg()[0],
        "seconds_per_step_robustkd": statistics.median(ours_t), "seconds_per_step_bare": statistics.median(bare_t),
        "ratios": [round(v, 4) for v in ratios], "cpu_ratios": [round(v, 4) for v in cpu_ratios],
        "model": args.model, "batch_size": n, "threads": args.threads,
        "rounds": args.rounds, "steps_per_round": args.steps, "device": str(device), "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
