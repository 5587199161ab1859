"""Images per second and peak GPU memory of PGD-AT, ADR and MTARD training, with and without the speed modes.

    python bench/gpu_throughput.py                                  # ResNet-18, batch 128 and 512, PGD-10
    python bench/gpu_throughput.py --reference ../ref/ADR           # + the reference ADR code's own step
    python bench/gpu_throughput.py --methods adr --batch-sizes 128 --steps 20

Needs a CUDA GPU (on a CPU it stops at once with exit status 2: the CPU figures come from
``bench/step_cost.py``, ``bench/mtard_cost.py`` and ``bench/speed_modes.py``). Data are
CIFAR-shaped synthetic images (3x32x32, 10 classes), so the loader never limits the figure.
For each method and batch size it runs ``Trainer.train_step`` in two configurations:

* ``plain``: float32, no speed mode (what a run without flags does);
* ``fast``: ``--mixed-precision bf16`` (autocast over the attack, the teachers and the update),
  ``--compile``, ``--channels-last`` and ``--tf32``;

and, with ``--reference PATH`` (a yuyuwu5/ADR checkout, run from there, never copied), the
reference ADR training step (``AdvTrainer._train_one_epoch`` on one batch) on the same GPU and
batch. After ``--warmup`` steps (compilation included there) it times ``--steps`` steps between
two ``torch.cuda.synchronize()`` calls and reports images/s (batch x steps / seconds, each step
being PGD-10 plus the update) and ``torch.cuda.max_memory_allocated``. Prints one JSON object;
``--output FILE`` also writes it.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--methods", default="pgd_at,adr,mtard")
    p.add_argument("--batch-sizes", default="128,512")
    p.add_argument("--pgd-steps", type=int, default=10)
    p.add_argument("--steps", type=int, default=20, help="timed training steps per configuration")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--reference", default=None, metavar="PATH", help="a yuyuwu5/ADR checkout: also time its ADR step")
    p.add_argument("--output", default=None, help="also write the JSON here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("error: bench/gpu_throughput.py measures GPU throughput and needs a CUDA device, but none is visible "
              "(torch.cuda.is_available() is False); on a CPU use bench/step_cost.py, bench/mtard_cost.py and "
              "bench/speed_modes.py", file=sys.stderr)
        sys.exit(2)

    from accelerate.state import AcceleratorState

    from robustkd import TrainConfig, Trainer, create_method, create_task
    from robustkd.attacks.pgd import PGD
    from robustkd.distill.mtard import MTARD
    from robustkd.teachers import FrozenTeacher

    device = torch.device("cuda")
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    results: dict = {"device": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0)),
                     "torch": torch.__version__, "model": args.model, "pgd_steps": args.pgd_steps,
                     "timed_steps": args.steps, "runs": []}
    modes = {"plain": {}, "fast": {"mixed_precision": "bf16", "compile": True, "channels_last": True, "tf32": True}}

    def measure(step, batch_size: int) -> dict:
        for _ in range(args.warmup):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        return {"images_per_second": batch_size * args.steps / seconds, "seconds_per_step": seconds / args.steps,
                "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}

    for n in sizes:
        task = create_task("synthetic", n_train=n, n_test=n)
        for method_name in methods:
            for mode, flags in modes.items():
                AcceleratorState._reset_state()
                torch._dynamo.reset()
                torch.manual_seed(0)
                attack = PGD(task, steps=args.pgd_steps, step_size=2 / 255,
                             random_start="normal" if method_name == "mtard" else "uniform")
                if method_name == "mtard":
                    teachers = {"clean_teacher": FrozenTeacher(task.build_model(args.model).eval(), "clean"),
                                "robust_teacher": FrozenTeacher(task.build_model(args.model).eval(), "robust")}
                    method = MTARD(task, attack, **teachers)
                else:
                    method = create_method(method_name, task, attack)
                with tempfile.TemporaryDirectory() as out:
                    cfg = TrainConfig(batch_size=n, max_train_samples=n, eval_attacks=[], eval_every=0,
                                      output_dir=out, progress=False, **flags)
                    trainer = Trainer(task, task.build_model(args.model), method, cfg)
                    batch = {k: v.to(device) for k, v in next(iter(trainer.train_loader)).items()}
                    row = measure(lambda: trainer.train_step(batch), n)
                row.update({"method": method_name, "batch_size": n, "mode": mode, "flags": flags})
                results["runs"].append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                del trainer, method
                torch.cuda.empty_cache()
        if args.reference and "adr" in methods:
            sys.path.insert(0, str(BENCH))
            from step_cost import load_reference, reference_step

            ref = load_reference(args.reference)
            torch.manual_seed(0)
            model = ref[2].create_model("resnet18", "cifar10").to(device)
            x = torch.rand(n, 3, 32, 32, device=device)
            y = torch.randint(0, 10, (n,), device=device)
            step = reference_step(ref, model, x, y, args.pgd_steps, device=device)
            row = measure(step, n)
            row.update({"method": "reference_adr", "batch_size": n, "mode": "reference", "flags": {}})
            results["runs"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    for n in sizes:  # the goal: robustkd ADR with the speed modes at >= 2x the reference's images/s
        by = {(r["method"], r["mode"]): r["images_per_second"] for r in results["runs"] if r["batch_size"] == n}
        if ("adr", "fast") in by and ("reference_adr", "reference") in by:
            results.setdefault("adr_fast_vs_reference", {})[str(n)] = by[("adr", "fast")] / by[("reference_adr", "reference")]
    text = json.dumps(results, indent=1)
    print(text)
    if args.output:
        Path(args.output).write_text(text)


if __name__ == "__main__":
    main()
