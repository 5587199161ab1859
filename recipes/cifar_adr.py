"""ADR on CIFAR-10 with the paper's defaults (Wu, Wang & Chen, ICLR 2024).

    accelerate launch recipes/cifar_adr.py --data-dir ../shared/data/cifar10/plain_text

PGD-AT with rectified soft labels from an EMA self-teacher (tau 2.5 -> 2.0, lambda 0.7 -> 0.95,
EMA decay 0.995), PGD-10 L-inf 8/255 step 2/255, SGD lr 0.1 momentum 0.9 weight decay 5e-4,
batch 128, 200 epochs, LR x0.1 at epochs 100 and 150. Reports clean, PGD-20 and AutoAttack
accuracy of the model and of its EMA (WA) copy. ``--method`` switches to the baselines
(standard, pgd_at, trades) or ADR over TRADES (adr_trades); ``--awp`` adds AWP.
"""
from robustkd.recipe import common_parser, main_guard, run_recipe


def main() -> None:
    parser = common_parser(__doc__.split("\n\n")[0], dataset="cifar10", model="resnet18", method="adr",
                           epochs=200, batch_size=128, lr=0.1, weight_decay=5e-4, output_dir="runs/cifar_adr")
    run_recipe(parser.parse_args())


if __name__ == "__main__":
    main_guard(main)
