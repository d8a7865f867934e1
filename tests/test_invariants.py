"""Invariants across ranks, batch splits, backends, epochs and mask banks, each checked against a value
the test fixes itself or an independent slow reference, never against the code under test.

Each test was seen failing with a planted one-line bug (named in its docstring) before it passed.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import run_folder
import train
from model import MaskedAutoencoderViT
from model.checkpoint import read_checkpoint
from noise import MaskGenerator
from pipelines import BACKENDS, LoaderConfig, build_loader
from pipelines.base import IMAGENET_MEAN, IMAGENET_STD

# ffcv's numba-compiled pipelines raise a harmless KeyError in numba's finalizer at garbage collection.
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]

ROOT = Path(__file__).resolve().parent.parent
CROP_SCALE, CROP_RATIO = (0.2, 1.0), (3 / 4, 4 / 3)  # the recipe's RandomResizedCrop, fixed here
BASE_LR, GLOBAL_BATCH = 1e-3, 8


@pytest.fixture(scope="module")
def images(tmp_path_factory, random_image_folder) -> Path:
    """48 random 32x32 PNGs in two class folders."""
    return random_image_folder(tmp_path_factory.mktemp("images") / "train", 24)


def args(images: Path, runs: Path, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "configs" / "demo.yaml"), f"data.path={images}", f"log.runs_root={runs}",
            "model.args={depth: 1, decoder_depth: 1}", f"train.batch_size={GLOBAL_BATCH}", "data.workers=0",
            "train.warmup_epochs=0", f"train.base_lr={BASE_LR}", "log.every_steps=1", "log.mlflow=false",
            *extra]


# --- the trainer across ranks: one torchrun job (gloo, 2 CPU processes) feeds two tests -----------
# A one-step run on 1 rank gives the starting point; its checkpoint, given a second rank whose random
# states the test draws itself, is resumed by 2 ranks, which then take one step of a fixed global batch.

RANKS_SCRIPT = """
import os, random, sys
import numpy as np, torch
import run_folder
import train

out, *argv = sys.argv[1:]
rank = int(os.environ["RANK"])
cfg = train.parse_args(argv)[0]
run = train.build(cfg, run_folder.resume_point(cfg, None, world=int(os.environ["WORLD_SIZE"])))
torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
           os.path.join(out, f"rng-{rank}.pt"))
batch = torch.load(os.path.join(out, "batch.pt"))
block = len(batch["images"]) // run.world
train.train_step(run, iter([{k: v[rank * block:(rank + 1) * block] for k, v in batch.items()}]))
if rank == 0:
    torch.save({"weights": run.model.state_dict(), "lr": run.optimizer.param_groups[0]["lr"]},
               os.path.join(out, "split.pt"))
torch.distributed.destroy_process_group()
"""
# The step after the resume: 1 of 1000 cosine steps without warm-up, so the lr is the peak (to 3e-6).
AFTER = ("train.epochs=1000", "train.steps_per_epoch=1")


def resumed(argv: list[str], accept: tuple[str, ...] = ()) -> train.Run:
    """The run that `argv` continues from its run folder's checkpoint, built as train.main builds it
    (`accept`: changed keys continued on purpose, as --continue-with)."""
    cfg = train.parse_args(argv)[0]
    return train.build(cfg, run_folder.resume_point(cfg, None, world=1, accept=accept), accept)


def global_batch() -> dict[str, torch.Tensor]:
    """GLOBAL_BATCH images and masks fixed by the test (16 of 64 patches visible in each)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=generator)
    return {"images": images, "mask": torch.rand(GLOBAL_BATCH, 64, generator=generator).argsort(dim=1) >= 16}


def drawn_states(seed: int) -> dict:
    """Random states the test draws itself, in the checkpoint's format."""
    torch_state = torch.Generator().manual_seed(seed).get_state()
    kind, keys, pos, has_gauss, gauss = np.random.RandomState(seed).get_state()
    return {"torch": torch_state, "cuda": None, "python": random.Random(seed).getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}


