"""Cost of one adversarial fine-tuning step relative to a plain fine-tuning step (text).

    python bench/text_step_cost.py --model ../shared/models/all-MiniLM-L6-v2 --data-dir ../shared/data/sst2/data

Times ``method.prepare`` + ``method.loss`` + backward + AdamW step on the same SST-2 batches for
standard fine-tuning, PGD-AT and ADR with embedding PGD (K steps), and PGD-AT with token
substitution; prints JSON with seconds per step and the ratio to the plain step.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="../shared/models/all-MiniLM-L6-v2")
    p.add_argument("--data-dir", default="../shared/data/sst2/data")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--attack-steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    from robustkd import EMATeacher, create_attack, create_task
    from robustkd.distill import Progress, create_method

    torch.manual_seed(0)
    task = create_task("sst2", data_dir=args.data_dir, max_length=args.max_length)
    model = task.build_model(args.model).train()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    loader = task.dataloader("train", args.batch_size, max_samples=args.batch_size * (args.repeats + 1), seed=0)
    batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in loader]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    setups = {
        "standard": ("standard", None),
        f"pgd_at/embedding_pgd{args.attack_steps}": ("pgd_at", f"embedding_pgd{args.attack_steps}"),
        f"adr/embedding_pgd{args.attack_steps}": ("adr", f"embedding_pgd{args.attack_steps}"),
        "pgd_at/token_substitution": ("pgd_at", "token_substitution:stop_on_success=false"),
    }
    results = {}
    for name, (method_name, spec) in setups.items():
        attack = create_attack(spec, task) if spec else None
        method = create_method(method_name, task, attack)
        ema = EMATeacher(model, 0.995) if method.needs_ema else None
        method.setup(model, ema)
        times = []
        for i, batch in enumerate(batches):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            prepared = method.prepare(model, batch, Progress(i, len(batches)))
            loss, _ = method.loss(model, batch, prepared, Progress(i, len(batches)))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i > 0:  # the first batch warms up
                times.append(time.perf_counter() - t0)
        results[name] = sum(times) / len(times)
    base = results["standard"]
    print(json.dumps({
        "model": args.model, "device": str(device), "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpu": platform.processor() or platform.machine(),
        "batch_size": args.batch_size, "max_length": args.max_length, "timed_steps": args.repeats,
        "seconds_per_step": {k: round(v, 4) for k, v in results.items()},
        "relative_to_standard": {k: round(v / base, 2) for k, v in results.items()},
    }, indent=1))


if __name__ == "__main__":
    main()
