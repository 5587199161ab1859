"""MTARD: entropy and loss balance, the KL losses, state across save/resume and processes,
teacher loading and its errors, and an end-to-end run on the shared CIFAR subset."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from robustkd.attacks.pgd import PGD
from robustkd.distill.balance import EntropyBalance, LossBalance, entropy
from robustkd.distill.methods import Progress
from robustkd.distill.mtard import MTARD
from robustkd.task import ContinuousTask
from robustkd.teachers import FrozenTeacher, load_teacher
from robustkd.threat import ThreatModel

REPO = Path(__file__).resolve().parents[1]


# -- a tiny vector task: hand-computable and fast ------------------------------------------------
class _Rows(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"inputs": self.x[i], "labels": self.y[i]}


class VecTask(ContinuousTask):
    name, modality, num_classes = "vec", "vector", 3

    def __init__(self, n: int = 48, dim: int = 4, eps: float = 0.0, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.dim, self.eps = dim, eps
        self.data = {s: _Rows(torch.randn(n, dim, generator=g), torch.randint(0, 3, (n,), generator=g))
                     for s in ("train", "test")}

    def dataset(self, split):
        return self.data[split]

    def build_model(self, name, **kwargs):
        return nn.Linear(self.dim, self.num_classes)

    def threat_model(self, eps=None, norm=None, **kwargs):
        return ThreatModel(self.eps if eps is None else eps, norm or "linf", domain=None)


class FixedLogits(nn.Module):
    """Returns the same logits for every input (gradient still flows to ``logits``)."""

    def __init__(self, logits, trainable=False):
        super().__init__()
        t = torch.tensor(logits, dtype=torch.float32)
        self.logits = nn.Parameter(t) if trainable else nn.Parameter(t, requires_grad=False)

    def forward(self, x):
        return self.logits[: x.shape[0]] + 0.0 * x.sum()


def _frozen(module: nn.Module) -> FrozenTeacher:
    return FrozenTeacher(module.eval())


def _batch(task, n=4):
    data = task.dataset("train")
    return torch.utils.data.default_collate([data[i] for i in range(n)])


# -- host-float views of the balance state (each a device sync: for hand computation only) ----------
def _temps(eb: EntropyBalance) -> tuple[float, float]:
    t_adv, t_nat = eb.t.tolist()
    return t_adv, t_nat


def _set_temps(eb: EntropyBalance, t_adv: float, t_nat: float) -> None:
    eb.t = torch.tensor([t_adv, t_nat], dtype=eb.t.dtype, device=eb.t.device)


def _entropy_step(eb: EntropyBalance, e_adv: float, e_nat: float, milestones_passed: int = 0) -> tuple[float, float]:
    eb.step(torch.tensor([e_adv, e_nat], dtype=torch.float64, device=eb.t.device), milestones_passed)
    return _temps(eb)


def _solve(eb: EntropyBalance, adv: torch.Tensor, nat: torch.Tensor) -> tuple[float, float]:
    t_adv, t_nat = eb.solve(adv, nat).tolist()
    return t_adv, t_nat


def _weights(lb: LossBalance) -> tuple[float, float]:
    w_adv, w_nat = lb.w.tolist()
    return w_adv, w_nat


def _initial_losses(lb: LossBalance) -> tuple[float, float] | None:
    return tuple(lb.l0.tolist()) if bool(lb.l0_set) else None


def _losses(lb: LossBalance, l_adv: float, l_nat: float) -> torch.Tensor:
    return torch.tensor([l_adv, l_nat], dtype=torch.float64, device=lb.w.device)


def _propose(lb: LossBalance, l_adv: float, l_nat: float, milestones_passed: int = 0) -> tuple[float, float]:
    w_adv, w_nat = lb.propose_t(_losses(lb, l_adv, l_nat), milestones_passed).tolist()
    return w_adv, w_nat


def _commit(lb: LossBalance, l_adv: float, l_nat: float, milestones_passed: int = 0) -> tuple[float, float]:
    lb.commit_t(_losses(lb, l_adv, l_nat), milestones_passed)
    return _weights(lb)


def _plain(state):
    """A state dict with tensors as lists (JSON-able, comparable with ==)."""
    if isinstance(state, dict):
        return {k: _plain(v) for k, v in state.items()}
    return state.tolist() if isinstance(state, torch.Tensor) else state


def _step(method: MTARD, student: nn.Module, batch, progress=None):
    """One MTARD step as the trainer runs it (without the optimizer)."""
    progress = progress or Progress()
    student.eval()
    prepared = method.prepare(student, batch, progress)
    student.train()
    loss, logs = method.loss(student, batch, prepared, progress)
    method.after_step(student, progress)
    return loss, logs


# -- the KL losses of METHODS.md §2 ------------------------------------------------------------
def _softmax(row, t=1.0):
    m = max(v / t for v in row)
    e = [math.exp(v / t - m) for v in row]
    return [v / sum(e) for v in e]


@pytest.mark.parametrize("scale", ["batchmean", "reference"])
def test_kl_losses_match_hand_computation(scale):
    task = VecTask()
    robust = [[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]]
    clean = [[4.0, -2.0, 0.0], [0.0, 1.0, -1.0]]
    stud = [[1.0, 1.0, 0.0], [-1.0, 0.0, 2.0]]
    method = MTARD(task, PGD(task, steps=1), clean_teacher=_frozen(FixedLogits(clean)),
                   robust_teacher=_frozen(FixedLogits(robust)), entropy_balance="off", loss_balance=False,
                   kl_scale=scale)
    _set_temps(method.entropy, 2.0, 1.5)
    student = FixedLogits(stud, trainable=True)
    loss, logs = _step(method, student, _batch(task, 2))

    def kl(teacher, t):
        total = 0.0
        for zt, zs in zip(teacher, stud):
            p, q = _softmax(zt, t), _softmax(zs)
            if scale == "batchmean":
                total += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
            else:
                total += sum(pi * (math.log(pi + 1e-5) - math.log(qi)) for pi, qi in zip(p, q)) / 3
        return total / 2

    assert float(logs["loss_adv"]) == pytest.approx(kl(robust, 2.0), rel=1e-5)
    assert float(logs["loss_nat"]) == pytest.approx(kl(clean, 1.5), rel=1e-5)
    assert float(loss.detach()) == pytest.approx(0.5 * kl(robust, 2.0) + 0.5 * kl(clean, 1.5), rel=1e-5)
    loss.backward()
    assert student.logits.grad is not None and student.logits.grad.abs().sum() > 0


# -- Normalization Loss Balance -----------------------------------------------------------------
def test_loss_balance_follows_hand_computed_sequence():
    lb = LossBalance(eta=0.025, beta=1.0)
    # step 0 stores L0 = (2, 1): r = (1, 1), target (.5, .5), weights stay .5
    # step 1: r = (.75, .9), target_adv = .75 / 1.65, w_adv = .5 - .025 * (.5 - .454545...) = .4988636...
    # step 2: r = (.5, .8), target_adv = .5 / 1.3; step 3: r = (.25, .7), target_adv = .25 / .95
    # step 4 after one LR milestone (eta .0025): r = (.3, .2), target_adv = .6
    expected = [(0.5, 0.5), (0.49886363636363634, 0.5011363636363636), (0.49600743006993003, 0.5039925699300699),
                (0.4901861916866029, 0.5098138083133972), (0.4904607262073864, 0.5095392737926137)]
    losses = [(2.0, 1.0), (1.5, 0.9), (1.0, 0.8), (0.5, 0.7), (0.6, 0.2)]
    for i, ((la, ln), (wa, wn)) in enumerate(zip(losses, expected)):
        proposed = _propose(lb, la, ln, milestones_passed=int(i == 4))
        got = _commit(lb, la, ln, milestones_passed=int(i == 4))
        assert proposed == got
        assert got[0] == pytest.approx(wa, abs=1e-12) and got[1] == pytest.approx(wn, abs=1e-12)
    assert _initial_losses(lb) == (2.0, 1.0)
    assert int(lb.steps) == 5 and lb.w.dtype == lb.l0.dtype == torch.float64


def test_loss_balance_beta_clip_and_off():
    lb = LossBalance(eta=1.0, beta=2.0)
    _commit(lb, 1.0, 1.0)
    # r = (2, 1) -> r^2 = (4, 1) -> target (.8, .2); eta 1 jumps onto the target
    assert _commit(lb, 2.0, 1.0) == pytest.approx((0.8, 0.2))
    off = LossBalance(enabled=False)
    for la, ln in [(3.0, 1.0), (1.0, 5.0)]:
        assert _commit(off, la, ln) == (0.5, 0.5)
    with pytest.raises(ValueError, match="eta"):
        LossBalance(eta=-1)
    # a non-finite loss leaves the weights and L0 as they are and is counted (no host sync to raise)
    nan = LossBalance()
    assert _commit(nan, float("nan"), 1.0) == (0.5, 0.5) and _initial_losses(nan) is None
    assert int(nan.nonfinite_count) == 1
    _commit(nan, 2.0, 1.0)
    assert _initial_losses(nan) == (2.0, 1.0) and int(nan.nonfinite_count) == 1


def test_method_weights_follow_loss_balance_in_training_steps():
    """Through MTARD itself: the weights used in step k are the update from step k's losses."""
    task = VecTask(eps=0.1)
    torch.manual_seed(0)
    method = MTARD(task, clean_teacher=_frozen(nn.Linear(4, 3)), robust_teacher=_frozen(nn.Linear(4, 3)),
                   entropy_balance="off")
    student = nn.Linear(4, 3)
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    mirror = LossBalance()
    for _ in range(4):
        loss, logs = _step(method, student, _batch(task, 8))
        la, ln = float(logs["loss_adv"]), float(logs["loss_nat"])
        wa, wn = _commit(mirror, la, ln)
        assert float(loss.detach()) == pytest.approx(wa * la + wn * ln, rel=1e-6)
        assert _weights(method.balance) == pytest.approx((wa, wn), abs=1e-12)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert _weights(method.balance) != (0.5, 0.5)