@pytest.fixture(scope="module")
def two_ranks(images, tmp_path_factory) -> Path:
    """The folder holding the 1-rank start (one/) and what RANKS_SCRIPT wrote under torchrun (two/)."""
    out = tmp_path_factory.mktemp("ranks")
    train.main(args(images, out / "one", "train.epochs=1", "train.steps_per_epoch=1"))
    ckpt = torch.load(out / "one" / "demo" / "checkpoint-last.pth", weights_only=True)
    ckpt.update(loader=ckpt["loader"] * 2, rng=[drawn_states(1), drawn_states(2)])
    (out / "two" / "demo").mkdir(parents=True)
    torch.save(ckpt, out / "two" / "demo" / "checkpoint-last.pth")
    torch.save(global_batch(), out / "batch.pt")
    (out / "ranks.py").write_text(RANKS_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(out / "ranks.py"), str(out), *args(images, out / "two", *AFTER)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_after_a_resume_every_rank_has_its_saved_random_states(two_ranks):
    """Planted: every rank restores rank 0's states (`ckpt["rng"][0]`); numpy's state not restored."""
    for rank, saved in enumerate((drawn_states(1), drawn_states(2))):
        now = torch.load(two_ranks / f"rng-{rank}.pt", weights_only=False)
        assert torch.equal(now["torch"], saved["torch"]), f"rank {rank}: torch"
        kind, keys, pos, has_gauss, gauss = saved["numpy"]
        numpy_now = now["numpy"]
        assert (numpy_now[0], numpy_now[1].tolist(), *numpy_now[2:]) == (kind, keys.tolist(), pos, has_gauss,
                                                                         gauss), f"rank {rank}: numpy"
        assert tuple(now["python"]) == tuple(saved["python"]), f"rank {rank}: python"


@pytest.mark.gpu
def test_a_resume_restores_the_cuda_random_state(images, tmp_path):
    """The CUDA generator's state, on the GPU twin of the 1-rank resume. Planted: the CUDA state not set."""
    options = ("train.device=cuda", "train.epochs=1", "train.steps_per_epoch=1")
    train.main(args(images, tmp_path, *options))
    saved = torch.load(tmp_path / "demo" / "checkpoint-last.pth", weights_only=True)["rng"][0]["cuda"]
    torch.cuda.manual_seed(12345)
    resumed(args(images, tmp_path, "train.device=cuda", *AFTER))
    assert torch.equal(torch.cuda.get_rng_state(), saved)


def test_one_step_leaves_the_same_weights_however_the_global_batch_is_split(images, tmp_path, two_ranks):
    """From one checkpoint, one step of the same 8 images and masks as 1 rank x 1 micro-batch, 1 rank x
    2 micro-batches and 2 ranks x 1 micro-batch: the same weights, at the peak lr base_lr x 8 / 256.
    Planted: the lr scaled by the per-rank micro-batch; the loss not divided by the accumulation steps."""
    expected_lr = BASE_LR * GLOBAL_BATCH / 256
    results, batch = {}, global_batch()
    for accum in (1, 2):
        runs = tmp_path / str(accum)
        shutil.copytree(two_ranks / "one", runs)
        run = resumed(args(images, runs, *AFTER, f"train.accum_steps={accum}"), accept=("train.accum_steps",))
        micro = GLOBAL_BATCH // accum
        train.train_step(run, iter([{k: v[i:i + micro] for k, v in batch.items()}
                                    for i in range(0, GLOBAL_BATCH, micro)]))
        lr = run.optimizer.param_groups[0]["lr"]
        results[f"1 rank, accumulation {accum}"] = (run.model.state_dict(), lr)
    split = torch.load(two_ranks / "split.pt", weights_only=True)
    results["2 ranks"] = (split["weights"], split["lr"])
    before = torch.load(two_ranks / "one" / "demo" / "checkpoint-last.pth", weights_only=True)["model"]
    (reference, _), *_ = results.values()
    assert any(not torch.equal(reference[k], before[k]) for k in before)
    for name, (weights, lr) in results.items():
        assert lr == pytest.approx(expected_lr, rel=1e-5), name
        for key, tensor in reference.items():
            torch.testing.assert_close(weights[key], tensor, rtol=1e-4, atol=1e-6, msg=f"{name}: {key}")


# --- the loaders: crop scale and per-epoch augmentation on every backend --------------------------


def _save(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


@pytest.fixture(scope="module")
def coordinates(tmp_path_factory) -> Path:
    """96 copies of a 256x256 PNG whose red value is the column and green value the row."""
    root = tmp_path_factory.mktemp("coordinates")
    ramp = np.arange(256, dtype=np.uint8)
    image = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], np.uint8(128)), axis=-1)
    image = np.ascontiguousarray(image)
    for index in range(96):
        _save(image, root / "all" / f"{index:02d}.png")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_training_crops_span_the_recipe_scale_and_ratio(coordinates, backend):
    """The crops' area shares reach down to 0.2 (not below, not stopping short) and up towards 1, with
    side ratios in [3/4, 4/3]. Planted: scale (0.08, 1) in pipelines.base; (0.5, 1) in the ffcv backend."""
    size = 32
    cfg = LoaderConfig(loader=backend, data=str(coordinates), img_size=size, patch_size=8, batch_size=16,
                       workers=0 if backend == "torch" else 1, schedule=None)
    images = torch.cat([batch["images"] for batch in build_loader(cfg)])
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    pixels = (images * std + mean) * 255
    # Output pixel centres span (S - 1) / S of the crop: the ramp's rise gives the crop's sides.
    width = (pixels[:, 0, :, -1] - pixels[:, 0, :, 0]).abs().mean(dim=1) * size / (size - 1) / 256
    height = (pixels[:, 1, -1, :] - pixels[:, 1, 0, :]).abs().mean(dim=1) * size / (size - 1) / 256
    area, ratio = width * height, width / height
    assert len(area) == 96
    # Resampling blurs the ramp's ends a little: 10% of slack on the measured sides and areas.
    assert 0.9 * CROP_SCALE[0] <= area.min() < 0.32, f"{backend}: smallest crop {area.min():.3f}"
    assert area.max() > 0.7 * CROP_SCALE[1], f"{backend}: largest crop {area.max():.3f}"
    assert 0.9 * CROP_RATIO[0] <= ratio.min() and ratio.max() <= 1.1 * CROP_RATIO[1], backend


