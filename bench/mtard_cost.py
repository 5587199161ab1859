"""Cost of one MTARD training step in robustkd against a bare PyTorch loop doing the same work.

Both sides run, per step: PGD-10 on the student (eval mode, start x + 0.001 * N(0, 1)), the
robust teacher on the adversarial batch and the clean teacher on the clean batch, two student
passes (adversarial and clean) with one backward, the entropy and loss-balance updates
(reference mode), and an SGD step. robustkd's side is ``Trainer.train_step`` (Accelerate,
progress bookkeeping, the method contract); the bare side is a hand-written loop. Rounds are
interleaved in one process (alternating which side goes first) and the result is the median
of the per-round time ratios, so drift in machine load cancels out. Prints one JSON object.

    python bench/mtard_cost.py                      # small_cnn, batch 32, 2 threads
    python bench/mtard_cost.py --model resnet18
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="small_cnn", help="student and teacher architecture (small_cnn, resnet18, ...)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--steps", type=int, default=2, help="steps per side per round")
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
    method = MTARD(task, attack, clean_teacher=FrozenTeacher(clean, "clean"), robust_teacher=FrozenTeacher(robust, "robust"))
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
        bare = {"t_adv": 1.0, "t_nat": 1.0, "w_adv": 0.5, "w_nat": 0.5, "l0": None}

        def bare_step() -> None:
            s = bare_student
            s.eval()
            delta = (0.001 * torch.randn_like(x)).clamp(-eps, eps)
            delta = (x + delta).clamp(0, 1) - x
            for _ in range(steps):
                delta.requires_grad_(True)
                loss = F.cross_entropy(s(x + delta), y, reduction="none").sum()
                (grad,) = torch.autograd.grad(loss, delta)
                delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
                delta = (x + delta).clamp(0, 1) - x
            s.train()
            x_adv = x + delta
            with torch.no_grad():
                p_adv = F.softmax(bare_robust(x_adv) / bare["t_adv"], dim=1)
                p_nat = F.softmax(bare_clean(x) / bare["t_nat"], dim=1)
                e_adv = (p_adv * torch.log(p_adv + 1e-5)).mean().item()
                e_nat = (p_nat * torch.log(p_nat + 1e-5)).mean().item()
            l_adv = F.kl_div(F.log_softmax(s(x_adv), dim=1), p_adv, reduction="batchmean")
            l_nat = F.kl_div(F.log_softmax(s(x), dim=1), p_nat, reduction="batchmean")
            la, ln = l_adv.item(), l_nat.item()
            if bare["l0"] is None:
                bare["l0"] = (la, ln)
            ra, rn = la / bare["l0"][0], ln / bare["l0"][1]
            wa = max(bare["w_adv"] - 0.025 * (bare["w_adv"] - ra / (ra + rn)), 0.0)
            wn = max(bare["w_nat"] - 0.025 * (bare["w_nat"] - rn / (ra + rn)), 0.0)
            bare["w_adv"], bare["w_nat"] = wa / (wa + wn), wn / (wa + wn)
            loss = bare["w_adv"] * l_adv + bare["w_nat"] * l_nat
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sign = (e_nat > e_adv) - (e_nat < e_adv)
            bare["t_adv"] = min(max(bare["t_adv"] - 0.001 * sign, 1.0), 10.0)
            bare["t_nat"] = min(max(bare["t_nat"] + 0.001 * sign, 1.0), 10.0)

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

        ours_step(), bare_step()  # warm-up
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
        "ratio_mtard": statistics.median(ratios), "ratio_mtard_cpu": statistics.median(cpu_ratios), "target": 1.05,
        "seconds_per_step_robustkd": statistics.median(ours_t), "seconds_per_step_bare": statistics.median(bare_t),
        "ratios": [round(v, 4) for v in ratios], "cpu_ratios": [round(v, 4) for v in cpu_ratios],
        "model": args.model, "batch_size": n, "threads": args.threads,
        "rounds": args.rounds, "steps_per_round": args.steps, "device": str(device), "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
