"""bench/reproduce.py: the on-device augmentation (run here on the CPU) and a tiny end-to-end budget."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import reproduce

from eval import seg_data


def test_full_crop_without_flip_is_a_plain_resize():
    pixels = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    generator = torch.Generator().manual_seed(0)
    crops = reproduce.random_resized_crop(pixels, 32, generator, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    resized = F.interpolate(pixels[:, None].float() / 255, size=(32, 32), mode="bilinear",
                            align_corners=False)
    flipped = resized.flip(-1)
    for crop, plain, mirrored in zip(crops, reproduce.normalise(resized), reproduce.normalise(flipped),
                                     strict=True):
        assert torch.allclose(crop, plain, atol=1e-4) or torch.allclose(crop, mirrored, atol=1e-4)


def test_crops_differ_per_sample_and_follow_the_seed():
    pixels = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8).expand(8, -1, -1)
    first = reproduce.random_resized_crop(pixels, 32, torch.Generator().manual_seed(1))
    again = reproduce.random_resized_crop(pixels, 32, torch.Generator().manual_seed(1))
    assert torch.equal(first, again)
    assert len({crop.sum().item() for crop in first}) == 8  # every sample its own crop


@pytest.mark.skipif(not list(Path(seg_data.FASHION_MNIST_DIR).glob("*idx3-ubyte*")),
                    reason="Debian package dataset-fashion-mnist is not installed")
def test_tiny_budget_writes_report_and_json(tmp_path):
    budget = ["--train-images", "128", "--test-images", "64", "--batch-size", "32", "--seg-train", "16",
              "--seg-test", "8", "--probe-epochs", "1"]
    result = reproduce.main(["--quick", "--masks", "random,green", "--seeds", "0", *budget, "--device", "cpu",
                             "--out", str(tmp_path / "results.md"), "--json", str(tmp_path / "runs.json")])
    runs = json.loads((tmp_path / "runs.json").read_text())["runs"]
    assert [(r["mask"], r["seed"]) for r in runs] == [("random", 0), ("green", 0)]
    for run in runs:
        assert {"knn", "linear", "miou", "pretrain_seconds"} <= set(run)
        assert 0 <= run["miou"] <= 1 and 0 < run["knn"] <= 1 and run["pretrain_seconds"] > 0
    report = (tmp_path / "results.md").read_text()
    assert "| random |" in report and "| green |" in report and "raw pixels" in report
    assert "bench/reproduce.py --quick" in report and "Hardware: CPU" in report
    assert result["raw_pixels"]["knn"] > 0.3  # Fashion-MNIST pixels alone are far above chance