@pytest.fixture(scope="module")
def four_images(tmp_path_factory) -> Path:
    """4 classes of one distinct 64x64 image each: a label names the image it came from."""
    root = tmp_path_factory.mktemp("four")
    rng = np.random.default_rng(1)
    for label in range(4):
        _save(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), root / f"c{label}" / "image.png")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_every_epoch_draws_new_augmentation(four_images, backend):
    """Each image looks different in each of three epochs of one loader.
    Planted: the DALI backend drawing its crop windows from epoch 0's seeds."""
    cfg = LoaderConfig(loader=backend, data=str(four_images), img_size=32, patch_size=8, batch_size=4,
                       workers=0 if backend == "torch" else 1, schedule=None, seed=5)
    loader = build_loader(cfg)
    views = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        views.append({int(y): x for batch in loader for x, y in zip(batch["images"], batch["labels"],
                                                                     strict=True)})
    assert all(sorted(view) == [0, 1, 2, 3] for view in views)
    for (a, first), (b, second) in itertools.combinations(enumerate(views), 2):
        for label in range(4):
            assert not torch.equal(first[label], second[label]), f"{backend}: image {label}, epochs {a}, {b}"


# --- masks: every crop's geometry against a slow reference ---------------------------------------

GRID, RATIO = 5, 0.5  # 12 of 25 patches visible: a wrong crop cannot match a right one by chance


def reference_masks(bank: np.ndarray, *, wrap: bool) -> dict[frozenset, list[tuple]]:
    """Every crop the generator may take of `bank` (texture, top, left, row flip, column flip), cell by
    cell in plain Python, keyed by its visible set (the K highest values)."""
    count, height, width = bank.shape
    visible = int(GRID * GRID * (1 - RATIO))
    reach = (height, width) if wrap else (height - GRID + 1, width - GRID + 1)  # offsets allowed
    crops: dict[frozenset, list[tuple]] = {}
    for texture, top, left, flip_rows, flip_cols in itertools.product(
            range(count), range(reach[0]), range(reach[1]), (0, 1), (0, 1)):
        values = []
        for i in range(GRID):
            row = (top + (GRID - 1 - i if flip_rows else i)) % height
            for j in range(GRID):
                col = (left + (GRID - 1 - j if flip_cols else j)) % width
                values.append((bank[texture, row, col], i * GRID + j))
        kept = frozenset(cell for _, cell in sorted(values, reverse=True)[:visible])
        crops.setdefault(kept, []).append((texture, top, left, flip_rows, flip_cols))
    return crops


