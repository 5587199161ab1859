"""The plug-in's own tests: robustkd's conformance kit, as any plug-in would run it."""
from robustkd_tabular import RandomSearch, tabular_blobs

from robustkd.testing import check_attack, check_task


def test_task_conforms():
    check_task(tabular_blobs())


def test_attack_conforms():
    task = tabular_blobs()
    check_attack(RandomSearch, task, task.build_model("tabular_mlp"))
