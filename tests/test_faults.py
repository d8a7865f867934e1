"""Fault injection: bad files, bad configs, broken checkpoints, a busy run folder, a full or read-only
disk, kill -9. Each fault must cost one clear line (or a logged skip with a count), never a
traceback, a lost checkpoint, a half-written file or a run folder left behind.

Items refer to issue 11. Training runs use the demo model cut to one block on 48 random images.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image
from torchvision.datasets import ImageFolder

import tracking
import train
from errors import DataError
from model.checkpoint import read_checkpoint
from pipelines import LoaderConfig, build_loader, scan
from run_folder import save_checkpoint

# ffcv's numba-compiled pipelines raise a harmless KeyError in numba's finalizer at garbage collection.
pytestmark = [pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
              pytest.mark.usefixtures("one_thread")]

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.args={depth: 1, decoder_depth: 1}", "train.batch_size=8", "data.workers=0",
        "train.warmup_epochs=1", "log.every_steps=1"]
SKIPPED = {"a/one.jpg": "too small", "b/dangling.jpg": "No such file", "b/loop.jpg": "symbolic links",
           "c/notes.jpg": "not an image"}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh user cache for this test (COLORMAE_CACHE)."""
    monkeypatch.setenv("COLORMAE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def faulty(tmp_path_factory) -> Path:
    """Classes a and b of 40x48 JPEGs with a 2x2 image (kept), a 1x1 image, a dangling symlink and a
    symlink loop (skipped); `c` holds only a bad file and `empty` nothing: neither is a class."""
    root = tmp_path_factory.mktemp("faulty")
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c", "empty"):
        (root / name).mkdir()
    for name in ("a", "b"):
        for index in range(8):
            pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index}.jpg")
    Image.fromarray(rng.integers(0, 256, (2, 2, 3), dtype=np.uint8)).save(root / "a" / "two.jpg")
    Image.fromarray(rng.integers(0, 256, (1, 1, 3), dtype=np.uint8)).save(root / "a" / "one.jpg")
    (root / "b" / "dangling.jpg").symlink_to(root / "gone.jpg")
    (root / "b" / "loop.jpg").symlink_to(root / "b" / "loop.jpg")
    (root / "c" / "notes.jpg").write_text("not an image\n")
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory, random_image_folder) -> Path:
    """48 random 32x32 PNGs in two class folders: 6 batches of 8 per epoch."""
    return random_image_folder(tmp_path_factory.mktemp("images") / "train", 24)


def args(images: Path, runs: Path, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "configs" / "demo.yaml"), f"data.path={images}", f"log.runs_root={runs}",
            *TINY, *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, images) -> Path:
    """A finished 1-epoch run folder without MLflow (checkpoint-1.pth and checkpoint-last.pth)."""
    runs = tmp_path_factory.mktemp("trained")
    train.main(args(images, runs, "train.epochs=1", "log.mlflow=false"))
    return runs / "demo"


