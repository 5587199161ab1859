"""ADR on CIFAR-10 with the paper's settings (Wu, Wang & Chen, ICLR 2024).

    accelerate launch recipes/cifar_adr.py --data-dir ../shared/data/cifar10/plain_text
    accelerate launch recipes/cifar_adr.py --preset adr/cifar100/wrn_pgd_awp_adr --data-dir DIR
    python recipes/cifar_adr.py --preset adr/cifar10/resnet18_trades_sgd_adr --print-config

Without --preset the run is the reference's config/cifar10/resnet18_pgd_sgd_adr.gin: PGD-AT with
rectified soft labels from an EMA self-teacher (tau 2.5 -> 2.0, lambda 0.7 -> 0.95, EMA decay
0.995), PGD-10 L-inf 8/255 step 2/255 with the model in train mode, SGD lr 0.1 momentum 0.9
Nesterov weight decay 5e-4, batch 128 dropping the last partial batch, 200 epochs, LR x0.1 at
epochs 100 and 150. Every other reference configuration (CIFAR-100, TinyImageNet, PreAct-ResNet-18,
WRN-34-10, TRADES, AWP, baselines) is a --preset (`robustkd presets`); a flag overrides one setting.
Reports clean, PGD-20 and AutoAttack accuracy (with calibration and sanity checks) of the model and
of its EMA (WA) copy in the run's threat model.
"""
from robustkd.config import Recipe, parse
from robustkd.recipe import main_guard, run_recipe

RECIPE = Recipe(__doc__.split("\n\n")[0], default_preset="adr/cifar10/resnet18_pgd_sgd_adr",
                defaults={"output_dir": "runs/cifar_adr", "final_attacks": "pgd20,autoattack"})


def main(argv=None) -> dict:
    return run_recipe(parse(RECIPE, argv))


if __name__ == "__main__":
    main_guard(main)
