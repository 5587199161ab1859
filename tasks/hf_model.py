"""The base of the data-less tasks around a Hugging Face transformers classifier, for
:class:`robustkd.hf.RobustTrainer` (``hf_image`` in :mod:`robustkd_tasks.image`, ``hf_audio`` in
:mod:`robustkd_tasks.speech`).

``transformers.Trainer`` brings the data, so the batches are the processor's output: the model's
input under its ``main_input_name`` (``pixel_values``, ``input_values``, ...), ``labels`` and
whatever else the processor returns. What every such task shares lives here: the class count read
from ``model.config.num_labels``, the refusal to hand out data, building a model with the
``AutoModelFor...`` class of its kind (as the Hugging Face example scripts do), and running the
model on its input keyword and reading ``.logits``. A subclass says which input and which auto class,
where the perturbation ``delta`` enters the input (:meth:`HFModelTask.model_input`), which other
batch entries the model takes (:meth:`HFModelTask.model_kwargs`) and its threat models.
"""
from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn
from torch.utils.data import Dataset

from robustkd.task import Batch, Task


class HFModelTask(Task):
    """A task around one transformers classifier ``model`` and its processor; no data of its own.

    Subclasses set ``input_name`` (the batch key and model keyword attacks act on), ``auto_class``
    (the name of the ``transformers.AutoModelFor...`` class that builds such a model), ``model_kind``
    (named in errors, e.g. ``"image-classification"``) and ``threat_options`` (the options their
    :meth:`threat_model` takes, named when others are given), and implement :meth:`threat_model`."""

    input_name: ClassVar[str]
    auto_class: ClassVar[str]
    model_kind: ClassVar[str]
    threat_options: ClassVar[str]

    def __init__(self, model: nn.Module, *, name: str):
        num_labels = getattr(getattr(model, "config", None), "num_labels", None)
        if num_labels is None:
            raise ValueError(f"the model has no config.num_labels: pass a transformers {self.model_kind} model")
        self.name, self.num_classes = name, int(num_labels)

    def dataset(self, split: str) -> Dataset:
        raise ValueError(f"the task {self.name!r} wraps a model for transformers.Trainer and has no data of its own: "
                         "pass train_dataset/eval_dataset to the Trainer")

    def build_model(self, name: str, **kwargs: Any) -> nn.Module:
        """``transformers.<auto_class>.from_pretrained(name)`` with this task's class count."""
        import transformers

        auto = getattr(transformers, self.auto_class)
        model: nn.Module = auto.from_pretrained(name, num_labels=self.num_classes, **kwargs)
        return model

    # -- where attacks act ----------------------------------------------------------------------
    def perturbation_base(self, model: nn.Module, batch: Batch) -> Tensor:
        """The model's input as the batch holds it (a subclass may map it to the attack space)."""
        x: Tensor = batch[self.input_name]
        return x

    def model_input(self, batch: Batch, delta: Tensor | None) -> Tensor:
        """The model's input with ``delta`` (from :meth:`perturbation_base`'s space) added; here the
        input itself is the attack space."""
        x: Tensor = batch[self.input_name]
        return x if delta is None else x + delta.to(x.dtype)

    def model_kwargs(self, batch: Batch) -> dict[str, Tensor]:
        """The other batch entries the model takes besides its input (none by default)."""
        return {}

    def logits(self, model: nn.Module, batch: Batch, delta: Tensor | None = None) -> Tensor:
        out = model(**{self.input_name: self.model_input(batch, delta)}, **self.model_kwargs(batch))
        logits: Tensor = out.logits
        return logits

    def refuse_threat_options(self, options: dict[str, Any]) -> None:
        """One error naming the threat-model options this task does not take."""
        if options:
            raise TypeError(f"unknown threat-model options {sorted(options)} for {self.name}: {self.threat_options}")