def drawn_masks(generator: MaskGenerator, colour: str) -> np.ndarray:
    """200 masks of epoch 0 (the epoch's colour is `colour`), over several batch indices."""
    assert generator.colour(0) == colour
    return np.concatenate([np.asarray(generator(40, epoch=0, index=i)) for i in range(5)])


def check_geometry(masks: np.ndarray, bank: np.ndarray, *, wrap: bool) -> list[list[tuple]]:
    """Each mask must be the visible set of some allowed crop; returns the crops that explain each."""
    allowed = reference_masks(bank, wrap=wrap)
    explained = []
    for mask in masks:
        kept = frozenset(np.flatnonzero(~mask).tolist())
        if kept not in allowed:
            pytest.fail(f"visible cells {sorted(kept)}: no allowed crop of the bank gives them")
        explained.append(allowed[kept])
    return explained


def test_masks_of_generated_banks_are_wrapped_crops(tmp_path):
    """Generated (seamless) banks: every mask is one crop, some crops wrap around the borders, and
    row and column flips both occur. Planted: rows and columns swapped in the index; generated banks
    cropped without wrapping (`self.wrap = False`)."""
    generator = MaskGenerator("purple", grid=GRID, mask_ratio=RATIO, seed=2, cache_dir=tmp_path,
                              bank_options={"count": 3, "size": 9})
    bank = generator.textures("purple")
    explained = check_geometry(drawn_masks(generator, "purple"), bank, wrap=True)
    height, width = bank.shape[1:]
    wrapped = [crops for crops in explained
               if all(top > height - GRID or left > width - GRID for _, top, left, _, _ in crops)]
    assert len(wrapped) > 20, "crops of generated banks must wrap around the texture borders"
    for axis in (3, 4):
        assert any(all(crop[axis] for crop in crops) for crops in explained), f"flip {axis - 3} never drawn"


def test_masks_of_the_authors_files_are_crops_inside_them(tmp_path):
    """The authors' npz format (not square): every mask is a crop that stays inside its texture.
    Planted: file crops allowed to wrap; the column index taken modulo the height; a row flip off by
    one (`grid - cells`, which on a seamless bank is merely another offset)."""
    rng = np.random.default_rng(3)
    path = tmp_path / "patterns.npz"
    np.savez(path, patterns=rng.random((3, 8, 11)).astype(np.float32))
    generator = MaskGenerator("green", grid=GRID, mask_ratio=RATIO, seed=4, bank_path=path)
    bank = generator.textures("green")
    assert bank.shape == (3, 8, 11)
    explained = check_geometry(drawn_masks(generator, "green"), bank, wrap=False)
    assert len({crop for crops in explained for crop in crops}) > 50  # many different crops drawn


# --- safety net: a second, independent test of each property --------------------------------------


def test_an_interrupted_save_leaves_the_previous_checkpoint_whole(images, tmp_path, monkeypatch):
    """A save that dies mid-write (an exception that is not an OSError, as from Ctrl-C) leaves the
    previous checkpoint byte for byte and no temporary file. Planted: torch.save straight to the path."""
    train.main(args(images, tmp_path, "train.epochs=1", "train.steps_per_epoch=1"))
    last = tmp_path / "demo" / "checkpoint-last.pth"
    digest = hashlib.sha256(last.read_bytes()).hexdigest()
    real_save = torch.save

    def save_then_interrupt(obj, f, *rest, **kwargs):
        real_save(obj, f, *rest, **kwargs)  # the bytes are there; the process dies before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train.main(args(images, tmp_path, "train.epochs=2", "train.steps_per_epoch=1"))
    assert hashlib.sha256(last.read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in last.parent.iterdir() if "checkpoint" in p.name) == [
        "checkpoint-1.pth", "checkpoint-last.pth"]


