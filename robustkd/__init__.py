"""robustkd: adversarially robust training through knowledge distillation, for any task."""
__version__ = "0.1.0"

from . import attacks, distill  # noqa: F401 - registers built-in attacks and methods
from .attacks import Attack, create_attack
from .distill import Method, create_method
from .eval import evaluate, run_evaluation
from .registry import ATTACKS, METHODS, MODELS, TASKS, register_attack, register_method, register_model, register_task
from .task import Adversarial, Task
from .teachers import EMATeacher, FrozenTeacher
from .threat import SNRBall, ThreatModel
from .train_config import TrainConfig
from .trainer import Trainer


def create_task(name: str, **kwargs) -> Task:
    """A registered task by name, e.g. ``create_task("cifar10", data_dir="../shared/data/cifar10/plain_text")``."""
    return TASKS.get(name)(**kwargs)


__all__ = ["ATTACKS", "Adversarial", "Attack", "EMATeacher", "FrozenTeacher", "METHODS", "MODELS", "Method",
           "SNRBall", "TASKS", "Task", "ThreatModel", "TrainConfig", "Trainer", "create_attack", "create_method",
           "create_task", "evaluate", "register_attack", "register_method", "register_model", "register_task", "run_evaluation"]
