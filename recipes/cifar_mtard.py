"""MTARD on CIFAR-10 with the reference script's settings (Zhao et al., ECCV 2022; METHODS.md §2).

    accelerate launch recipes/cifar_mtard.py --data-dir ../shared/data/cifar10/plain_text \
        --clean-teacher runs/clean_teacher --robust-teacher runs/robust_teacher
    accelerate launch recipes/cifar_mtard.py --preset bmtard/cifar10/resnet18 --clean-teacher ... --robust-teacher ...

Without --preset the run is the reference's mtard/mtard_resnet18_cifar10.py: a ResNet-18 student
without a normalisation layer; a clean teacher guides it on clean images, a robust teacher on its
PGD examples (PGD-10 L-inf 8/255 step 2/255, start x + 0.001 * N(0, 1), student in eval mode);
Normalization Loss Balance sets the two KL weights (step 0.025), the KL averaged over batch and
classes as in the script; SGD lr 0.1 momentum 0.9 weight decay 2e-4, batch 128, 300 epochs, LR
x0.1 at epochs 215, 260, 285 (scaled when --epochs changes). --preset bmtard/cifar10/resnet18 adds
B-MTARD's Entropy-Based Balance of the teachers' temperatures; mtard/cifar100/resnet18 is the
CIFAR-100 script. ``--robust-teacher ema`` uses the student's own EMA as the robust teacher. A
teacher is a recipe --output-dir (its EMA model when it kept one), ``timm:<name>``, or a Hugging
Face model directory. The report adds the per-epoch temperatures and loss weights (``balance``,
balance.png). docs/mtard.md shows the whole offline pipeline.
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from robustkd.callbacks import TrainerCallback
from robustkd.config import ConfigError, Recipe, parse
from robustkd.recipe import main_guard, run_recipe

BALANCE_KEYS = ["mtard_t_adv", "mtard_t_nat", "mtard_w_adv", "mtard_w_nat", "mtard_entropy_adv",
                "mtard_entropy_nat", "mtard_loss_adv", "mtard_loss_nat"]


@dataclass
class MTARDArgs:
    """MTARD's own settings; each given flag replaces the preset's value in method_kwargs."""

    _argument_group_name = "MTARD (each flag replaces the preset's method setting)"
    entropy_balance: Optional[Literal["reference", "exact", "off"]] = field(default=None, metadata={
        "help": "per-teacher temperatures: B-MTARD's sign steps, an exact bisection solve per batch, or fixed 1 "
                "(MTARD)"})
    loss_balance: Optional[Literal["on", "off"]] = field(default=None, metadata={
        "help": "Normalization Loss Balance of the two KL terms (off: fixed weights 0.5 / 0.5)"})
    kl_scale: Optional[Literal["batchmean", "reference"]] = field(default=None, metadata={
        "help": "reference: the scripts' KL averaged over batch and classes; batchmean: the textbook batch-mean KL"})
    t_min: Optional[float] = field(default=None, metadata={"help": "lower temperature bound"})
    t_max: Optional[float] = field(default=None, metadata={"help": "upper temperature bound"})
    temp_lr: Optional[float] = field(default=None, metadata={"help": "temperature step (x0.1 per LR milestone)"})
    balance_eta: Optional[float] = field(default=None, metadata={"help": "loss-balance step (x0.1 per LR milestone)"})
    balance_beta: Optional[float] = field(default=None, metadata={"help": "loss-balance exponent on relative losses"})


FLAG_TO_KWARG = {"entropy_balance": "entropy_balance", "loss_balance": "loss_balance", "kl_scale": "kl_scale",
                 "t_min": "t_min", "t_max": "t_max", "temp_lr": "temp_lr", "balance_eta": "eta",
                 "balance_beta": "beta"}

def finalize(s: dict[str, Any]) -> None:
    """MTARD only; the MTARD flags given replace the preset's method settings."""
    if s["method"] != "mtard":
        raise ConfigError(f"recipes/cifar_mtard.py trains MTARD only (got --method {s['method']}); use "
                          "recipes/cifar_adr.py for standard, pgd_at, trades and adr")
    for flag, kwarg in FLAG_TO_KWARG.items():
        if s.get(flag) is not None:
            s["method_kwargs"][kwarg] = s[flag] == "on" if flag == "loss_balance" else s[flag]


RECIPE = Recipe(__doc__.split("\n\n")[0], default_preset="mtard/cifar10/resnet18",
                defaults={"output_dir": "runs/cifar_mtard", "final_attacks": "pgd20,autoattack"}, extra=(MTARDArgs,),
                finalize=finalize)


def main(argv=None) -> dict:
    return run_recipe(parse(RECIPE, argv), callbacks=[BalanceReport()])


class BalanceReport(TrainerCallback):
    """The per-epoch temperatures, loss weights, teacher entropies and KL terms (``balance``), plotted
    to balance.png beside the report."""

    def on_report(self, trainer, which: str, model, attacks) -> dict[str, Any]:
        rows = trainer.state.history
        series = {"epoch": [r["epoch"] for r in rows], **{k[6:]: [r.get(k) for r in rows] for k in BALANCE_KEYS}}
        if which == "student":
            _plot_pairs(series, Path(trainer.config.output_dir) / "balance.png")
        return {"balance": series}


def _plot_pairs(series: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    panels = [("temperature", "t"), ("loss weight", "w"), ("teacher entropy (nats)", "entropy"), ("KL loss", "loss")]
    fig = Figure(figsize=(18, 3.6))
    axes = fig.subplots(1, len(panels))
    for ax, (title, key) in zip(axes, panels):
        for who, style in (("adv", "-o"), ("nat", "--s")):
            ys = series[f"{key}_{who}"]
            if any(y is not None for y in ys):
                ax.plot(series["epoch"], ys, style, label="robust teacher" if who == "adv" else "clean teacher")
        ax.set(xlabel="epoch", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("MTARD balance per epoch")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main_guard(main)
