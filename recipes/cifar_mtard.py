"""MTARD on CIFAR-10 with the paper's defaults (Zhao, Wang & Wei; METHODS.md §2).

    accelerate launch recipes/cifar_mtard.py --data-dir ../shared/data/cifar10/plain_text \
        --clean-teacher runs/clean_teacher --robust-teacher runs/robust_teacher

A clean teacher guides the student on clean images, a robust teacher on the student's PGD
examples (PGD-10 L-inf 8/255 step 2/255, start x + 0.001 * N(0, 1), student in eval mode);
Entropy-Based Balance sets per-teacher temperatures, Normalization Loss Balance the loss
weights. SGD lr 0.1 momentum 0.9 weight decay 2e-4, batch 128, 300 epochs, LR x0.1 at epochs
215, 260, 285 (scaled to --epochs when that differs and --milestones is not given).
``--robust-teacher ema`` uses the student's own EMA as the robust teacher (teacher-free MTARD).
A teacher is a recipe --output-dir (its EMA model when it kept one), ``timm:<name>``, or a
Hugging Face model directory. docs/mtard.md shows the whole offline pipeline.
"""
from __future__ import annotations

import json
from pathlib import Path

from robustkd.attacks.pgd import PGD
from robustkd.distill.balance import ENTROPY_MODES
from robustkd.distill.mtard import MTARD
from robustkd.recipe import build_task, common_parser, main_guard, run_recipe
from robustkd.teachers import load_teacher
from robustkd.threat import eps_from_pixels

PAPER_EPOCHS, PAPER_MILESTONES = 300, (215, 260, 285)


def parser():
    p = common_parser(__doc__.split("\n\n")[0], dataset="cifar10", model="resnet18", method="mtard", epochs=300,
                      batch_size=128, lr=0.1, weight_decay=2e-4, output_dir="runs/cifar_mtard")
    g = p.add_argument_group("MTARD")
    g.add_argument("--clean-teacher", required=True, help="naturally trained teacher: a recipe --output-dir (e.g. "
                   "from recipes/cifar_adr.py --method standard), timm:<name>, or a Hugging Face model directory")
    g.add_argument("--robust-teacher", required=True, help="adversarially trained teacher (same forms), or 'ema' "
                   "for the student's EMA self-teacher (teacher-free MTARD)")
    g.add_argument("--teacher-weights", default="auto", choices=["auto", "student", "ema"],
                   help="which weights of a recipe output dir to use as teacher (auto: the EMA model if kept)")
    g.add_argument("--entropy-balance", default="reference", choices=list(ENTROPY_MODES),
                   help="per-teacher temperatures: the paper code's sign steps, an exact bisection solve per batch, "
                   "or fixed temperatures 1")
    g.add_argument("--loss-balance", default="on", choices=["on", "off"],
                   help="Normalization Loss Balance of the two KL terms (off: fixed weights 0.5 / 0.5)")
    g.add_argument("--kl-scale", default="batchmean", choices=["batchmean", "reference"],
                   help="batchmean: the textbook batch-mean KL of METHODS.md §2; reference: the paper code's KL "
                   "averaged over batch and classes (= batch-mean KL / num_classes), to compare with the paper")
    g.add_argument("--t-min", type=float, default=1.0, help="lower temperature bound")
    g.add_argument("--t-max", type=float, default=10.0, help="upper temperature bound")
    g.add_argument("--temp-lr", type=float, default=0.001, help="reference-mode temperature step (x0.1 per LR milestone)")
    g.add_argument("--balance-eta", type=float, default=0.025, help="loss-balance step eta (x0.1 per LR milestone)")
    g.add_argument("--balance-beta", type=float, default=1.0, help="loss-balance exponent on relative losses (ECCV)")
    return p


def scaled_milestones(epochs: int) -> str:
    """The paper's 215/260/285 of 300 epochs, proportionally for shorter or longer runs (a milestone
    at the last epoch takes effect after the final step, i.e. never)."""
    return ",".join(str(m) for m in sorted({max(1, round(m * epochs / PAPER_EPOCHS)) for m in PAPER_MILESTONES}))


def main() -> None:
    args = parser().parse_args()
    if args.method != "mtard":
        raise ValueError(f"recipes/cifar_mtard.py trains MTARD only (got --method {args.method}); use "
                         "recipes/cifar_adr.py for standard, pgd_at, trades and adr")
    if args.milestones is None:
        args.milestones = scaled_milestones(args.epochs)
    task = build_task(args)
    clean = load_teacher(args.clean_teacher, task, which=args.teacher_weights)
    robust = "ema" if args.robust_teacher == "ema" else load_teacher(args.robust_teacher, task, which=args.teacher_weights)
    attack = PGD(task, task.threat_model(eps=eps_from_pixels(args.eps), norm=args.norm), steps=args.attack_steps,
                 step_size=eps_from_pixels(args.attack_step_size), random_start="normal", init_std=0.001, loss="ce")
    method = MTARD(task, attack, clean_teacher=clean, robust_teacher=robust, entropy_balance=args.entropy_balance,
                   loss_balance=args.loss_balance == "on", kl_scale=args.kl_scale, t_min=args.t_min, t_max=args.t_max,
                   temp_lr=args.temp_lr, eta=args.balance_eta, beta=args.balance_beta)
    report = run_recipe(args, task=task, method=method)
    write_balance(Path(args.output_dir), report)


def write_balance(out: Path, report: dict) -> None:
    """Add the per-epoch temperatures and loss weights to report.json and plot them (balance.png)."""
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    keys = ["mtard_t_adv", "mtard_t_nat", "mtard_w_adv", "mtard_w_nat", "mtard_entropy_adv", "mtard_entropy_nat",
            "mtard_loss_adv", "mtard_loss_nat"]
    series = {"epoch": [r["epoch"] for r in rows], **{k[6:]: [r.get(k) for r in rows] for k in keys}}
    report["balance"] = series
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    _plot_pairs(series, out / "balance.png")


def _plot_pairs(series: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("temperature", "t"), ("loss weight", "w"), ("teacher entropy (nats)", "entropy"), ("KL loss", "loss")]
    fig, axes = plt.subplots(1, len(panels), figsize=(18, 3.6))
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
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main_guard(main)
