"""Seconds per training step with each speed mode against the same step without it, on this machine.

    python bench/speed_modes.py                      # small_cnn, ADR, batch 64, PGD-10, 2 threads
    python bench/speed_modes.py --model resnet18 --no-compile

Sides, each a ``Trainer`` on the same batch and model initialisation, measured interleaved in
one process (one step of every side per round, the order rotated each round; warm-up steps,
which include compilation, are not timed): ``baseline``; ``channels_last``; ``bf16`` (the step
under ``torch.autocast(bfloat16)``, which is what ``--mixed-precision bf16`` does to the attack,
the teachers and the update; Accelerate fixes one precision per process, so the bench applies the
autocast itself); ``compile`` (``TrainConfig(compile=True)``, inductor). Also the augmentation:
the former per-example crop loop against ``augment_images`` on a batch of 128 CIFAR images, and
one pass over a 1024-image loader with 0 and 2 workers. Ratios are medians of per-round ratios
(< 1: faster). On a CPU, channels_last, bf16 and TF32 are not expected to help: they are GPU modes.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ROBUSTKD_SHARED", REPO.parent / "shared"))


def per_example_crop(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """The previous augmentation: a Python loop over the images of the batch."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (n, 2))
    x = torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])
    mask = torch.rand(n) < 0.5
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(3), x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--method", default="adr")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="PGD steps")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-compile", action="store_true", help="skip the compile side (inductor compiles for minutes on a CPU)")
    p.add_argument("--data-dir", default=str(SHARED / "data" / "cifar10" / "plain_text"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from robustkd_tasks.image import augment_images

    from robustkd import TrainConfig, Trainer, create_method, create_task
    from robustkd.attacks.pgd import PGD

    task = create_task("cifar10", data_dir=args.data_dir, augment=False)
    batch = next(iter(task.dataloader("train", args.batch_size, seed=0)))
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def trainer(out: str, **modes) -> Trainer:
        torch.manual_seed(0)
        method = create_method(args.method, task, PGD(task, steps=args.steps, step_size=2 / 255))
        cfg = TrainConfig(batch_size=args.batch_size, max_train_samples=args.batch_size, max_eval_samples=8,
                          eval_attacks=[], eval_every=0, output_dir=out, progress=False, **modes)
        return Trainer(task, task.build_model(args.model), method, cfg)

    with tempfile.TemporaryDirectory() as tmp:
        sides: dict[str, tuple[Trainer, Callable[[], contextlib.AbstractContextManager[Any]]]] = {
            "baseline": (trainer(f"{tmp}/a"), contextlib.nullcontext),
            "channels_last": (trainer(f"{tmp}/b", channels_last=True), contextlib.nullcontext),
            "bf16": (trainer(f"{tmp}/c"), lambda: torch.autocast(device, dtype=torch.bfloat16))}
        if not args.no_compile:
            sides["compile"] = (trainer(f"{tmp}/d", compile=True), contextlib.nullcontext)
        b = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        warm = {}
        for name, (t, ctx) in sides.items():
            start = time.perf_counter()
            with ctx():
                t.train_step(b)
            warm[name] = time.perf_counter() - start
            print(f"warm-up {name}: {warm[name]:.1f}s", file=sys.stderr, flush=True)
        names = list(sides)
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                t, ctx = sides[name]
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                with ctx():
                    t.train_step(b)
                if device == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
            print("round " + " ".join(f"{n} {times[n][-1]:.2f}s" for n in names), file=sys.stderr, flush=True)

    # augmentation: the per-example loop against the batched version (interleaved)
    x = torch.rand(128, 3, 32, 32)
    loop_t, batched_t = [], []
    for _ in range(20):
        start = time.perf_counter()
        per_example_crop(x)
        loop_t.append(time.perf_counter() - start)
        start = time.perf_counter()
        augment_images(x)
        batched_t.append(time.perf_counter() - start)
    # loader workers: one pass over 1024 images
    loader_t: dict[int, list[float]] = {}
    for workers in (0, 2, 0, 2):
        loader = task.dataloader("train", 128, max_samples=1024, num_workers=workers)
        start = time.perf_counter()
        for _ in loader:
            pass
        loader_t.setdefault(workers, []).append(time.perf_counter() - start)

    med = statistics.median
    print(json.dumps({
        "model": args.model, "method": args.method, "batch_size": args.batch_size, "pgd_steps": args.steps,
        "device": device, "threads": args.threads, "rounds": args.rounds, "load_average_1min": os.getloadavg()[0],
        "seconds_per_step": {n: med(v) for n, v in times.items()},
        "ratio_vs_baseline": {n: med(a / c for a, c in zip(times[n], times["baseline"])) for n in names if n != "baseline"},
        "warmup_seconds": warm,
        "augmentation_seconds_per_batch_128": {"per_example_loop": med(loop_t), "batched": med(batched_t)},
        "loader_pass_1024_images_seconds": {f"workers_{w}": med(v) for w, v in loader_t.items()},
        "torch": torch.__version__,
    }, indent=1))


if __name__ == "__main__":
    main()