def fails_in_one_line(argv: list[str], capsys, code: int = 2) -> str:
    """Run train.main(argv), expect SystemExit(code) and exactly one stderr line; returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        train.main(argv)
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.splitlines() if line.startswith("error:") or "Traceback" in line]
    assert err.value.code == code, stderr
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return str(err.value)


def nothing_left(runs: Path) -> None:
    """No run folder and no MLflow store: the run never started."""
    assert not (runs / "demo").exists() and not (runs / "mlflow.db").exists()


# -- items 1-3: the data folder ------------------------------------------------------------------
def test_item1_dangling_symlinks_and_loops_are_skipped_and_counted(faulty, cache):
    reasons = dict(scan(faulty).skipped)
    assert "No such file" in reasons[str(Path("b/dangling.jpg"))]
    assert "symbolic links" in reasons[str(Path("b/loop.jpg"))]


def test_item2_images_too_small_to_crop_are_skipped_not_fatal(faulty, cache):
    manifest = scan(faulty)
    assert "too small (1 x 1" in dict(manifest.skipped)[str(Path("a/one.jpg"))]
    assert str(faulty / "a" / "two.jpg") in manifest.files  # 2 x 2 still has a centre crop


def test_item3_class_folders_without_images_are_not_classes(faulty, cache, caplog):
    with caplog.at_level(logging.WARNING):
        manifest = scan(faulty)
    assert manifest.classes == ["a", "b"] and sorted(set(manifest.labels)) == [0, 1]
    assert "hold no usable image and are not classes: c, empty" in caplog.text
    assert {rel: reason for rel, reason in manifest.skipped}.keys() == {str(Path(p)) for p in SKIPPED}


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    """One user cache for the backend tests: the .beton of the faulty folder is written once."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COLORMAE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.mark.slow
@pytest.mark.parametrize("train_mode", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("backend", ["torch", "dali", "ffcv"])
def test_items1to3_every_backend_reads_the_faulty_folder(faulty, module_cache, backend, train_mode):
    loader = build_loader(LoaderConfig(loader=backend, data=str(faulty), img_size=32, patch_size=8,
                                       batch_size=4, workers=1, train=train_mode, schedule="green"))
    labels = torch.cat([batch["labels"] for batch in loader])
    assert loader.num_skipped == len(SKIPPED) and loader.classes == ["a", "b"]
    assert len(labels) == (16 if train_mode else 17)  # 17 good images; training drops the last partial batch
    assert set(labels.tolist()) == {0, 1}


# -- items 4 and 5: one line instead of a traceback ----------------------------------------------
def test_item4_data_and_yaml_problems_are_one_line(images, tmp_path, capsys, cache):
    runs = tmp_path / "runs"
    (tmp_path / "no-images" / "a").mkdir(parents=True)
    assert "no images found in" in fails_in_one_line(args(tmp_path / "no-images", runs), capsys)
    (tmp_path / "all-bad" / "a").mkdir(parents=True)
    (tmp_path / "all-bad" / "a" / "x.jpg").write_text("text")
    assert "no usable images in" in fails_in_one_line(args(tmp_path / "all-bad", runs), capsys)
    nothing_left(runs)

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1\n")
    assert f"config file {bad}, line 3" in fails_in_one_line(["--config", str(bad)], capsys)
    marker = tmp_path / "executed"
    bad.write_text(f"train:\n  epochs: !!python/object/apply:os.system ['touch {marker}']\n")
    assert "tags such as !!python/" in fails_in_one_line(["--config", str(bad)], capsys)
    override = f"train.epochs=!!python/object/apply:os.system ['touch {marker}']"
    message = fails_in_one_line(args(images, runs, override), capsys)
    assert "override 'train.epochs=" in message and "tags such as !!python/" in message
    assert not marker.exists()


def test_item4_bad_mask_bank_is_named_by_its_key_before_the_data_scan(images, tmp_path, capsys, cache):
    bank = tmp_path / "bank.npz"
    bank.write_bytes(os.urandom(256))
    message = fails_in_one_line(args(images, tmp_path, f"mask.bank={bank}"), capsys)
    assert f"mask.bank '{bank}'" in message and "not an npz archive" in message
    assert "pickled" not in message
    assert not (cache / "data").exists()  # stopped before the scan


def corrupt(kind: str, good: bytes) -> bytes:
    return {"truncated": good[: len(good) // 2], "random": os.urandom(4096), "text": b"hello\n",
            "empty": b""}[kind]


@pytest.mark.parametrize("kind", ["truncated", "random", "text", "empty"])
def test_item4_resume_from_a_broken_checkpoint_is_one_line(trained, tmp_path, capsys, kind, images):
    bad = tmp_path / "checkpoint-last.pth"
    bad.write_bytes(corrupt(kind, (trained / "checkpoint-last.pth").read_bytes()))
    runs = tmp_path / "runs"
    message = fails_in_one_line(args(images, runs, "--resume", str(bad), "log.mlflow=false"), capsys)
    assert str(bad) in message
    nothing_left(runs)


def test_item4_resume_with_another_model_size_is_one_line(trained, tmp_path, capsys, images):
    argv = args(images, tmp_path, "--resume", str(trained), "model.args={depth: 2, decoder_depth: 1}")
    message = fails_in_one_line(argv, capsys)
    assert "holds another experiment (epoch 1, step 6): model.args.depth 1 -> 2" in message
    nothing_left(tmp_path)


@pytest.mark.slow
def test_item4_eval_commands_are_one_line(tmp_path, images, capsys, monkeypatch):
    from mlflow import MlflowClient

    from errors import run_cli
    from eval import compare, knn

    missing = tmp_path / "missing.pth"
    store = f"sqlite:///{tmp_path}/m.db"
    MlflowClient(store).search_experiments()  # a store without the experiment
    for main, argv, expected in [
        (knn.main, ["--checkpoint", str(missing), "--data", str(images)],
         f"checkpoint {missing} does not exist"),
        (compare.main, ["--experiment", "nope", "--mlflow-uri", store, "--out", str(tmp_path)],
         "experiment 'nope'"),
        (compare.main, ["--experiment", "nope", "--mlflow-uri", f"sqlite:///{tmp_path}/absent.db", "--out",
                        str(tmp_path)], f"no MLflow store at {tmp_path}/absent.db"),
    ]:
        monkeypatch.setattr(sys, "argv", ["eval", *argv])
        with pytest.raises(SystemExit) as err:
            run_cli(main)
        stderr = capsys.readouterr().err
        assert err.value.code == 2 and "Traceback" not in stderr, stderr
        assert stderr.splitlines()[-1].startswith("error: ") and expected in stderr.splitlines()[-1], stderr


def test_item4_debug_shows_the_traceback(images, tmp_path, monkeypatch):
    from configs import ConfigError

    argv = args(images, tmp_path, "train.base_lr=.nan")
    with pytest.raises(ConfigError, match=r"train\.base_lr"):
        train.main([*argv, "--debug"])
    monkeypatch.setenv("COLORMAE_DEBUG", "1")
    with pytest.raises(ConfigError, match=r"train\.base_lr"):
        train.main(argv)


@pytest.mark.slow
def test_item4_a_real_process_exits_2_with_one_line(images, tmp_path):
    command = [sys.executable, "train.py", *args(images, tmp_path, "train.base_lr=.nan")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2 and done.stderr == (
        "error: invalid configuration:\n  - train.base_lr must be a positive finite number, got nan\n")


@pytest.mark.parametrize(("override", "key"), [
    ("train.base_lr=.nan", "train.base_lr"), ("train.base_lr=.inf", "train.base_lr"),
    ("train.weight_decay=-0.1", "train.weight_decay"), ("train.clip_grad=-1", "train.clip_grad"),
    ("train.min_lr=1.0", "train.min_lr"),
])
def test_item5_non_finite_and_negative_optimiser_values_are_refused(images, tmp_path, capsys, override, key):
    assert f"{key} must" in fails_in_one_line(args(images, tmp_path, override), capsys)
    nothing_left(tmp_path)


# -- item 6: a corrupt checkpoint-last.pth on a plain rerun ----------------------------------------
def test_item6_corrupt_last_checkpoint_falls_back_to_the_newest_good_one(trained, tmp_path, images, caplog):
    run_dir = tmp_path / "demo"
    shutil.copytree(trained, run_dir)
    last = run_dir / "checkpoint-last.pth"
    last.write_bytes(last.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING):
        train.main(args(images, tmp_path, "train.epochs=2", "log.mlflow=false"))
    assert "is unreadable" in caplog.text and "continuing from checkpoint-1.pth" in caplog.text
    [aside] = run_dir.glob("checkpoint-last.pth.corrupt-*")  # kept for inspection
    assert aside.stat().st_size == 1000
    assert (read_checkpoint(last)["epoch"], read_checkpoint(last)["step"]) == (2, 12)


# -- item 7: a run that started offline continues the run that sync created -----------------------
@pytest.mark.slow
def test_item7_resume_after_sync_continues_the_same_mlflow_run(images, tmp_path):
    dead = "http://127.0.0.1:9"  # the discard port: nothing listens
    train.main(args(images, tmp_path, "train.epochs=1", f"--mlflow-uri={dead}"))
    run_dir = tmp_path / "demo"
    assert read_checkpoint(run_dir / "checkpoint-last.pth")["mlflow_run_id"] is None
    uri = tracking.default_tracking_uri(tmp_path)
    [run_id] = tracking.sync(run_dir, uri)
    train.main(args(images, tmp_path, "train.epochs=2", f"--mlflow-uri={uri}"))
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [run.info.run_id for run in runs] == [run_id]
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(range(1, 13))


# -- item 8: two trainings into one run folder -----------------------------------------------------
@pytest.mark.slow
def test_item8_second_training_into_a_busy_run_folder_stops_naming_the_first(images, tmp_path, capsys):
    argv = args(images, tmp_path, "train.epochs=50", "log.mlflow=false")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], cwd=ROOT, env=env, text=True,
                             stderr=subprocess.PIPE)
    try:
        for line in first.stderr:
            if " step 1 (" in line:
                break
        message = fails_in_one_line(argv, capsys)
        assert f"is in use by pid {first.pid} on host " in message
    finally:
        first.send_signal(signal.SIGTERM)  # saves and exits 0
        first.communicate(timeout=120)
    assert first.returncode == 0


# -- item 9: disk full while saving -----------------------------------------------------------------
@pytest.mark.slow
def test_item9_disk_full_while_saving_keeps_the_last_good_checkpoint(images, tmp_path, capsys, monkeypatch):
    train.main(args(images, tmp_path, "train.epochs=1"))
    run_dir = tmp_path / "demo"
    last = run_dir / "checkpoint-last.pth"
    digest = hashlib.sha256(last.read_bytes()).hexdigest()
    real_save = torch.save

    def save_until_full(obj, f, *rest, **kwargs):  # half the bytes reach the file, then ENOSPC
        buffer = io.BytesIO()
        real_save(obj, buffer)
        with open(f, "wb") if isinstance(f, str | Path) else nullcontext(f) as out:
            out.write(buffer.getvalue()[: buffer.tell() // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save_until_full)
    message = fails_in_one_line(args(images, tmp_path, "train.epochs=2"), capsys, code=1)
    assert f"could not save {last}: No space left on device; the last good checkpoint-last.pth is kept" \
        in message
    assert not list(run_dir.glob("*.tmp")) and hashlib.sha256(last.read_bytes()).hexdigest() == digest
    run_id = read_checkpoint(last)["mlflow_run_id"]
    assert MlflowClient(tracking.default_tracking_uri(tmp_path)).get_run(run_id).info.status == "FAILED"


def test_item9_tracker_close_never_raises(tmp_path, caplog, monkeypatch):
    tracker = tracking.Tracker(tracking.default_tracking_uri(tmp_path), "close", offline_dir=tmp_path)

    def store_down(*_args, **_kwargs):
        raise ConnectionError("store down")

    def disk_full(_record):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tracker._client, "set_terminated", store_down)
    monkeypatch.setattr(tracker, "_keep", disk_full)
    with caplog.at_level(logging.WARNING):
        tracker.close("FAILED")
    assert "could not record the end of the run" in caplog.text


# -- item 10: a read-only runs folder ---------------------------------------------------------------
@pytest.fixture
def read_only(tmp_path) -> Path:
    """A folder nobody can write to: chmod for a normal user, a read-only tmpfs for root."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("running as root without permission to mount a read-only tmpfs")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_item10_read_only_runs_folder_is_found_before_any_work(images, read_only, capsys, cache):
    message = fails_in_one_line(args(images, read_only / "runs"), capsys)
    assert f"log.runs_root '{read_only / 'runs'}': {read_only} is not writable (Read-only" in message \
        or "Permission denied" in message
    assert not (cache / "data").exists()  # stopped before the data scan


# -- item 11: caches stay out of the data folder -------------------------------------------------
def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.slow
def test_item11_scan_and_ffcv_write_nothing_into_the_data_folder(tmp_path, cache, random_image_folder,
                                                                  caplog):
    data = random_image_folder(tmp_path / "data", 4)
    before = tree(data)
    manifest = scan(data)
    with caplog.at_level(logging.WARNING):
        build_loader(LoaderConfig(loader="ffcv", data=str(data), img_size=32, patch_size=8, batch_size=4,
                                  workers=1, train=False, schedule=None))
    assert tree(data) == before
    assert len(ImageFolder(str(data))) == 8  # other tools still read the folder
    assert manifest.cache_dir.parent == cache / "data" and manifest.cache_dir.name.startswith("data-")
    [beton] = manifest.cache_dir.glob("ffcv-*.beton")
    assert f"wrote {beton} (" in caplog.text and " MB)" in caplog.text


def test_item11_cache_root_follows_the_environment(tmp_path, monkeypatch):
    from pipelines.manifest import cache_dir_for, cache_root

    monkeypatch.delenv("COLORMAE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "colormae"
    monkeypatch.setenv("COLORMAE_CACHE", str(tmp_path / "mine"))
    one, other = cache_dir_for(tmp_path / "x" / "train"), cache_dir_for(tmp_path / "y" / "train")
    assert one.parent == other.parent == tmp_path / "mine" / "data" and one != other


# -- kill -9 between the temp write and the rename -------------------------------------------------
@pytest.mark.slow
def test_kill_between_temp_write_and_rename_keeps_the_last_good_checkpoint(tmp_path):
    path = tmp_path / "checkpoint-last.pth"
    save_checkpoint({"model": {"w": torch.zeros(3)}}, path)
    child = ("import os, signal, torch\n"
             "import run_folder\n"
             "os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
             f"run_folder.save_checkpoint({{'model': {{'w': torch.ones(3)}}}},\n"
             f"                           run_folder.Path({str(path)!r}))\n")
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert (tmp_path / "checkpoint-last.pth.tmp").is_file()  # killed after the write, before the rename
    assert torch.equal(read_checkpoint(path)["model"]["w"], torch.zeros(3))
    save_checkpoint({"model": {"w": torch.ones(3)}}, path)  # the next save replaces the leftover
    assert torch.equal(read_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-last.pth"]


# -- issue 20: the combinations users run (each test failed on the code before the fix) -----------
def png_header(path: Path, width: int, height: int) -> None:
    """A PNG that declares width x height grey pixels but holds one row (the header is what counts)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    one_row = zlib.compress(bytes(width + 1))
    signature = b"\x89PNG\r\n\x1a\n"
    path.write_bytes(signature + chunk(b"IHDR", ihdr) + chunk(b"IDAT", one_row) + chunk(b"IEND", b""))


def test_issue20_images_over_the_pixel_limit_are_skipped_and_counted(tmp_path, random_image_folder, cache,
                                                                     capsys, monkeypatch):
    """Over twice Pillow's limit (Image.open refuses it) and between once and twice (Pillow only warns):
    both skipped from their header, also by --dry-run; data.max_pixels moves the limit."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # the scan sets it: restored after
    data = random_image_folder(tmp_path / "data", 4)
    png_header(data / "a" / "bomb.png", 14000, 14000)
    png_header(data / "b" / "big.png", 12000, 12000)
    manifest = scan(data)
    reasons = dict(manifest.skipped)
    assert set(reasons) == {str(Path("a/bomb.png")), str(Path("b/big.png"))} and len(manifest) == 8
    assert all(reason.startswith("too large") for reason in reasons.values()), reasons
    train.main(["--config", str(ROOT / "configs" / "demo.yaml"), f"data.path={data}", "--dry-run"])
    assert "8 images in 2 classes (2 skipped)" in capsys.readouterr().out
    assert len(scan(data, max_pixels=32 * 32)) == 8
    with pytest.raises(DataError, match="all 10 files were skipped"):
        scan(data, max_pixels=32 * 32 - 1)  # a new limit re-checks the cached files


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_issue20_device_cuda_without_a_gpu_is_one_line_before_any_work(images, tmp_path, capsys, cache):
    message = fails_in_one_line(args(images, tmp_path, "train.device=cuda"), capsys)
    assert "train.device cuda (--device cuda): torch finds no CUDA device" in message
    nothing_left(tmp_path)
    assert not list(tmp_path.glob(".*.lock")) and not (cache / "data").exists()  # before the lock and scan


def test_issue20_refused_mlflow_credentials_stop_before_any_step(images, tmp_path, capsys, refusing_server):
    message = fails_in_one_line(args(images, tmp_path, f"--mlflow-uri={refusing_server}"), capsys)
    assert f"MLflow at {refusing_server} refused the credentials (HTTP 40" in message
    nothing_left(tmp_path)


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A 64 MB tmpfs (root only): a disk that fills up for real."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.slow
def test_issue20_a_really_full_disk_while_saving_is_one_line(images, small_disk, capsys):
    """torch's zip writer reports the full disk as `RuntimeError: ... unexpected pos`."""
    argv = args(images, small_disk, "train.steps_per_epoch=1", "log.mlflow=false")
    train.main([*argv, "train.epochs=1"])
    last = small_disk / "demo" / "checkpoint-last.pth"
    digest = hashlib.sha256(last.read_bytes()).hexdigest()
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(bytes(free - 256 * 1024))  # leaves 256 KB: less than a checkpoint
    message = fails_in_one_line([*argv, "train.epochs=2"], capsys, code=1)
    assert f"could not save {last}: No space left on device; the last good checkpoint-last.pth is kept" \
        in message
    assert not list(last.parent.glob("*.tmp")) and hashlib.sha256(last.read_bytes()).hexdigest() == digest