def test_an_empty_last_checkpoint_resumes_from_the_newest_numbered_one(images, tmp_path):
    """A zero-byte checkpoint-last.pth (a crash before the first byte) with checkpoint-1.pth and
    checkpoint-2.pth beside it: the rerun continues from checkpoint-2.pth (which it leaves as it is),
    not from scratch nor from checkpoint-1.pth. Planted: the numbered checkpoints tried oldest first."""
    train.main(args(images, tmp_path, "train.epochs=2", "train.steps_per_epoch=1"))
    run_dir = tmp_path / "demo"
    digests = {name: hashlib.sha256((run_dir / name).read_bytes()).hexdigest()
               for name in ("checkpoint-1.pth", "checkpoint-2.pth")}
    (run_dir / "checkpoint-last.pth").write_bytes(b"")
    train.main(args(images, tmp_path, "train.epochs=3", "train.steps_per_epoch=1"))
    assert read_checkpoint(run_dir / "checkpoint-last.pth")["step"] == 3
    for name, digest in digests.items():
        assert hashlib.sha256((run_dir / name).read_bytes()).hexdigest() == digest, f"{name} trained again"


def test_an_infinite_loss_stops_before_any_checkpoint(images, tmp_path, monkeypatch):
    """+inf (not NaN) at the first step of a fresh run: the run stops naming the step, at the end of
    its log window (the loss is read once per window, issue 22), and no checkpoint is written.
    Planted: the check written `math.isnan(loss)`."""
    real_loss = MaskedAutoencoderViT.forward_loss
    monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss",
                        lambda self, *a: real_loss(self, *a) + float("inf"))
    with pytest.raises(SystemExit, match="loss is inf at step 1"):
        train.main(args(images, tmp_path, "train.epochs=1", "log.every_steps=3"))
    assert not list((tmp_path / "demo").glob("checkpoint-*.pth"))


def test_sigusr1_stops_after_the_step_and_the_rerun_ends_where_a_straight_run_does(images, tmp_path,
                                                                                      monkeypatch):
    """SIGUSR1 (a scheduler's notice) raised during step 2 of 3: that step completes, checkpoint-last
    holds step 2, and the rerun finishes with the straight run's weights.
    Planted: SIGUSR1 left out of the handled signals."""
    straight = train.main(args(images, tmp_path, "train.epochs=1", "train.steps_per_epoch=3",
                               "log.run_name=straight"))
    real_step, calls = train.train_step, []

    def signal_in_step_two(run, batches):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_step(run, batches)

    monkeypatch.setattr(train, "train_step", signal_in_step_two)
    ignored = signal.signal(signal.SIGUSR1, lambda *_: None)  # should the trainer not handle it
    try:
        train.main(args(images, tmp_path, "train.epochs=1", "train.steps_per_epoch=3", "log.run_name=split"))
    finally:
        signal.signal(signal.SIGUSR1, ignored)
    assert read_checkpoint(tmp_path / "split" / "checkpoint-last.pth")["step"] == 2
    monkeypatch.setattr(train, "train_step", real_step)
    resumed = train.main(args(images, tmp_path, "train.epochs=1", "train.steps_per_epoch=3",
                              "log.run_name=split"))
    for name, tensor in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name


def test_a_held_run_lock_refuses_a_second_training_and_frees_on_exit(images, tmp_path, capsys):
    """Another process holding the run folder's lock file (`.<run name>.lock` beside it): training
    refuses in one line and creates no run folder; once that process ends, training runs.
    Planted: the lock taken on a file inside the run folder (each process its own)."""
    lock = tmp_path / ".demo.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"f = open({str(lock)!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.write('pid held'); f.flush()\n"
        "print('locked', flush=True); sys.stdin.read()")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit) as refused:
            train.main(args(images, tmp_path, "train.epochs=1", "train.steps_per_epoch=1"))
        assert refused.value.code == 2 and not (tmp_path / "demo").exists()
        assert "is in use by pid held" in str(refused.value) + capsys.readouterr().err
    finally:
        holder.communicate("")
    train.main(args(images, tmp_path, "train.epochs=1", "train.steps_per_epoch=1"))
    assert (tmp_path / "demo" / "checkpoint-last.pth").is_file()
