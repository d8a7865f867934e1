"""Properties a refactor must keep, each stated so that a one-line slip breaks it.

Every test here was checked against a planted bug that the rest of the suite let through:
the encoder adding the position embeddings of the first K patches instead of the kept ones;
augmentation seeded without the epoch; RandomResizedCrop scale (0.08, 1) in one backend; the K
*lowest* texture values kept visible; one texture shared by a whole batch; the per-rank micro-batch
computed without the world size; k-NN on unnormalised features.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval.knn import knn_predict
from model import build_mae
from noise import MaskGenerator
from pipelines import LoaderConfig, build_loader
from pipelines.base import IMAGENET_MEAN, IMAGENET_STD, TRAIN_SCALE

# ffcv's numba-compiled pipelines raise a harmless KeyError in numba's finalizer at garbage collection.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

ROOT = Path(__file__).resolve().parent.parent


# --- model: each kept patch carries its own position --------------------------------------------


def test_encoder_adds_each_kept_patch_its_own_position_embedding():
    torch.manual_seed(0)
    model = build_mae("demo", img_size=32, depth=1, decoder_depth=1).eval()
    images = torch.randn(2, 3, 32, 32)
    patches, visible = model.num_patches, model.num_patches // 4
    mask = torch.ones(2, patches, dtype=torch.bool)  # kept patches are never the first K
    mask[0, patches - visible :] = False
    mask[1, torch.randperm(patches - visible)[:visible] + visible] = False
    seen = []
    hook = model.blocks[0].register_forward_pre_hook(lambda _module, inputs: seen.append(inputs[0]))
    with torch.no_grad():
        model(images, mask)
        hook.remove()
        tokens = model.patch_embed(images) + model.pos_embed[:, 1:]
    first_block_input = seen[0]
    cls = (model.cls_token + model.pos_embed[:, :1]).expand(2, -1, -1)
    torch.testing.assert_close(first_block_input[:, :1], cls)
    for row in range(2):
        expected = tokens[row, ~mask[row]]
        got = first_block_input[row, 1:]
        # The encoder may order the kept tokens as it likes; each must be one kept patch's token.
        distance = torch.cdist(got, expected)
        assert distance.min(dim=1).values.max() < 1e-4
        assert sorted(distance.argmin(dim=1).tolist()) == list(range(visible))


# --- loaders: augmentation and crop scale ------------------------------------------------------


def _save(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


@pytest.fixture(scope="module")
def one_image_per_class(tmp_path_factory) -> Path:
    """4 classes of one distinct 96x96 image each: a label names the image it came from."""
    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(0)
    for label in range(4):
        _save(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8), root / f"c{label}" / "image.png")
    return root


def _images_by_label(loader) -> dict[int, torch.Tensor]:
    return {int(y): x for batch in loader for x, y in zip(batch["images"], batch["labels"], strict=True)}


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_augmentation_is_seeded_per_epoch(one_image_per_class, backend):
    def epoch(number: int) -> dict[int, torch.Tensor]:
        cfg = LoaderConfig(loader=backend, data=str(one_image_per_class), img_size=32, patch_size=8,
                           batch_size=4, workers=0 if backend == "torch" else 1, schedule=None, seed=3)
        loader = build_loader(cfg)
        loader.set_epoch(number)
        return _images_by_label(loader)

    first, again, second = epoch(0), epoch(0), epoch(1)
    assert sorted(first) == [0, 1, 2, 3]
    for label, image in first.items():
        assert torch.equal(again[label], image), "the same (seed, epoch) must give the same crops"
        assert not torch.equal(second[label], image), "a new epoch must draw new crops"


@pytest.fixture(scope="module")
def coordinate_images(tmp_path_factory) -> Path:
    """48 copies of a 256x256 PNG whose red value is the column and green value the row."""
    root = tmp_path_factory.mktemp("coordinates")
    ramp = np.arange(256, dtype=np.uint8)
    image = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], np.uint8(128)), axis=-1)
    for index in range(48):
        _save(np.ascontiguousarray(image), root / "all" / f"{index:02d}.png")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "dali", "ffcv"])
def test_training_crops_cover_at_least_the_minimum_scale(coordinate_images, backend):
    size = 32
    cfg = LoaderConfig(loader=backend, data=str(coordinate_images), img_size=size, patch_size=8,
                       batch_size=16, workers=0 if backend == "torch" else 1, schedule=None)
    images = torch.cat([batch["images"] for batch in build_loader(cfg)])
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    pixels = (images * std + mean) * 255
    # Output pixel centres span (S - 1) / S of the crop: the ramp's rise gives the crop's side.
    width = (pixels[:, 0, :, -1] - pixels[:, 0, :, 0]).abs().mean(dim=1) * size / (size - 1)
    height = (pixels[:, 1, -1, :] - pixels[:, 1, 0, :]).abs().mean(dim=1) * size / (size - 1)
    area = width * height / 256**2
    assert len(area) == 48
    # Resampling blurs the ramp's ends a little: allow 10% below the minimum scale.
    assert area.min() >= 0.9 * TRAIN_SCALE[0], f"{backend}: smallest crop covers {area.min():.3f}"
    assert area.max() > 0.5  # the crops do vary in size


# --- masks: the K highest values of each sample's own texture stay visible ----------------------


def _canonical(visible: np.ndarray) -> tuple:
    """A visible pattern (G, G) up to wrap-around shifts, flips and transposes."""
    grid = visible.shape[0]
    forms = []
    for transpose, flip_rows, flip_cols in itertools.product((False, True), repeat=3):
        pattern = visible.T if transpose else visible
        pattern = pattern[::-1] if flip_rows else pattern
        pattern = pattern[:, ::-1] if flip_cols else pattern
        cells = np.argwhere(pattern)
        for dr, dc in itertools.product(range(grid), repeat=2):
            forms.append(tuple(sorted(map(tuple, (cells + np.array([dr, dc])) % grid))))
    return min(forms)


def test_each_sample_keeps_the_top_values_of_its_own_texture(tmp_path):
    grid, textures, visible = 8, 16, 16  # ratio 0.75 on an 8 x 8 grid keeps 16 patches
    rng = np.random.default_rng(0)
    bank = np.empty((textures, grid, grid), dtype=np.float32)
    signatures = set()
    for index in range(textures):
        bank[index] = rng.permutation(grid * grid).reshape(grid, grid)
        signatures.add(_canonical(bank[index] >= grid * grid - visible))
    path = tmp_path / "patterns.npz"
    np.savez(path, patterns=bank)
    generator = MaskGenerator("white", grid=grid, mask_ratio=0.75, bank_path=path, seed=1)
    masks = np.asarray(generator(64, epoch=0, index=0))
    assert (~masks).sum(axis=1).tolist() == [visible] * 64
    forms = [_canonical(~mask.reshape(grid, grid)) for mask in masks]
    assert set(forms) <= signatures, "a visible set is not the top values of any texture"
    assert len(set(forms)) >= textures // 2, "samples of one batch must draw their own textures"


# --- trainer: the per-rank micro-batch ----------------------------------------------------------


@pytest.mark.slow
def test_two_ranks_split_each_step_between_them(tmp_path, random_image_folder):
    images = random_image_folder(tmp_path / "train", 24)  # 48 images: 6 steps of 8, 4 per rank
    argv = ["--config", str(ROOT / "configs" / "demo.yaml"), f"data.path={images}",
            f"log.runs_root={tmp_path}", "model.args={depth: 1, decoder_depth: 1}", "data.workers=0",
            "train.batch_size=8", "train.epochs=1", "train.warmup_epochs=0", "train.steps_per_epoch=null",
            "log.mlflow=false"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "train.py"), *argv]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "demo" / "checkpoint-last.pth", weights_only=True)
    assert checkpoint["step"] == 48 // 8
    assert [state["samples"] for state in checkpoint["loader"]] == [48, 48]  # the whole epoch, read together


# --- evaluation: k-NN compares directions, not lengths ------------------------------------------


def test_knn_predictions_ignore_feature_lengths():
    generator = torch.Generator().manual_seed(0)
    train = torch.randn(200, 8, generator=generator)
    labels = torch.randint(0, 5, (200,), generator=generator)
    test = torch.randn(50, 8, generator=generator)
    reference = knn_predict(train, labels, test, 5, k=10)
    train_scale = torch.rand(200, 1, generator=generator) * 100 + 0.01
    test_scale = torch.rand(50, 1, generator=generator) * 100 + 0.01
    assert torch.equal(knn_predict(train * train_scale, labels, test * test_scale, 5, k=10), reference)
