"""Run under ``torchrun --nproc_per_node 2``: a short ADR + AWP run whose final student and EMA
weights each rank saves, so the test can check they are identical across ranks."""
import os
import sys

import torch
import torch.distributed as dist

from robustkd import TrainConfig, Trainer, create_method, create_task
from robustkd.attacks.pgd import PGD
from robustkd.teachers import unwrap

out = sys.argv[1]
task = create_task("cifar10", data_dir=os.environ["ROBUSTKD_TEST_CIFAR"])
torch.manual_seed(0)
model = task.build_model("small_cnn", width=8)
initial = {k: v.clone() for k, v in model.state_dict().items()}
method = create_method("adr", task, PGD(task, steps=2))
cfg = TrainConfig(epochs=1, batch_size=8, eval_batch_size=16, max_train_samples=64, max_eval_samples=32,
                  eval_attacks=["pgd:steps=2"], output_dir=os.path.join(out, "run"), awp_gamma=5e-3, cpu=True,
                  progress=False)
trainer = Trainer(task, model, method, cfg, run_info={"model": "small_cnn", "model_kwargs": {"width": 8}})
trainer.fit()
rank = trainer.accelerator.process_index
torch.save({"student": {k: v.detach().cpu() for k, v in unwrap(trainer.model).state_dict().items()},
            "ema": {k: v.detach().cpu() for k, v in trainer.ema.model.state_dict().items()},
            "initial": initial, "steps": trainer.state.step,
            "world_size": dist.get_world_size() if dist.is_initialized() else 1},
           os.path.join(out, f"rank{rank}.pt"))
