"""eval/reproduce.py: the on-device augmentation (run here on the CPU), the controlled pretraining through
train.py's step, and a tiny end-to-end budget."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from eval import reproduce, seg_data
from model import build_mae
from noise import MASK_TYPES


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


TINY = {"embed_dim": 48, "depth": 1, "num_heads": 2, "decoder_embed_dim": 32, "decoder_depth": 1,
        "decoder_num_heads": 2}


def record_pretraining(monkeypatch, mask: str, seed: int, data: dict, args) -> dict:
    """Run `reproduce.pretrain` and keep what its model saw: initial weights, image and mask batches."""
    seen = {"images": [], "masks": []}

    def spy_build(*args, **kwargs):
        mae = build_mae(*args, **{**kwargs, **TINY})  # a small model: the test is about what it is fed
        seen["initial"] = {name: tensor.clone() for name, tensor in mae.state_dict().items()}
        forward = mae.forward

        def spy_forward(images, mask=None, *rest, **options):  # options: the step's mask_ratio, num_visible
            seen["images"].append(images.clone())
            seen["masks"].append(mask.clone())
            return forward(images, mask, *rest, **options)

        mae.forward = spy_forward
        return mae

    monkeypatch.setattr(reproduce, "build_mae", spy_build)
    torch.rand(7)  # whatever ran before must not matter
    reproduce.pretrain(mask, seed, data, args)
    return seen


def test_one_seed_is_a_controlled_experiment_only_the_mask_differs(monkeypatch):
    args = reproduce.parse_args(["--quick", "--batch-size", "16", "--epochs", "2", "--device", "cpu"])
    data = {"train_pixels": torch.randint(0, 256, (48, 28, 28), dtype=torch.uint8)}
    random, green, other_seed = (record_pretraining(monkeypatch, mask, seed, data, args)
                                 for mask, seed in (("random", 0), ("green", 0), ("random", 1)))
    assert len(random["images"]) == len(green["images"]) == 2 * 3  # 2 epochs of 3 steps
    for name, tensor in random["initial"].items():
        assert torch.equal(tensor, green["initial"][name]), name
    for step, (a, b) in enumerate(zip(random["images"], green["images"], strict=True)):
        assert torch.equal(a, b), f"step {step}: the two masks saw different images"
    assert all(not torch.equal(a, b) for a, b in zip(random["masks"], green["masks"], strict=True))
    # the invariant is not vacuous: another seed starts elsewhere and sees other batches
    assert not all(torch.equal(random["initial"][n], other_seed["initial"][n]) for n in random["initial"])
    assert not torch.equal(random["images"][0], other_seed["images"][0])


def test_budgets_and_the_gpu_budget_table_size():
    gpu = reproduce.parse_args(["--budget", "gpu"])
    assert (gpu.masks, len(gpu.seeds)) == (list(MASK_TYPES), 3) and gpu.train_images == 60000
    assert reproduce.parse_args(["--quick"]).budget == "quick"
    assert reproduce.parse_args([]).budget == "full"
    assert reproduce.parse_args(["--model-args", "embed_dim=48, depth=2"]).model_args == {"embed_dim": 48,
                                                                                           "depth": 2}
    for wrong in (["--quick", "--budget", "gpu"], ["--masks", "random,pink"], ["--model-args", "depth"]):
        with pytest.raises(SystemExit) as exit_info:
            reproduce.parse_args(wrong)
        assert exit_info.value.code == 2, wrong


@pytest.mark.skipif(not list(Path(seg_data.FASHION_MNIST_DIR).glob("*idx3-ubyte*")),
                    reason="Debian package dataset-fashion-mnist is not installed")
def test_tiny_budget_writes_report_and_json(tmp_path):
    budget = ["--train-images", "128", "--test-images", "64", "--batch-size", "32", "--seg-train", "16",
              "--seg-test", "8", "--probe-epochs", "1", "--finetune-images", "32", "--finetune-epochs", "1",
              "--model-args", "embed_dim=48,depth=1,decoder_embed_dim=32,decoder_depth=1"]
    (tmp_path / "results.md").write_text(f"old table\n{reproduce.report.KEPT_HEADING}\nhand-written\n")
    result = reproduce.main(["--quick", "--masks", "random,green", "--seeds", "0", *budget, "--device", "cpu",
                             "--out", str(tmp_path / "results.md"), "--json", str(tmp_path / "runs.json")])
    runs = json.loads((tmp_path / "runs.json").read_text())["runs"]
    assert [(r["mask"], r["seed"]) for r in runs] == [("untrained", 0), ("random", 0), ("green", 0)]
    for run in runs:
        assert 0 <= run["miou"] <= 1 and 0 < run["knn"] <= 1 and 0 <= run["finetune"] <= 1
        assert (run["pretrain_seconds"] > 0) == (run["mask"] != "untrained")
    report = (tmp_path / "results.md").read_text()
    assert "| random |" in report and "| green |" in report and "| untrained |" in report
    assert "raw pixels" in report and "A wiring check, not a result" in report
    assert "old table" not in report and report.endswith(f"\n{reproduce.report.KEPT_HEADING}\nhand-written\n")
    link = report.split("calibrated table is [docs/results.md](")[1].split(")")[0]
    assert (tmp_path / link).resolve() == reproduce.report.CALIBRATED_PAGE  # the quick page links the table
    assert "-m eval.reproduce --quick" in report and "Hardware: CPU" in report
    assert result["raw_pixels"]["knn"] > 0.3  # Fashion-MNIST pixels alone are far above chance
    assert len({run["fingerprint"] for run in runs}) == 1
    assert f"Fingerprint {runs[0]['fingerprint']}" in report and "![knn](results-charts/knn.png)" in report
    assert "cannot tell: needs two seeds with both masks" in report  # one seed: no test possible
    assert "estimated_seconds" in result and {p.name for p in (tmp_path / "results-charts").iterdir()} == {
        "knn.png", "linear.png", "miou.png", "finetune.png"}
