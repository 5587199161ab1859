"""Conformance kit for task and attack plug-ins, in the spirit of scikit-learn's ``check_estimator``.

A plug-in author runs it in their own test suite to learn, check by check, whether the plug-in
honours the contracts the rest of robustkd relies on::

    from robustkd.testing import check_task, check_attack

    def test_my_task():
        check_task(MyTask(), model="my_mlp")            # raises ConformanceError naming the failing check

    def test_my_attack():
        task = MyTask()
        check_attack(MyAttack, task, task.build_model("my_mlp"))

Each check reports ``(name, passed, message)``; :func:`check_task` / :func:`check_attack` return a
:class:`ConformanceReport` and, by default, raise :class:`ConformanceError` (an ``AssertionError``, so
pytest shows it as a plain failure) when any check fails. :func:`task_checks` / :func:`attack_checks`
return the checks one by one for ``pytest.mark.parametrize``. The slow 2-process check (a real
``torchrun`` run of the trainer on gloo) runs only with ``distributed=True``.

Layout: :mod:`.kit` (check results, reports, the ``Check`` runner and shared helpers),
:mod:`.task_checks`, :mod:`.attack_checks`, and :mod:`.distributed` (the 2-process harness, run as
``python -m robustkd.testing.distributed`` by the ``distributed`` task check).
"""
from __future__ import annotations

from .attack_checks import attack_checks, check_attack
from .kit import Check, CheckResult, ConformanceError, ConformanceReport
from .task_checks import check_task, task_checks

__all__ = ["CheckResult", "ConformanceError", "ConformanceReport", "Check", "attack_checks", "check_attack",
           "check_task", "task_checks"]