# -- Entropy-Based Balance ----------------------------------------------------------------------
def _mismatched_logits(n=64, c=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    confident = 5.0 * torch.randn(n, c, generator=g)  # low entropy (0.53 nats)
    soft = 1.5 * torch.randn(n, c, generator=g)  # high entropy (1.57 nats)
    return confident, soft


@pytest.mark.parametrize("confident_is", ["adv", "nat"])
def test_exact_mode_equalises_mean_entropies(confident_is):
    confident, soft = _mismatched_logits()
    adv, nat = (confident, soft) if confident_is == "adv" else (soft, confident)
    eb = EntropyBalance("exact")
    assert abs(entropy(adv).mean() - entropy(nat).mean()) > 0.5  # deliberately mismatched
    t_adv, t_nat = _solve(eb, adv, nat)
    assert abs(float(entropy(adv, t_adv).mean() - entropy(nat, t_nat).mean())) < 1e-3
    hot = t_adv if confident_is == "adv" else t_nat
    cold = t_nat if confident_is == "adv" else t_adv
    assert hot > 1.5 and cold == 1.0  # the confident teacher is softened, the other stays at t_min


def test_exact_mode_stops_at_the_upper_bound():
    confident, soft = _mismatched_logits()
    eb = EntropyBalance("exact", t_max=1.5)
    t_adv, t_nat = _solve(eb, confident, soft)
    assert (t_adv, t_nat) == (1.5, 1.0)
    assert entropy(confident, 1.5).mean() < entropy(soft).mean()


def test_exact_mode_inside_mtard_balances_each_batch():
    task = VecTask(eps=0.1)
    torch.manual_seed(1)
    sharp, soft = nn.Linear(4, 3), nn.Linear(4, 3)
    with torch.no_grad():
        sharp.weight.mul_(6)
        soft.weight.mul_(0.2)
    method = MTARD(task, clean_teacher=_frozen(sharp), robust_teacher=_frozen(soft), entropy_balance="exact")
    student = nn.Linear(4, 3)
    batch = _batch(task, 16)
    student.eval()
    prepared = method.prepare(student, batch, Progress())
    h_adv = -(prepared.extras["p_adv"] * prepared.extras["p_adv"].log()).sum(1).mean()
    h_nat = -(prepared.extras["p_nat"] * prepared.extras["p_nat"].log()).sum(1).mean()
    assert abs(float(h_adv - h_nat)) < 1e-3
    t_adv, t_nat = _temps(method.entropy)
    assert 1.0 < t_nat < 10.0 and t_adv == 1.0


def test_reference_mode_sign_steps_clamped_and_decayed():
    eb = EntropyBalance("reference", lr=0.001)
    # E = mean p log p (negative); the clean teacher is more confident (E_nat closer to 0)
    # t_adv clamped at 1, t_nat up one step
    assert _entropy_step(eb, e_adv=-0.20, e_nat=-0.05) == pytest.approx((1.0, 1.001))
    # step decayed x0.1 after one LR milestone
    assert _entropy_step(eb, e_adv=-0.20, e_nat=-0.05, milestones_passed=1)[1] == pytest.approx(1.0011)
    # now the robust teacher is the confident one
    assert _entropy_step(eb, e_adv=-0.05, e_nat=-0.20) == pytest.approx((1.001, 1.0001))
    assert _entropy_step(eb, e_adv=-0.1, e_nat=-0.1) == pytest.approx((1.001, 1.0001))  # balanced: no move
    assert int(eb.steps) == 4 and eb.t.dtype == torch.float64
    top = EntropyBalance("reference", lr=0.001, init=(1.0, 9.9995))
    assert _entropy_step(top, e_adv=-0.2, e_nat=-0.01)[1] == 10.0
    off = EntropyBalance("off")
    assert _entropy_step(off, -0.2, -0.01) == (1.0, 1.0) and int(off.steps) == 0


def test_reference_mode_in_mtard_raises_the_confident_teachers_temperature():
    task = VecTask(eps=0.1)
    torch.manual_seed(2)
    sharp, soft = nn.Linear(4, 3), nn.Linear(4, 3)
    with torch.no_grad():
        sharp.weight.mul_(20)
        soft.weight.mul_(0.1)
    method = MTARD(task, clean_teacher=_frozen(sharp), robust_teacher=_frozen(soft))
    student = nn.Linear(4, 3)
    for k in range(1, 4):
        _step(method, student, _batch(task, 8))
        t_adv, t_nat = _temps(method.entropy)
        assert t_nat == pytest.approx(1 + 0.001 * k)
        assert t_adv == 1.0
    logs = method.log_values(Progress())
    assert logs["mtard_t_nat"] == pytest.approx(1.003) and logs["mtard_entropy_adv"] > logs["mtard_entropy_nat"]


# -- state: round trip, Trainer resume, two processes ------------------------------------------
def test_state_dict_round_trip_and_mismatch():
    task = VecTask(eps=0.1)
    kw = dict(clean_teacher=_frozen(nn.Linear(4, 3)), robust_teacher=_frozen(nn.Linear(4, 3)))
    method = MTARD(task, **kw)
    student = nn.Linear(4, 3)
    for _ in range(3):
        _step(method, student, _batch(task, 8))
    state = method.state_dict()
    fresh = MTARD(task, **kw)
    fresh.load_state_dict(state)
    assert _plain(fresh.state_dict()) == _plain(state)
    assert bool(state["loss_balance"]["l0_set"]) and state["entropy"]["steps"] == 3
    _step(method, student, _batch(task, 8))
    assert state["entropy"]["steps"] == 3  # a copy: later steps leave it as it is
    with pytest.raises(ValueError, match="entropy-balance"):
        MTARD(task, entropy_balance="exact", **kw).load_state_dict(state)
    with pytest.raises(ValueError, match="loss-balance"):
        MTARD(task, loss_balance=False, **kw).load_state_dict(state)
    with pytest.raises(ValueError, match="kl-scale"):
        MTARD(task, kl_scale="batchmean", **kw).load_state_dict(state)


def test_a_checkpoint_from_before_the_buffers_still_loads():
    """State dicts written when the balance state was host floats load into the buffers."""
    task = VecTask(eps=0.1)
    kw = dict(clean_teacher=_frozen(nn.Linear(4, 3)), robust_teacher=_frozen(nn.Linear(4, 3)))
    old = {"entropy": {"mode": "reference", "t_adv": 1.0, "t_nat": 1.003, "steps": 3},
           "loss_balance": {"enabled": True, "w_adv": 0.49, "w_nat": 0.51, "init_adv": 2.0, "init_nat": 1.5,
                            "steps": 3},
           "kl_scale": "reference", "robust_teacher": "frozen"}
    method = MTARD(task, **kw)
    method.load_state_dict(old)
    assert _temps(method.entropy) == (1.0, 1.003) and _weights(method.balance) == (0.49, 0.51)
    assert _initial_losses(method.balance) == (2.0, 1.5) and int(method.balance.steps) == 3
    assert method.entropy.t.dtype == method.balance.w.dtype == torch.float64
    _step(method, nn.Linear(4, 3), _batch(task, 8))  # and training goes on from there
    state = method.state_dict()
    assert state["entropy"]["steps"] == 4 and state["loss_balance"]["_extra_state"] == {"enabled": True}
    fresh = MTARD(task, **kw)
    fresh.load_state_dict({**old, "loss_balance": {**old["loss_balance"], "init_adv": None, "init_nat": None}})
    assert _initial_losses(fresh.balance) is None  # saved before the first update
    with pytest.raises(ValueError, match="entropy-balance reference"):
        MTARD(task, entropy_balance="exact", **kw).load_state_dict(old)
    refused = MTARD(task, loss_balance=False, **kw)
    with pytest.raises(ValueError, match="loss-balance"):
        refused.load_state_dict(old)
    assert _temps(refused.entropy) == (1.0, 1.0)  # refused before anything changed


def test_balance_state_is_buffers_that_setup_moves_to_the_students_device():
    task = VecTask(eps=0.1)
    method = MTARD(task, clean_teacher=_frozen(nn.Linear(4, 3)), robust_teacher=_frozen(nn.Linear(4, 3)))
    assert isinstance(method.entropy, nn.Module) and isinstance(method.balance, nn.Module)
    assert set(dict(method.entropy.named_buffers())) == {"t", "steps"}
    assert set(dict(method.balance.named_buffers())) == {"w", "l0", "l0_set", "nonfinite_count", "steps"}
    method.setup(nn.Linear(4, 3, device="meta"), None)  # the trainer's student, on its device
    for module in (method.entropy, method.balance):
        assert {b.device.type for b in module.buffers()} == {"meta"}
    assert method.entropy.t.dtype == method.balance.w.dtype == torch.float64  # the dtype stays
    # a batch on another device than the state is refused in one line, naming the fix
    with pytest.raises(RuntimeError, match=r"balance state is on meta .* method\.setup\(model, ema\)"):
        _step(method, nn.Linear(4, 3), _batch(task, 8))
    # by hand: MTARD.to moves every buffer and keeps each one's dtype
    other = MTARD(task, clean_teacher=_frozen(nn.Linear(4, 3)), robust_teacher=_frozen(nn.Linear(4, 3)))
    assert other.to("meta") is other
    assert {k: (v.device.type, v.dtype) for k, v in other.balance.state_dict().items() if k != "_extra_state"} == {
        "w": ("meta", torch.float64), "l0": ("meta", torch.float64), "l0_set": ("meta", torch.bool),
        "nonfinite_count": ("meta", torch.float64), "steps": ("meta", torch.int64)}


def test_trainer_resume_restores_temperatures_and_weights(tmp_path):
    from robustkd.trainer import TrainConfig, Trainer

    task = VecTask(n=32, eps=0.1)

    def make(epochs, resume):
        torch.manual_seed(0)
        teachers = dict(clean_teacher=_frozen(nn.Linear(4, 3)), robust_teacher=_frozen(nn.Linear(4, 3)))
        method = MTARD(task, PGD(task, steps=2, random_start="normal"), temp_lr=0.01, **teachers)
        cfg = TrainConfig(epochs=epochs, batch_size=8, lr=0.05, eval_attacks=[], eval_every=0, cpu=True,
                          output_dir=str(tmp_path), resume=resume, progress=False)
        return Trainer(task, task.build_model("linear"), method, cfg), method

    trainer, method = make(1, False)
    trainer.fit()
    saved = _plain(method.state_dict())
    assert saved["loss_balance"]["steps"] == 4 and saved["entropy"]["steps"] == 4
    assert saved["loss_balance"]["w"][0] != 0.5
    trainer2, method2 = make(2, True)
    assert _plain(method2.state_dict()) != saved
    assert trainer2.resume()
    assert _plain(method2.state_dict()) == saved
    trainer2.config.resume = False
    history = trainer2.fit()
    assert method2.state_dict()["loss_balance"]["steps"] == 8
    assert "mtard_t_adv" in history[-1] and "mtard_w_nat" in history[-1]


DDP_SCRIPT = r'''
import json, os, sys
import torch
from torch import nn
sys.path.insert(0, {tests!r})
from test_mtard import VecTask, _frozen, _plain
from robustkd.attacks.pgd import PGD
from robustkd.distill.mtard import MTARD
from robustkd.trainer import TrainConfig, Trainer

task = VecTask(n=64, eps=0.1)
for mode in ("reference", "exact"):
    torch.manual_seed(0)
    teachers = dict(clean_teacher=_frozen(nn.Linear(4, 3)), robust_teacher=_frozen(nn.Linear(4, 3)))
    method = MTARD(task, PGD(task, steps=2, random_start="normal"), entropy_balance=mode, temp_lr=0.01, **teachers)
    local = []
    original = method.loss
    def spy(model, batch, prepared, progress, original=original, local=local):
        loss, logs = original(model, batch, prepared, progress)
        local.append(float(logs["loss_adv"]))
        return loss, logs
    method.loss = spy
    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.05, eval_attacks=[], eval_every=0, cpu=True,
                      output_dir=os.path.join(sys.argv[1], "run-" + mode), progress=False)
    trainer = Trainer(task, task.build_model("linear"), method, cfg)
    trainer.fit()
    rank = trainer.accelerator.process_index
    with open(os.path.join(sys.argv[1], f"{{mode}}-rank{{rank}}.json"), "w") as f:
        json.dump({{"state": _plain(method.state_dict()), "local_losses": local,
                   "world": trainer.accelerator.num_processes}}, f)
'''


@pytest.mark.distributed
def test_two_processes_keep_identical_temperatures_and_weights(tmp_path):
    script = tmp_path / "ddp_mtard.py"
    script.write_text(DDP_SCRIPT.format(tests=str(REPO / "tests")))
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for mode in ("reference", "exact"):
        r0 = json.loads((tmp_path / f"{mode}-rank0.json").read_text())
        r1 = json.loads((tmp_path / f"{mode}-rank1.json").read_text())
        assert r0["world"] == r1["world"] == 2
        assert r0["local_losses"] != r1["local_losses"]  # the ranks saw different data...
        assert r0["state"] == r1["state"]  # ...yet hold the same temperatures, weights and initial losses
        assert r0["state"]["loss_balance"]["steps"] == 4
        assert r0["state"]["entropy"]["t"] != [1.0, 1.0]


# -- bad input ------------------------------------------------------------------------------------
def test_bad_teachers_and_options_are_refused():
    task = VecTask()
    good = _frozen(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="train mode"):
        MTARD(task, clean_teacher=nn.Linear(4, 3).train(), robust_teacher=good)
    drifting = _frozen(nn.Linear(4, 3))
    method = MTARD(task, clean_teacher=good, robust_teacher=drifting)
    drifting.model.train()
    with pytest.raises(ValueError, match="robust teacher is in train mode"):
        method.setup(nn.Linear(4, 3), None)
    with pytest.raises(ValueError, match="only the robust teacher may be 'ema'"):
        MTARD(task, clean_teacher="ema", robust_teacher=good)
    with pytest.raises(ValueError, match="robust_teacher='runs/x'"):
        MTARD(task, clean_teacher=good, robust_teacher="runs/x")
    with pytest.raises(ValueError, match="unknown entropy balance"):
        MTARD(task, clean_teacher=good, robust_teacher=good, entropy_balance="auto")
    with pytest.raises(ValueError, match="unknown KL scale"):
        MTARD(task, clean_teacher=good, robust_teacher=good, kl_scale="sum")
    with pytest.raises(ValueError, match="t_min <= t_max"):
        MTARD(task, clean_teacher=good, robust_teacher=good, t_min=5, t_max=2)
    wrong = MTARD(task, PGD(task, steps=1), clean_teacher=_frozen(nn.Linear(4, 5)), robust_teacher=good)
    with pytest.raises(ValueError, match="clean teacher returns logits of shape .* 3 classes"):
        wrong.prepare(nn.Linear(4, 3).eval(), _batch(task), Progress())
    ema_method = MTARD(task, clean_teacher=good, robust_teacher="ema")
    assert ema_method.needs_ema and ema_method.teachers == [good]
    with pytest.raises(ValueError, match="needs an EMA teacher"):
        ema_method.setup(nn.Linear(4, 3), None)


def test_load_teacher_errors(tmp_path, cifar_task):
    from safetensors.torch import save_model

    from robustkd.checkpoint import save_model_dir

    probe = _cifar_probe(cifar_task)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_teacher(tmp_path / "missing", cifar_task, probe=probe)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a robustkd output directory"):
        load_teacher(tmp_path / "empty", cifar_task, probe=probe)
    net = cifar_task.build_model("small_cnn")
    save_model_dir(tmp_path / "ok", net, None, {"task": "cifar10", "num_classes": 10, "model": "small_cnn"})
    teacher = load_teacher(tmp_path / "ok", cifar_task, probe=probe)
    assert isinstance(teacher, FrozenTeacher) and not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())
    save_model_dir(tmp_path / "c100", net, None, {"task": "cifar100", "num_classes": 100, "model": "small_cnn"})
    with pytest.raises(ValueError, match="100 classes"):
        load_teacher(tmp_path / "c100", cifar_task, probe=probe)
    save_model_dir(tmp_path / "bad", net, None, {"task": "cifar10", "num_classes": 10, "model": "small_cnn"})
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_teacher(tmp_path / "bad", cifar_task, probe=probe)
    other = cifar_task.build_model("preact_resnet18")
    save_model(other, str(tmp_path / "ok" / "model.safetensors"))  # weights of another architecture
    with pytest.raises(ValueError, match="do not fit the model"):
        load_teacher(tmp_path / "ok", cifar_task, probe=probe)
    with pytest.raises(ValueError, match="could not load the pretrained timm model"):
        load_teacher("timm:no_such_model_xyz", cifar_task, probe=probe)
    with pytest.raises(ValueError, match="'ema' is not a file teacher"):
        load_teacher("ema", cifar_task, probe=probe)


