"""Memory of ADR's EMA teacher for a LoRA model: a full EMA copy of the model (robustkd.teachers.EMATeacher)
against the adapter-only EMA RobustTrainer keeps for a PEFT model (robustkd.hf.AdapterEMATeacher).

    ROBUSTKD_SHARED=../shared python bench/peft_ema_memory.py [--model DIR] [--r 8]

Prints the bytes of the EMA tensors of each (parameters and buffers of the copy; the averaged tensors
of the adapter EMA) and their ratio, as a Markdown table."""
from __future__ import annotations

import argparse
import os
from pathlib import Path


def main() -> None:
    import peft
    from transformers import AutoModelForSequenceClassification

    from robustkd.hf import AdapterEMATeacher
    from robustkd.teachers import EMATeacher

    shared = Path(os.environ.get("ROBUSTKD_SHARED", "../shared"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(shared / "models" / "all-MiniLM-L6-v2"))
    parser.add_argument("--r", type=int, default=8)
    args = parser.parse_args()
    base = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    model = peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_CLS", r=args.r, target_modules=["query", "value"]))
    full = EMATeacher(model).model
    full_bytes = sum(t.numel() * t.element_size() for t in [*full.parameters(), *full.buffers()])
    adapter = AdapterEMATeacher(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"| EMA teacher of {Path(args.model).name} + LoRA r={args.r} (query, value) | tensors | bytes |")
    print("| --- | --- | --- |")
    print(f"| full-model EMA copy | {sum(1 for _ in full.parameters())} parameters + buffers | {full_bytes:,} "
          f"({full_bytes / 2**20:.1f} MiB) |")
    print(f"| adapter EMA (RobustTrainer on a PEFT model) | {len(adapter.tensors)} ({trainable:,} values) | "
          f"{adapter.nbytes():,} ({adapter.nbytes() / 2**20:.2f} MiB) |")
    print(f"\nratio: the adapter EMA is {adapter.nbytes() / full_bytes:.2%} of the full copy "
          f"({full_bytes / adapter.nbytes():.0f}x smaller)")


if __name__ == "__main__":
    main()
