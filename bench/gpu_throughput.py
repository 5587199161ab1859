"""The GPU path measured against the reference code on one GPU: throughput, peak memory, accuracy, syncs.

    python bench/gpu_throughput.py --refs ../ref --data-dir ../shared/data/cifar10/plain_text --output gpu.json
    python bench/gpu_throughput.py --parts adr,accuracy --refs ../ref --data-dir DIR --output gpu.json
    python bench/gpu_throughput.py --dry-run --refs ../ref --data-dir DIR --output /tmp/dry.json   # CPU, toy sizes
    python bench/gpu_table.py gpu.json                                   # the markdown tables of docs/performance.md

``--refs DIR`` holds checkouts of the reference code, run from there and never copied:
``DIR/ADR`` (yuyuwu5/ADR), ``DIR/MTARD`` (zhaoshiji123/MTARD: B-MTARD imports its ``mtard_loss``) and
``DIR/MTARD-extension`` (zhaoshiji123/MTARD-extension, B-MTARD). Parts (``--parts``, default all):

* ``adr``: images/s and peak memory of an ADR epoch slice (the shared CIFAR-10 training images, batch
  128, PGD-10, ResNet-18) for the reference's own epoch function (``AdvTrainer._train_one_epoch``,
  built from its ``config/cifar10/resnet18_pgd_sgd_adr.gin``), robustkd's defaults (``recipes/cifar_adr.py``
  with no flag: float32) and robustkd with the speed modes (``--mixed-precision bf16 --compile
  --channels-last --tf32``);
* ``mtard``: the same for B-MTARD: the training-loop body of ``resnet18_mtard_cifar10.py`` run as written
  against ``recipes/cifar_mtard.py --preset bmtard/cifar10/resnet18``, both with the same teacher modules
  (the script's robust teacher class, WideResNet-34-10; its clean teacher ``resnet56`` is defined in neither
  repository, so a ResNet-18 of the script's own model package stands in; random weights: the cost does not
  depend on them);
* ``accuracy``: ``recipes/cifar_adr.py`` trained for ``--epochs`` on the shared training images in float32
  and with the four speed flags, on ``--seeds`` seeds, all in parallel as separate processes; clean and
  PGD-20 accuracy of the model and its EMA copy on the shared test split (``report.json``), and the speed
  settings the trainer recorded (``checkpoints/*/run_config.json``);
* ``autoattack``: AutoAttack (standard) on ``--aa-points`` test points against the
  ``autoattack-example:resnet18`` model, through robustkd's ``autoattack`` attack and by a direct
  ``pyautoattack`` call;
* ``hf``: steps of ``robustkd.hf.RobustTrainer`` (ADR, embedding PGD-10) on the MiniLM architecture
  (``--minilm DIR``: its ``config.json`` and tokenizer; weights are drawn at random, the step's cost does
  not depend on them), batch 32, sequence length 64, float32 and bf16.

Every side of a throughput part runs in its own process (its own CUDA context, memory statistics,
TF32 setting and Accelerate state); the processes build and warm up in parallel (compilation
included), then are timed one at a time in rounds whose order rotates, so drift hits every side.
Each side is fed the same batches as CPU tensors and moves them to the GPU itself (the reference
code does ``.to(device)`` / ``.cuda()``); the reference scripts augment on the CPU in their data
pipeline (outside the timed loop), robustkd's step augments on the GPU (inside it). Images/s is
batch x timed steps / seconds between two ``torch.cuda.synchronize()`` calls, each step being PGD-10
plus the update; peak memory is ``torch.cuda.max_memory_allocated`` of that side's process. After the
rounds each side runs ``--sync-steps`` steps under ``torch.cuda.set_sync_debug_mode("warn")`` and the
synchronising calls are counted per step.

The JSON (``--output``) is rewritten as each part finishes, so a later failure or the time limit
(``--budget-s``: a part that cannot start in time is recorded as skipped) loses nothing. Without a
CUDA device the script stops at once with exit status 2; ``--dry-run`` (or ``ROBUSTKD_GPU_DRY_RUN=1``)
runs every part at toy size on the CPU (no compilation: ``--compile`` is dropped) to check the script.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TQDM_DISABLE", "1")  # the reference epoch's progress bar (tqdm reads it at import)
FAST_FLAGS = ["--mixed-precision", "bf16", "--compile", "--channels-last", "--tf32"]
ADR_GIN = "config/cifar10/resnet18_pgd_sgd_adr.gin"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- sizes ----------------------------------------------------------------------------------------------
def sizes(args: argparse.Namespace) -> dict[str, Any]:
    """The measured sizes (the issue's), or toy ones for the CPU dry run; flags given override both."""
    if args.dry_run:
        s = dict(batch=8, pgd_steps=2, warmup=1, rounds=2, steps_per_round=1, sync_steps=1, epochs=1, seeds=[0],
                 train_samples=32, eval_samples=16, aa_points=4, hf_batch=4, hf_seq=16, hf_warmup=1, hf_steps=2,
                 n_batches=2, wrn=(10, 1))
    else:
        s = dict(batch=128, pgd_steps=10, warmup=4, rounds=3, steps_per_round=10, sync_steps=2, epochs=3, seeds=[0, 1],
                 train_samples=None, eval_samples=None, aa_points=1000, hf_batch=32, hf_seq=64, hf_warmup=3,
                 hf_steps=15, n_batches=39, wrn=(34, 10))
    for key in ("rounds", "steps_per_round", "epochs", "aa_points", "warmup"):
        if getattr(args, key, None) is not None:
            s[key] = getattr(args, key)
    if args.seeds is not None:
        s["seeds"] = [int(v) for v in args.seeds.split(",")]
    return s


def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# -- the sides of a throughput part (each in its own process) ---------------------------------------------
class Side:
    """One way of training: ``step(x, y)`` on CPU tensors; ``run(n)`` times n steps over the shared batches."""

    def __init__(self, opts: dict[str, Any]):
        import torch

        from robustkd import create_task

        self.opts, self.dev, self.i = opts, device(), 0
        if opts["dry_run"]:
            torch.set_num_threads(1)
        task = create_task("cifar10", data_dir=opts["data_dir"], augment=False)
        loader = task.dataloader("train", opts["batch"], shuffle=True, seed=0, drop_last=True)
        self.batches = []
        for b in loader:
            self.batches.append((b["inputs"], b["labels"]))
            if len(self.batches) == opts["n_batches"]:
                break
        self.info: dict[str, Any] = {}

    def next_batches(self, n: int) -> list:
        out = [self.batches[(self.i + k) % len(self.batches)] for k in range(n)]
        self.i += n
        return out

    def step(self, x: Any, y: Any) -> None:
        """One training step on a batch: the sides whose :meth:`steps` trains batch by batch define it."""
        raise NotImplementedError(f"{type(self).__name__} trains through steps(), not step()")

    def steps(self, n: int) -> None:
        for x, y in self.next_batches(n):
            self.step(x, y)

    def run(self, n: int) -> float:
        synchronize()
        start = time.perf_counter()
        self.steps(n)
        synchronize()
        return time.perf_counter() - start

    def warm_up(self) -> None:
        import torch

        start = time.perf_counter()
        self.run(self.opts["warmup"])
        self.info["warmup_seconds"] = time.perf_counter() - start
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def memory(self) -> dict[str, Any]:
        import torch

        if not torch.cuda.is_available():
            return {"peak_memory_gib": None}
        return {"peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}

    def sync_check(self, n: int) -> dict[str, Any]:
        """``n`` steps under ``torch.cuda.set_sync_debug_mode("warn")``: the synchronising calls per step."""
        import torch

        if not torch.cuda.is_available():
            self.steps(n)
            return {"steps": n, "skipped": "no CUDA device (dry run): the steps ran, nothing was counted"}
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                self.steps(n)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
        places: dict[str, int] = {}
        for w in syncs:
            key = f"{Path(w.filename).name}:{w.lineno}"
            places[key] = places.get(key, 0) + 1
        return {"steps": n, "syncs": len(syncs), "syncs_per_step": len(syncs) / n,
                "where": dict(sorted(places.items(), key=lambda kv: -kv[1])[:8])}


class RobustkdSide(Side):
    """robustkd's step as the recipe builds it (``build_trainer(parse(RECIPE, argv))``): ``Trainer.train_step``."""

    def __init__(self, opts: dict[str, Any], recipe: str, flags: list[str], teachers: dict | None = None):
        import importlib.util
        from unittest import mock

        import torch

        super().__init__(opts)
        from robustkd import config
        from robustkd.config import parse
        from robustkd.recipe import build_trainer

        spec = importlib.util.spec_from_file_location(f"_recipe_{recipe}", REPO / "recipes" / f"{recipe}.py")
        if spec is None or spec.loader is None:
            raise FileNotFoundError(f"recipes/{recipe}.py is not a Python file")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self.tmp = tempfile.mkdtemp(prefix="gpu-bench-")
        argv = ["--data-dir", opts["data_dir"], "--output-dir", self.tmp, "--no-progress", "--eval-every", "0",
                "--eval-attacks", "", *flags]
        if opts["dry_run"]:
            argv += ["--batch-size", str(opts["batch"]), "--attack-steps", str(opts["pgd_steps"])]
        patch = mock.patch.object(config, "load_teachers", lambda *_: teachers) if teachers else contextlib.nullcontext()
        with patch:
            self.trainer = build_trainer(parse(module.RECIPE, argv))
        c = self.trainer.config
        attack = getattr(self.trainer.method, "attack", None)
        self.info.update(argv=argv, batch_size=c.batch_size, attack_steps=getattr(attack, "steps", None),
                         mixed_precision=str(self.trainer.accelerator.mixed_precision), compile=c.compile,
                         channels_last=c.channels_last, tf32=c.tf32,
                         matmul_fp32_precision=str(torch.backends.cuda.matmul.fp32_precision))
        self.warm_up()

    def step(self, x, y) -> None:
        self.trainer.train_step({"inputs": x.to(self.dev, non_blocking=True), "labels": y.to(self.dev, non_blocking=True)})


class ReferenceADRSide(Side):
    """yuyuwu5/ADR's own epoch function, ``AdvTrainer._train_one_epoch``, over a slice of the batches, with
    the trainer, model, optimizer, scheduler, EMA and ADR built as its ``main`` builds them from the gin file."""

    def __init__(self, opts: dict[str, Any]):
        import torch

        super().__init__(opts)
        from robustkd.fidelity import read_gin, reference_imports

        os.environ["TQDM_DISABLE"] = "1"
        root = Path(opts["refs"]) / "ADR"
        notes: list[str] = []
        self.keep = contextlib.ExitStack()
        self.keep.enter_context(reference_imports(root / "src", notes))
        from adr import ADR as RefADR  # type: ignore[import-not-found]
        from advTrainer import AdvTrainer  # type: ignore[import-not-found]
        from model.create_model import create_model  # type: ignore[import-not-found]
        from timm.utils import ModelEmaV2
        from util import optimizer_scheduler as sched  # type: ignore[import-not-found]
        from util.pgd_attack import PGD as RefPGD  # type: ignore[import-not-found]

        g = read_gin(root / ADR_GIN)
        steps_per_epoch = 5085 // 128  # the shared training subset at the gin's batch 128, last batch dropped
        torch.manual_seed(0)
        self.model = create_model(g["create_model.model_name"], "cifar10", g["create_model.activation_name"]).to(self.dev)
        self.optimizer = sched.build_sgd_optimizer(self.model, False, g["build_sgd_optimizer.lr"],
                                                   g["build_sgd_optimizer.momentum"],
                                                   g["build_sgd_optimizer.weight_decay"])
        self.scheduler = sched.build_steplr_scheduler(self.optimizer, steps_per_epoch,
                                                      g["build_steplr_scheduler.lr_step_milestone"],
                                                      g["build_steplr_scheduler.lr_gamma"])
        steps = opts["pgd_steps"] if opts["dry_run"] else g["PGD.steps"]
        attacker = RefPGD(eps=g["PGD.eps"], alpha=g["PGD.alpha"], steps=steps)
        self.ref = AdvTrainer(self.dev, {"n_class": 10}, g["AdvTrainer.adv_train_mode"], g["AdvTrainer.model_ema_decay"],
                              g["AdvTrainer.temperature_low"], g["AdvTrainer.temperature_high"],
                              g["AdvTrainer.interpolation_low"], g["AdvTrainer.interpolation_high"],
                              adv_attacker=attacker)
        self.ref.model_ema = ModelEmaV2(self.model, decay=g["AdvTrainer.model_ema_decay"])
        self.ref.adr = RefADR(10, g["main.epoch"], steps_per_epoch, g["AdvTrainer.temperature_low"],
                              g["AdvTrainer.temperature_high"], g["AdvTrainer.interpolation_low"],
                              g["AdvTrainer.interpolation_high"])
        self.global_step = 0
        self.info.update(source=f"{root.name}/src/advTrainer.py AdvTrainer._train_one_epoch; {ADR_GIN}",
                         batch_size=opts["batch"], attack_steps=steps, notes=notes)
        self.warm_up()

    def steps(self, n: int) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            self.ref._train_one_epoch(self.next_batches(n), self.model, self.optimizer, self.scheduler, self.global_step)
        self.global_step += n


def reference_teachers(opts: dict[str, Any]):
    """The B-MTARD script's teachers, from its own model package: WideResNet (its robust teacher) and a
    ResNet-18 for its clean ``resnet56`` (in neither repository); seeded random weights."""
    import torch

    from robustkd.fidelity import load_package

    models = load_package("_gpu_bench_bmtard_models", Path(opts["refs"]) / "MTARD-extension" / "cifar10_models")
    torch.manual_seed(1000)
    depth, widen = opts["wrn"]
    wrn = sys.modules[f"{models.__name__}.wideresnet"].WideResNet  # the script's WideResNet() (not in __all__)
    robust = wrn(depth=depth, widen_factor=widen).eval()
    clean = models.resnet18().eval()
    return models, robust, clean, f"WideResNet(depth={depth}, widen_factor={widen}) robust, resnet18 clean"


class RobustkdMTARDSide(RobustkdSide):
    def __init__(self, opts: dict[str, Any], flags: list[str]):
        from robustkd.teachers import FrozenTeacher

        _, robust, clean, which = reference_teachers(opts)
        teachers = {"clean_teacher": FrozenTeacher(clean, name="clean"),
                    "robust_teacher": FrozenTeacher(robust, name="robust")}
        super().__init__(opts, "cifar_mtard", ["--preset", "bmtard/cifar10/resnet18", "--clean-teacher", "(bench)",
                                               "--robust-teacher", "(bench)", *flags], teachers)
        self.info["teachers"] = which


class ReferenceBMTARDSide(Side):
    """The body of B-MTARD's loop over the training batches (``resnet18_mtard_cifar10.py``), run as written
    with its settings, student, SGD and loss (MTARD's ``mtard_loss``), on the same teacher modules."""

    def __init__(self, opts: dict[str, Any]):
        import torch

        super().__init__(opts)
        from robustkd.fidelity import cuda_as_identity, reference_imports, training_loop_body

        script = Path(opts["refs"]) / "MTARD-extension" / "resnet18_mtard_cifar10.py"
        models, robust, clean, which = reference_teachers(opts)
        self.notes: list[str] = []
        self.keep = contextlib.ExitStack()
        self.keep.enter_context(reference_imports(Path(opts["refs"]) / "MTARD" / "mtard", self.notes))
        self.cuda = lambda: cuda_as_identity(self.notes)
        settings, body = training_loop_body(script)
        torch.manual_seed(0)
        self.ns: dict[str, Any] = {"student": models.resnet18().to(self.dev), "teacher": robust.to(self.dev),
                                   "teacher_nat": clean.to(self.dev), "f": io.StringIO(), "torch": torch}
        with self.cuda():
            exec(compile(__import__("ast").Module(body=settings, type_ignores=[]), str(script), "exec"), self.ns)
        self.code = compile(__import__("ast").Module(body=body, type_ignores=[]), str(script), "exec")
        self.k = 0
        self.info.update(source="MTARD-extension/resnet18_mtard_cifar10.py (loop body), MTARD/mtard/mtard_loss.py",
                         batch_size=opts["batch"], attack_steps=10, teachers=which, notes=self.notes)
        self.warm_up()

    def steps(self, n: int) -> None:
        with self.cuda(), contextlib.redirect_stdout(io.StringIO()):
            for x, y in self.next_batches(n):
                self.ns.update(step=self.k, train_batch_data=x, train_batch_labels=y, index=None)
                exec(self.code, self.ns)
                self.k += 1


SIDES: dict[str, dict[str, tuple[type[Side], tuple[Any, ...]]]] = {
    "adr": {"reference_adr": (ReferenceADRSide, ()), "robustkd_adr_defaults": (RobustkdSide, ("cifar_adr", [])),
            "robustkd_adr_fast": (RobustkdSide, ("cifar_adr", FAST_FLAGS))},
    "mtard": {"reference_bmtard": (ReferenceBMTARDSide, ()), "robustkd_mtard_defaults": (RobustkdMTARDSide, ([],)),
              "robustkd_mtard_fast": (RobustkdMTARDSide, (FAST_FLAGS,))},
}


def side_worker(conn, part: str, name: str, opts: dict[str, Any]) -> None:
    """A side's process: build and warm up, then answer ``run`` / ``sync`` / ``memory`` / ``stop``."""
    try:
        cls, extra = SIDES[part][name]
        if opts["dry_run"]:
            extra = tuple([f for f in e if f != "--compile"] if isinstance(e, list) else e for e in extra)
        side = cls(opts, *extra)
        conn.send(("ready", side.info))
        while True:
            cmd, arg = conn.recv()
            if cmd == "stop":
                return
            result = {"run": side.run, "sync": side.sync_check, "memory": lambda _: side.memory()}[cmd](arg)
            conn.send(("ok", result))
    except BaseException:  # noqa: BLE001 - the parent records it and goes on with the other sides
        with contextlib.suppress(Exception):
            conn.send(("error", traceback.format_exc()))


def job_worker(conn, fn_name: str, opts: dict[str, Any], kwargs: dict[str, Any]) -> None:
    try:
        conn.send(("ok", globals()[fn_name](opts, **kwargs)))
    except BaseException:  # noqa: BLE001
        with contextlib.suppress(Exception):
            conn.send(("error", traceback.format_exc()))


class Remote:
    def __init__(self, ctx, target, args: tuple, label: str):
        self.conn, child = ctx.Pipe()
        self.label = label
        self.proc = ctx.Process(target=target, args=(child, *args), daemon=True)
        self.proc.start()

    def wait(self, timeout: float):
        if not self.conn.poll(max(timeout, 0)):
            raise TimeoutError(f"{self.label}: no answer within {timeout:.0f} s")
        kind, value = self.conn.recv()
        if kind == "error":
            raise RuntimeError(f"{self.label} failed:\n{value}")
        return value

    def call(self, cmd: str, arg: Any, timeout: float):
        self.conn.send((cmd, arg))
        return self.wait(timeout)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.send(("stop", None))
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


# -- the parts run in the parent ------------------------------------------------------------------------
class Run:
    def __init__(self, args: argparse.Namespace):
        import torch

        self.args, self.s = args, sizes(args)
        self.start = time.monotonic()
        self.ctx = mp.get_context("spawn")
        self.opts = {**self.s, "dry_run": args.dry_run, "data_dir": args.data_dir, "refs": args.refs}
        self.result: dict[str, Any] = {
            "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "dry_run": args.dry_run,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "sizes": {k: v for k, v in self.s.items()},
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "parts": {}}
        for pkg in ("transformers", "accelerate", "timm", "pyautoattack"):
            with contextlib.suppress(Exception):
                from importlib.metadata import version
                self.result.setdefault("versions", {})[pkg] = version(pkg)

    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.start)

    def save(self) -> None:
        self.result["elapsed_seconds"] = time.monotonic() - self.start
        if self.args.output:
            Path(self.args.output).write_text(json.dumps(self.result, indent=1, default=str))

    def record(self, part: str, value: dict[str, Any]) -> None:
        self.result["parts"][part] = value
        self.save()
        log(f"part {part}: {json.dumps(value, default=str)[:1500]}")

    # -- throughput ------------------------------------------------------------------------------------
    def start_sides(self, part: str) -> dict[str, Remote]:
        return {name: Remote(self.ctx, side_worker, (part, name, self.opts), f"{part}/{name}") for name in SIDES[part]}

    def wait_ready(self, remotes: dict[str, Remote]) -> tuple[dict[str, Remote], dict[str, Any]]:
        """The sides that built and warmed up (their set-up info), the others' errors."""
        ready, sides = {}, {}
        for name, r in remotes.items():
            try:
                sides[name] = {"setup": r.wait(self.left() - 30)}
                ready[name] = r
            except Exception as exc:  # noqa: BLE001
                sides[name] = {"error": str(exc)[-3000:]}
                r.stop()
        return ready, sides

    def throughput(self, part: str, ready: dict[str, Remote], sides: dict[str, Any]) -> None:
        s = self.s
        out: dict[str, Any] = {"sides": sides, "batch_size": s["batch"], "rounds": s["rounds"],
                               "steps_per_round": s["steps_per_round"]}
        try:
            names = list(ready)
            per: dict[str, list[float]] = {n: [] for n in names}
            n = s["steps_per_round"]
            for k in range(s["rounds"] if names else 0):
                if self.left() < 20:
                    out["stopped_early"] = f"out of time after {k} rounds"
                    break
                for name in names[k % len(names):] + names[:k % len(names)]:
                    per[name].append(ready[name].call("run", n, self.left()))
            for name in names:
                secs = per[name]
                if secs:
                    out["sides"][name].update(
                        seconds_per_round=secs, images_per_second=s["batch"] * n * len(secs) / sum(secs),
                        images_per_second_median_round=statistics.median(s["batch"] * n / t for t in secs),
                        **ready[name].call("memory", None, 60))
            ref = next((nm for nm in names if nm.startswith("reference")), None)
            if ref and per[ref]:
                out["ratio_to_reference"] = {
                    nm: statistics.median(a / b for a, b in zip(per[ref], per[nm])) for nm in names if nm != ref and per[nm]}
            self.record(part, out)
            for name in names:
                if self.left() < 15:
                    break
                try:
                    out["sides"][name]["sync_check"] = ready[name].call("sync", s["sync_steps"], self.left())
                except Exception as exc:  # noqa: BLE001
                    out["sides"][name]["sync_check"] = {"error": str(exc)[-2000:]}
        except Exception as exc:  # noqa: BLE001
            out["error"] = traceback.format_exc()[-4000:] + str(exc)[-1000:]
        finally:
            for r in ready.values():
                r.stop()
            self.record(part, out)

    # -- accuracy --------------------------------------------------------------------------------------
    def start_accuracy(self) -> list[dict[str, Any]]:
        s, runs = self.s, []
        work = Path(self.args.work_dir) / "accuracy"
        work.mkdir(parents=True, exist_ok=True)
        for mode, flags in (("fp32", []), ("fast", FAST_FLAGS)):
            if self.args.dry_run:
                flags = [f for f in flags if f != "--compile"]
            for seed in s["seeds"]:
                out = work / f"{mode}-seed{seed}"
                cmd = [sys.executable, str(REPO / "recipes" / "cifar_adr.py"), "--data-dir", self.args.data_dir,
                       "--epochs", str(s["epochs"]), "--seed", str(seed), "--output-dir", str(out),
                       "--final-attacks", "pgd20", "--eval-attacks", "", "--eval-every", "0", "--curve-steps", "1",
                       "--no-progress", "--overwrite", *flags]
                if self.args.dry_run:
                    cmd += ["--max-train-samples", str(s["train_samples"]), "--max-eval-samples", str(s["eval_samples"]),
                            "--batch-size", str(s["batch"]), "--attack-steps", str(s["pgd_steps"])]
                logf = open(work / f"{mode}-seed{seed}.log", "w")
                proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
                runs.append({"mode": mode, "seed": seed, "flags": flags, "out": out, "proc": proc, "log": logf,
                             "cmd": cmd, "t0": time.monotonic()})
        return runs

    def finish_accuracy(self, runs: list[dict[str, Any]]) -> None:
        rows = []
        expected: dict[str, dict[str, Any]] = {
            "fp32": {"compile": False, "channels_last": False, "tf32": False},
            "fast": {"compile": not self.args.dry_run, "channels_last": True, "tf32": True, "mixed_precision": "bf16"}}
        for r in runs:
            row: dict[str, Any] = {"mode": r["mode"], "seed": r["seed"], "flags": r["flags"]}
            try:
                rc = r["proc"].wait(max(self.left() - 10, 1))
            except subprocess.TimeoutExpired:
                r["proc"].kill()
                rc = "killed: out of time"
            r["log"].close()
            row.update(returncode=rc, seconds=time.monotonic() - r["t0"])
            out = r["out"]
            try:
                for which, path in (("model", out / "report.json"), ("ema", out / "ema" / "report.json")):
                    m = json.loads(path.read_text())["metrics"]
                    row[which] = {"clean": m["clean"]["accuracy"],
                                  **{k: d["accuracy"] for k, d in m["adversarial"].items()}, "n": m.get("num_examples")}
                cfgs = sorted(out.glob("checkpoints/*/run_config.json"))
                rc_json = json.loads(cfgs[-1].read_text())
                row["run_config"] = {k: rc_json.get(k) for k in ("compile", "channels_last", "tf32", "mixed_precision",
                                                                  "batch_size", "epochs", "seed")}
                row["flags_reached_trainer"] = all(rc_json.get(k) == v for k, v in expected[r["mode"]].items())
                hist = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
                row["epoch_seconds"] = [h.get("epoch_seconds") for h in hist]
            except Exception as exc:  # noqa: BLE001
                row["error"] = f"{type(exc).__name__}: {exc}"
                row["log_tail"] = (out.parent / f"{r['mode']}-seed{r['seed']}.log").read_text()[-3000:]
            rows.append(row)
            log(f"accuracy run {r['mode']} seed {r['seed']}: run_config {row.get('run_config')}")
        self.record("accuracy", {"epochs": self.s["epochs"], "recipe": "recipes/cifar_adr.py",
                                 "command": " ".join(runs[0]["cmd"][1:]) if runs else None,
                                 "fast_flags": FAST_FLAGS, "runs": rows})

    # -- jobs in a process of their own ---------------------------------------------------------------
    def job(self, part: str, fn: str, **kwargs: Any) -> dict[str, Any]:
        r = Remote(self.ctx, job_worker, (fn, self.opts, kwargs), part)
        try:
            return r.wait(self.left() - 5)
        finally:
            r.stop()


def autoattack_job(opts: dict[str, Any]) -> dict[str, Any]:
    import torch

    from robustkd import create_task
    from robustkd.attacks.base import create_attack
    from robustkd.eval.robustness import evaluate

    dev = device()
    n = opts["aa_points"]
    task = create_task("cifar10", data_dir=opts["data_dir"])
    model = task.load_pretrained("autoattack-example:resnet18")
    if model is None:
        raise RuntimeError("the image task does not load autoattack-example:resnet18")
    model = model.to(dev).eval()
    loader = task.dataloader("test", n, max_samples=n, seed=0, shuffle=False)
    out: dict[str, Any] = {"points": n, "model": "autoattack-example:resnet18", "version": "standard"}
    synchronize()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    res = evaluate(task, model, loader, {"autoattack": create_attack("autoattack", task)})
    synchronize()
    out["robustkd"] = {"seconds": time.perf_counter() - start, "result": res,
                       "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}
    from pyautoattack import AutoAttack

    batch = next(iter(loader))
    x, y = batch["inputs"].to(dev), batch["labels"].to(dev)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    synchronize()
    start = time.perf_counter()
    adversary = AutoAttack(model, norm="Linf", eps=8 / 255, version="standard", device=dev, verbose=False)
    with contextlib.redirect_stdout(io.StringIO()):
        x_adv = adversary.run_standard_evaluation(x, y, bs=n)
    with torch.no_grad():
        robust = (model(x_adv).argmax(1) == y).float().mean().item()
    synchronize()
    out["pyautoattack_direct"] = {"seconds": time.perf_counter() - start, "robust_accuracy": robust,
                                  "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30
                                  if torch.cuda.is_available() else None}
    return out


def hf_job(opts: dict[str, Any], minilm: str, bf16: bool) -> dict[str, Any]:
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
        TrainingArguments,
    )

    from robustkd.hf import RobustConfig, RobustTrainer

    if opts["dry_run"]:
        torch.set_num_threads(1)
    cfg = AutoConfig.from_pretrained(minilm, num_labels=2)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(cfg)  # random weights: the cost does not depend on them
    tok = AutoTokenizer.from_pretrained(minilm)
    b, seq = opts["hf_batch"], opts["hf_seq"]
    total = opts["hf_warmup"] + opts["hf_steps"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, tok.vocab_size, (b * total, seq), generator=g)
    ids[:, 0], ids[:, -1] = tok.cls_token_id, tok.sep_token_id
    labels = torch.randint(0, 2, (b * total,), generator=g)
    data = [{"input_ids": ids[i], "attention_mask": torch.ones(seq, dtype=torch.long), "labels": labels[i]}
            for i in range(b * total)]
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            synchronize()
            times.append(time.perf_counter() - self.t)

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=b, max_steps=total, save_strategy="no",
                                 report_to=[], logging_steps=10**6, dataloader_num_workers=0, seed=0, bf16=bf16,
                                 use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
        robust = RobustConfig(method="adr", max_length=seq)
        trainer = RobustTrainer(model=model, args=args, train_dataset=data, processing_class=tok, robust=robust,
                                callbacks=[Clock()])
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    timed = times[opts["hf_warmup"]:]
    return {"architecture": cfg.architectures, "hidden_size": cfg.hidden_size, "layers": cfg.num_hidden_layers,
            "weights": "random (from config.json)", "batch_size": b, "seq_len": seq, "bf16": bf16,
            "method": "adr", "attack": "the text task's default training attack, 10 steps",
            "timed_steps": len(timed), "seconds_per_step_median": statistics.median(timed) if timed else None,
            "sequences_per_second": b * len(timed) / sum(timed) if timed else None,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="adr,mtard,accuracy,autoattack,hf")
    p.add_argument("--refs", required=True, help="folder with the ADR, MTARD and MTARD-extension checkouts")
    p.add_argument("--data-dir", required=True, help="the CIFAR-10 parquet folder (train and test splits)")
    p.add_argument("--minilm", default=None, help="a MiniLM folder (config.json + tokenizer) for the hf part")
    p.add_argument("--output", default=None, help="the JSON, rewritten after each part")
    p.add_argument("--work-dir", default=None, help="where the accuracy runs write (default: a temporary folder)")
    p.add_argument("--budget-s", type=float, default=400, help="stop starting work after this many seconds")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--steps-per-round", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None, help="accuracy: training epochs")
    p.add_argument("--seeds", default=None, help="accuracy: comma-separated seeds")
    p.add_argument("--aa-points", type=int, default=None)
    p.add_argument("--dry-run", action="store_true", default=os.environ.get("ROBUSTKD_GPU_DRY_RUN") == "1",
                   help="every part at toy size on the CPU (also ROBUSTKD_GPU_DRY_RUN=1)")
    args = p.parse_args()
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = sorted(set(parts) - {"adr", "mtard", "accuracy", "autoattack", "hf"})
    problems = [f"unknown part(s) {unknown}: choose from adr, mtard, accuracy, autoattack, hf"] if unknown else []
    if {"adr", "mtard"} & set(parts):
        problems += [f"--refs {args.refs}: {sub} is missing" for sub in ("ADR/src/advTrainer.py",
                     "MTARD/mtard/mtard_loss.py", "MTARD-extension/resnet18_mtard_cifar10.py")
                     if not (Path(args.refs) / sub).exists()]
    if not (Path(args.data_dir) / "train-00000-of-00001.parquet").exists():
        problems.append(f"--data-dir {args.data_dir}: no train-00000-of-00001.parquet there")
    if "hf" in parts and not (args.minilm and (Path(args.minilm) / "config.json").exists()):
        problems.append("the hf part needs --minilm DIR with the MiniLM config.json and tokenizer")
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        sys.exit(2)
    import torch

    if not torch.cuda.is_available() and not args.dry_run:
        print("error: bench/gpu_throughput.py measures the GPU path and needs a CUDA device, but none is visible "
              "(torch.cuda.is_available() is False); --dry-run checks the script at toy size on the CPU",
              file=sys.stderr)
        sys.exit(2)
    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="gpu-bench-work-")
    args.data_dir, args.refs = str(Path(args.data_dir).resolve()), str(Path(args.refs).resolve())
    run = Run(args)
    run.save()
    # accuracy runs and the throughput sides' set-up (compilation) overlap; the timed rounds wait for both
    acc_runs = run.start_accuracy() if "accuracy" in parts else []
    remotes = {part: run.start_sides(part) for part in ("adr", "mtard") if part in parts}
    if acc_runs:
        run.finish_accuracy(acc_runs)
    ready = {part: run.wait_ready(rs) for part, rs in remotes.items()}  # every side warm before any is timed
    for part, (rs, sides) in ready.items():
        run.throughput(part, rs, sides)
    if "autoattack" in parts:
        try:
            run.record("autoattack", run.job("autoattack", "autoattack_job"))
        except Exception as exc:  # noqa: BLE001
            run.record("autoattack", {"error": str(exc)[-4000:]})
    if "hf" in parts:
        out: dict[str, Any] = {}
        for bf16 in (False, True):
            key = "bf16" if bf16 else "fp32"
            if run.left() < 30:
                out[key] = {"skipped": "out of time"}
                continue
            try:
                out[key] = run.job(f"hf-{key}", "hf_job", minilm=args.minilm, bf16=bf16)
            except Exception as exc:  # noqa: BLE001
                out[key] = {"error": str(exc)[-4000:]}
            run.record("hf", out)
    run.result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    run.save()
    print(json.dumps(run.result, indent=1, default=str))


if __name__ == "__main__":
    main()