def _cifar_probe(task):
    data = task.dataset("test")
    return task.collate_fn("test")([data[i] for i in range(2)])


def _hf_vit(path, image_size=32, num_labels=10):
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=image_size, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=32, num_labels=num_labels)
    ViTForImageClassification(cfg).save_pretrained(path)
    (Path(path) / "preprocessor_config.json").write_text(json.dumps(
        {"do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))


def test_load_teacher_hugging_face_directory(tmp_path, cifar_task):
    probe = _cifar_probe(cifar_task)
    _hf_vit(tmp_path / "vit")
    teacher = load_teacher(tmp_path / "vit", cifar_task, probe=probe)
    assert teacher.logits(cifar_task, probe).shape == (2, 10)
    _hf_vit(tmp_path / "vit5", num_labels=5)
    with pytest.raises(ValueError, match="5 classes but the task 'cifar10' has 10"):
        load_teacher(tmp_path / "vit5", cifar_task, probe=probe)
    _hf_vit(tmp_path / "vit64", image_size=64)
    with pytest.raises(ValueError, match="64x64 images"):
        load_teacher(tmp_path / "vit64", cifar_task, probe=probe)
    small = {"inputs": probe["inputs"][:, :, :16, :16], "labels": probe["labels"]}
    with pytest.raises(ValueError, match="input shape differs"):
        load_teacher(tmp_path / "vit", cifar_task, probe=small)


# -- end to end on the shared CIFAR subset ----------------------------------------------------------
def _run_recipe(path: Path, argv: list[str], monkeypatch) -> None:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None, f"{path} is not a Python file"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [str(path), *argv])
    module.main()


def test_end_to_end_pipeline_on_cifar(tmp_path, cifar_dir, monkeypatch):
    """The offline pipeline in miniature: a natural teacher from cifar_adr.py, then MTARD with frozen
    teachers (the same small run serves as both, to keep the test fast) and teacher-free MTARD."""
    common = ["--data-dir", cifar_dir, "--model", "small_cnn", "--max-train-samples", "32", "--max-eval-samples",
              "16", "--epochs", "1", "--batch-size", "16", "--eval-every", "0", "--final-attacks", "pgd:steps=2",
              "--attack-steps", "2", "--no-progress", "--cpu", "--curve-steps", "2"]
    adr = REPO / "recipes" / "cifar_adr.py"
    mtard = REPO / "recipes" / "cifar_mtard.py"
    _run_recipe(adr, [*common, "--method", "standard", "--output-dir", str(tmp_path / "clean")], monkeypatch)
    _run_recipe(mtard, [*common, "--clean-teacher", str(tmp_path / "clean"), "--robust-teacher", str(tmp_path / "clean"),
                        "--output-dir", str(tmp_path / "mtard")], monkeypatch)
    report = json.loads((tmp_path / "mtard" / "report.json").read_text())
    assert report["schema_version"] == 1 and report["model"]["method"] == "mtard"
    assert 0.0 <= report["metrics"]["clean"]["accuracy"] <= 1.0 and "pgd:steps=2" in report["metrics"]["adversarial"]
    # the recipe's default is the MTARD CIFAR-10 script: no entropy balance, the script's KL scale
    assert report["run"]["preset"] == "mtard/cifar10/resnet18"
    assert report["method"]["entropy_balance"]["mode"] == "off" and report["method"]["kl_scale"] == "reference"
    settings = report["run"]["settings"]
    assert settings["milestones"] == [1] and settings["weight_decay"] == 2e-4 and settings["attack_mode"] == "eval"
    assert report["balance"]["epoch"] == [1] and report["balance"]["t_nat"][0] >= 1.0
    assert 0.0 <= report["balance"]["w_adv"][0] <= 1.0
    assert (tmp_path / "mtard" / "balance.png").stat().st_size > 0
    metrics = [json.loads(x) for x in (tmp_path / "mtard" / "metrics.jsonl").read_text().splitlines()]
    assert {"mtard_t_adv", "mtard_t_nat", "mtard_w_adv", "mtard_w_nat"} <= set(metrics[-1])
    assert (tmp_path / "mtard" / "model.safetensors").exists()
    _run_recipe(mtard, [*common, "--clean-teacher", str(tmp_path / "clean"), "--robust-teacher", "ema",
                        "--entropy-balance", "exact", "--output-dir", str(tmp_path / "mtard_ema")], monkeypatch)
    report = json.loads((tmp_path / "mtard_ema" / "report.json").read_text())
    assert report["run"]["settings"]["robust_teacher"] == "ema" and "ema" in report
    assert report["run"]["overrides"]["entropy_balance"] == "exact" and report["method"]["entropy_balance"]["mode"] == "exact"
    assert (tmp_path / "mtard_ema" / "ema" / "report.json").exists()
    assert (tmp_path / "mtard_ema" / "ema.safetensors").exists()
    with pytest.raises(FileNotFoundError, match="teacher .* does not exist"):
        _run_recipe(mtard, [*common, "--clean-teacher", str(tmp_path / "nope"), "--robust-teacher", "ema",
                            "--output-dir", str(tmp_path / "never")], monkeypatch)
    assert not (tmp_path / "never").exists()  # refused before any training


def test_teacher_model_dir_reaches_only_the_robustbench_teachers(tmp_path, cifar_task, cifar_dir, monkeypatch, capsys):
    """--teacher-model-dir (and a threat model) are RobustBench's: load_teachers passes the directory only to a
    robustbench:NAME teacher, the other teacher forms refuse these options when given them directly, and a
    --teacher-model-dir that no teacher reads is refused before anything runs."""
    import robustkd.teachers as teachers_module
    from robustkd.config import ConfigError, load_teachers

    calls: dict[str, dict] = {}

    def record(spec, task, **options):
        calls[str(spec)] = options
        return _frozen(nn.Linear(4, 10))

    with monkeypatch.context() as m:  # the routing: a timm clean teacher with a RobustBench robust teacher
        m.setattr(teachers_module, "load_teacher", record)
        load_teachers({"method": "mtard", "clean_teacher": "timm:resnet18", "robust_teacher": "robustbench:Ding2020MMA",
                       "teacher_model_dir": str(tmp_path / "models")}, cifar_task)
    assert calls == {"timm:resnet18": {"which": "auto", "name": "clean"},
                     "robustbench:Ding2020MMA": {"which": "auto", "name": "robust", "model_dir": str(tmp_path / "models")}}
    # the other forms refuse RobustBench's options in one line instead of ignoring them
    for spec in ("autoattack-example:resnet18", "timm:resnet18", f"resnet18:{tmp_path / 'w.pt'}"):
        for option, value in (("model_dir", str(tmp_path)), ("threat_model", "L2")):
            with pytest.raises(TypeError, match=rf"the model '{spec}' takes no {option} option: it is RobustBench's"):
                cifar_task.load_pretrained(spec, **{option: value})
    capsys.readouterr()
    from robustkd.cli import main as cli_main

    rc = cli_main(["eval", "--model", "autoattack-example:resnet18", "--model-dir", str(tmp_path / "m"), "--task",
                   "cifar10", "--data-dir", cifar_dir, "--output-dir", str(tmp_path / "ev")])
    err = capsys.readouterr().err
    assert rc == 2 and "takes no --model-dir" in err and err.count("\n") == 1 and not (tmp_path / "ev").exists()
    # a --teacher-model-dir no teacher reads: refused by the recipe's settings, before any training
    common = ["--data-dir", cifar_dir, "--model", "small_cnn", "--max-train-samples", "16", "--epochs", "1",
              "--no-progress", "--cpu"]
    with pytest.raises(ConfigError, match=r"--teacher-model-dir is where robustbench:NAME teachers' files are, but no "
                                          r"teacher is one \(--clean-teacher autoattack-example:resnet18, "
                                          r"--robust-teacher ema\)"):
        _run_recipe(REPO / "recipes" / "cifar_mtard.py",
                    [*common, "--clean-teacher", "autoattack-example:resnet18", "--robust-teacher", "ema",
                     "--teacher-model-dir", str(tmp_path / "models"), "--output-dir", str(tmp_path / "never")],
                    monkeypatch)
    assert not (tmp_path / "never").exists()


def test_a_clean_teacher_and_a_robustbench_teacher_from_teacher_model_dir_load(tmp_path, cifar_task):
    """The shipped pyautoattack model as the clean teacher and a zoo architecture in RobustBench's layout under
    --teacher-model-dir as the robust one: each loads (the directory reaches only the RobustBench teacher)."""
    from robustkd.config import load_teachers
    from robustkd.robustbench import checkpoint_path, zoo_entry

    name = "Ding2020MMA"
    torch.manual_seed(0)
    net = zoo_entry(name, "cifar10", "Linf")["model"]()
    path = checkpoint_path(tmp_path / "models", "cifar10", "Linf", name)
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": net.state_dict()}, path)
    loaded = load_teachers({"method": "mtard", "clean_teacher": "autoattack-example:resnet18",
                            "robust_teacher": f"robustbench:{name}", "teacher_model_dir": str(tmp_path / "models")},
                           cifar_task)
    assert isinstance(loaded["clean_teacher"], FrozenTeacher) and isinstance(loaded["robust_teacher"], FrozenTeacher)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded["robust_teacher"].model(x), net.eval()(x))
