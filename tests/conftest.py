"""Shared test fixtures: the ../shared data, offline settings, small thread counts."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ROBUSTKD_SHARED", REPO.parent / "shared")).resolve()

os.environ.setdefault("NLTK_DATA", str(SHARED / "data" / "nltk_data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests need a CUDA device: skipped, with the reason, where there is none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared() -> Path:
    """The read-only shared data folder (``ROBUSTKD_SHARED`` or ``../shared``)."""
    if not SHARED.is_dir():
        raise FileNotFoundError(f"the shared data folder {SHARED} is missing: set ROBUSTKD_SHARED")
    return SHARED


@pytest.fixture(scope="session")
def cifar_dir(shared: Path) -> str:
    return str(shared / "data" / "cifar10" / "plain_text")


@pytest.fixture(scope="session")
def cifar_task(cifar_dir: str):
    from robustkd import create_task

    return create_task("cifar10", data_dir=cifar_dir)
