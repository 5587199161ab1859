"""The distributed harness: one epoch of ADR in 2 processes (``torchrun``, gloo) whose ranks must end with
identical students and EMA teachers. Run by the ``distributed`` task check as
``python -m robustkd.testing.distributed PAYLOAD OUT_DIR``."""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from ..task import Task
from .kit import _fail, _split_size


# -- two processes -----------------------------------------------------------------------------
def _digest(tensors: Iterable[Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _run_two_processes(task: Task, model: nn.Module, batch_size: int, seed: int, timeout: float = 300) -> str:
    """Train ADR (EMA teacher, PGD-2) for one epoch with torchrun on 2 CPU processes and compare ranks."""
    n_train = min(_split_size(task, "train"), 16 * batch_size)
    n_train -= n_train % (2 * batch_size)
    if n_train == 0:
        _fail(f"the train split has fewer than {2 * batch_size} examples: too few for 2 processes")
    with tempfile.TemporaryDirectory(prefix="robustkd-conformance-") as tmp:
        payload = Path(tmp) / "payload.pt"
        try:
            torch.save({"task": task, "model": copy.deepcopy(model).cpu(), "batch_size": batch_size, "seed": seed,
                        "n_train": n_train}, payload)
        except Exception as exc:  # noqa: BLE001
            _fail(f"the task or model cannot be pickled for the worker processes ({type(exc).__name__}: {exc}); "
                  f"multi-process training needs a picklable task")
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([p for p in sys.path if p] + [os.environ.get("PYTHONPATH", "")])}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "robustkd.testing.distributed", str(payload), tmp]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            _fail(f"the 2-process run did not finish within {timeout:.0f} s")
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
            _fail(f"the 2-process run failed (exit {proc.returncode}): " + " | ".join(tail))
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in (0, 1)]
    expected_steps = n_train // (2 * batch_size)
    for r in ranks:
        if r["world_size"] != 2:
            _fail(f"rank {r['rank']} saw world_size {r['world_size']}, not 2")
        if r["steps"] != expected_steps:
            _fail(f"rank {r['rank']} took {r['steps']} optimizer steps on {n_train} examples; 2 processes should "
                  f"each take {expected_steps} (the data is not sharded)")
        if not math.isfinite(r["loss"]):
            _fail(f"rank {r['rank']} has a non-finite training loss")
    if ranks[0]["params"] != ranks[1]["params"]:
        _fail("after one epoch the two processes hold different student weights (gradients not synchronised)")
    if ranks[0]["ema"] != ranks[1]["ema"]:
        _fail("after one epoch the two processes hold different EMA teachers")
    return (f"1 epoch of ADR on 2 processes: {expected_steps} steps each, identical student and EMA teacher, "
            f"loss {ranks[0]['loss']:.4f}")


def _worker(payload_path: str, out_dir: str) -> None:
    from ..config import build_method
    from ..teachers import unwrap
    from ..trainer import TrainConfig, Trainer

    payload = torch.load(payload_path, weights_only=False)  # written by the parent process just before
    task, model = payload["task"], payload["model"]
    config = TrainConfig(epochs=1, batch_size=payload["batch_size"], eval_batch_size=payload["batch_size"],
                         lr=0.01, max_train_samples=payload["n_train"], max_eval_samples=2 * payload["batch_size"],
                         eval_attacks=[], seed=payload["seed"], output_dir=str(Path(out_dir) / "run"), cpu=True,
                         progress=False)
    method = build_method({"method": "adr", "attack_steps": 2}, task, threat=task.threat_model())
    trainer = Trainer(task, model, method, config)
    history = trainer.fit()
    if trainer.ema is None:
        raise RuntimeError("ADR trained without its EMA teacher: nothing to compare across ranks")
    acc = trainer.accelerator
    result = {"rank": acc.process_index, "world_size": acc.num_processes, "steps": trainer.state.step,
              "loss": history[-1]["train_loss"],
              "params": _digest(p for p in unwrap(trainer.model).parameters()),
              "ema": _digest(list(trainer.ema.model.parameters()) + [b for b in trainer.ema.model.buffers()
                                                                    if b.is_floating_point()])}
    (Path(out_dir) / f"rank{acc.process_index}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
