"""Every image data source loads to the same contract: uint8 storage, [0, 1] float batches."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from robustkd_tasks.image import collate_augment, load_images

from robustkd import create_task
from robustkd.task import DataNotFoundError


def _write_cifar_batches(root, n=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": list(range(n))}, f)


def test_torchvision_cifar_folder(tmp_path):
    _write_cifar_batches(tmp_path)
    task = create_task("cifar10", data_dir=str(tmp_path))
    assert len(task.dataset("train")) == 20 and len(task.dataset("test")) == 4
    batch = next(iter(task.dataloader("test", 4)))
    assert batch["inputs"].shape == (4, 3, 32, 32) and batch["inputs"].dtype == torch.float32
    assert 0 <= batch["inputs"].min() and batch["inputs"].max() <= 1


def test_image_folder_tree_is_resized_and_counts_its_classes(tmp_path):
    for split in ("train", "test"):
        for c, colour in enumerate(("red", "blue", "green")):
            d = tmp_path / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 48), colour).save(d / f"{i}.png")
    task = create_task("imagefolder", data_dir=str(tmp_path), image_size=32)
    assert task.num_classes == 3
    x = task.dataset("train").images
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.uint8
    assert sorted(task.dataset("test").labels.tolist()) == [0, 0, 1, 1, 2, 2]


def test_shared_parquet_subset_has_the_documented_size(cifar_task):
    assert len(cifar_task.dataset("train")) == 5085 and len(cifar_task.dataset("test")) == 1017
    labels = cifar_task.dataset("train").labels
    assert labels.min() == 0 and labels.max() == 9


def test_parquet_folder_without_the_split_says_what_it_found(tmp_path, cifar_dir):
    import shutil

    shutil.copy(f"{cifar_dir}/test-00000-of-00001.parquet", tmp_path / "test-00000-of-00001.parquet")
    load_images.cache_clear()
    with pytest.raises(DataNotFoundError, match="no 'train' split"):
        create_task("cifar10", data_dir=str(tmp_path)).dataset("train")


def test_augmentation_is_a_padded_crop_or_its_mirror():
    torch.manual_seed(0)
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    out = collate_augment([{"inputs": img, "labels": torch.tensor(1)}])["inputs"][0]
    padded = torch.nn.functional.pad(img.float() / 255, (4, 4, 4, 4))
    crops = [padded[:, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
    assert any(torch.equal(out, c) or torch.equal(out, c.flip(2)) for c in crops)
    assert out.shape == (3, 32, 32) and 0 <= out.min() and out.max() <= 1


def test_models_by_name_including_timm(cifar_task):
    x = torch.rand(2, 3, 32, 32)
    for name in ("small_cnn", "preact_resnet18", "timm:resnet10t"):
        model = cifar_task.build_model(name).eval()
        with torch.no_grad():
            assert model(x).shape == (2, 10), name
    wrn = cifar_task.build_model("wrn34_10")
    assert 46e6 < sum(p.numel() for p in wrn.parameters()) < 47e6


def test_synthetic_data_only_by_name():
    task = create_task("synthetic")
    assert task.name == "synthetic" and len(task.dataset("train")) == 512


def test_the_image_module_keeps_every_import_path_of_its_split_parts():
    import robustkd_tasks.image as image
    from robustkd_tasks import image_data, image_pretrained

    for name in ("ImageTensorDataset", "augment_images", "collate_augment", "collate_eval", "load_images"):
        assert getattr(image, name) is getattr(image_data, name), name
    for name in ("HFImageClassifier", "load_hf_image_classifier", "load_timm_pretrained"):
        assert getattr(image, name) is getattr(image_pretrained, name), name


@pytest.mark.parametrize("make", [
    lambda: create_task("cifar10", data_dir="unused", norm="l3"),
    lambda: create_task("synthetic").threat_model(norm="l3"),
])
def test_an_unknown_norm_is_refused_where_it_enters(make):
    with pytest.raises(ValueError, match=r"unknown norm 'l3': use 'linf' or 'l2'"):
        make()


def test_a_hugging_face_image_classifier_takes_mean_and_std_together():
    from robustkd_tasks.image import HFImageClassifier

    with pytest.raises(ValueError, match="give both mean and std"):
        HFImageClassifier(torch.nn.Identity(), mean=[0.5, 0.5, 0.5])


def _hf_vit_dir(path):
    import json

    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=32, num_labels=10)
    ViTForImageClassification(cfg).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    return path


@pytest.mark.parametrize("kind", ["hf_dir", "timm"])
def test_eval_refuses_no_normalize_for_models_that_bring_their_normalisation(kind, tmp_path, cifar_dir, capsys):
    """``--no-normalize`` is for state-dict models; a Hugging Face directory or a timm model refuses it
    (before any weights are read) instead of running with a normalisation the user turned off."""
    from robustkd.cli import main

    spec = str(_hf_vit_dir(tmp_path / "vit")) if kind == "hf_dir" else "timm:resnet18"
    capsys.readouterr()
    code = main(["eval", "--task", "cifar10", "--data-dir", str(cifar_dir), "--model", spec, "--no-normalize",
                 "--attacks", "fgsm", "--max-eval-samples", "4", "--output-dir", str(tmp_path / "eval"),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "takes no --no-normalize" in lines[0] and spec in lines[0], err[-2000:]
    assert "Traceback" not in err
    if kind == "hf_dir":  # without the flag the directory loads, its own normalisation inside
        model = create_task("cifar10", data_dir=str(cifar_dir)).load_pretrained(spec)
        assert type(model).__name__ == "HFImageClassifier" and model.mean is not None
