"""Loader backends on a tiny folder cut from real photos, with bad files mixed in.

ffcv JIT-compiles (numba) a pipeline per Loader, tens of seconds on 2 cores: the evaluation epochs
of all backends are built once per module and shared by the tests.
"""

import gc
import json
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from noise import MaskGenerator
from pipelines import LoaderConfig, build_loader, scan
from pipelines.base import IMAGENET_MEAN, IMAGENET_STD

# ffcv's numba-compiled pipelines raise a harmless KeyError in numba's finalizer at garbage collection.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

BACKENDS = ("torch", "dali", "ffcv")
SIZE, PATCH, BATCH = 32, 8, 8
GRID = SIZE // PATCH
VISIBLE = int(GRID * GRID * (1 - 0.75))
GOOD_JPEGS = 24
BAD_FILES = 3


def _photos() -> list[Image.Image]:
    """Three real photos: mvtb-data's, else the corpus's sources (scikit-image's on a bare GPU image)."""
    try:
        import mvtbdata
    except ImportError:
        from pipelines.prepare import _corpus_photos

        return [Image.open(path).convert("RGB") for path in _corpus_photos()[:3]]
    images = Path(mvtbdata.__file__).parent / "images"
    return [Image.open(images / name).convert("RGB") for name in ("flowers1.png", "church.png", "castle.png")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """3 classes of 64x64 JPEG crops of real photos, plus CMYK and grey (good) and 3 bad files."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label, photo in enumerate(_photos()):
        (root / f"class{label}").mkdir()
        for k in range(GOOD_JPEGS // 3):
            side = int(rng.integers(96, 256))
            x, y = int(rng.integers(0, photo.width - side)), int(rng.integers(0, photo.height - side))
            crop = photo.crop((x, y, x + side, y + side)).resize((64, 64), Image.BICUBIC)
            crop.save(root / f"class{label}" / f"{k:02d}.jpg", quality=95)
    sample = Image.open(root / "class0" / "00.jpg")
    sample.convert("CMYK").save(root / "class1" / "cmyk.jpg", quality=95)
    sample.convert("L").save(root / "class2" / "grey.png")
    data = (root / "class0" / "01.jpg").read_bytes()
    (root / "class0" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "class1" / "empty.jpg").write_bytes(b"")
    (root / "class2" / "notes.jpg").write_text("not an image\n")
    return root


def _config(folder: Path, loader: str, **overrides) -> LoaderConfig:
    base = dict(loader=loader, data=str(folder), img_size=SIZE, patch_size=PATCH, batch_size=BATCH,
                workers=0 if loader == "torch" else 2, train=False, schedule="green")  # fmt: skip
    return LoaderConfig(**{**base, **overrides})


def _epoch(loader) -> dict[str, torch.Tensor]:
    batches = list(loader)
    return {key: torch.cat([b[key] for b in batches]) for key in ("images", "mask", "labels")}


def _pixels(images: torch.Tensor) -> torch.Tensor:
    """Normalised images back to [0, 1] pixel units."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return images * std + mean


@pytest.fixture(scope="module")
def eval_epochs(folder) -> dict[str, dict]:
    """One evaluation epoch (1 rank) per backend, with the loader's skip count."""
    epochs = {}
    for backend in BACKENDS:
        loader = build_loader(_config(folder, backend))
        epochs[backend] = {**_epoch(loader), "num_skipped": loader.num_skipped, "len": len(loader)}
    return epochs


def test_manifest_reports_bad_files_and_converts_odd_modes(folder):
    manifest = scan(folder)
    assert manifest.num_skipped == BAD_FILES
    reasons = dict(manifest.skipped)
    assert "zero-byte" in reasons[str(Path("class1/empty.jpg"))]
    assert reasons[str(Path("class2/notes.jpg"))] == "not an image"
    assert "truncated" in reasons[str(Path("class0/truncated.jpg"))]
    assert len(manifest) == GOOD_JPEGS + 2
    converted = [f for f in manifest.files if "cmyk" in f]
    assert len(converted) == 1 and Image.open(converted[0]).mode == "RGB"
    assert scan(folder).files == manifest.files  # served from the cache


def test_ffcv_beton_records_classes_and_skips(folder, eval_epochs):
    manifest = scan(folder)
    (meta,) = manifest.cache_dir.glob("ffcv-*.beton.json")
    expected = {"classes": ["class0", "class1", "class2"], "num_skipped": BAD_FILES,
                "signature": manifest.signature(), "num_images": len(manifest)}
    assert json.loads(meta.read_text()) == expected


def test_missing_or_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_loader(LoaderConfig(data=str(tmp_path / "missing")))
    (tmp_path / "empty" / "class0").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images found"):
        build_loader(LoaderConfig(data=str(tmp_path / "empty")))


def test_bad_config_names_allowed_values(folder):
    with pytest.raises(ValueError, match="torch, dali, ffcv"):
        build_loader(_config(folder, "tf.data"))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        build_loader(_config(folder, "torch", img_size=30))


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_finishes_the_epoch_with_good_files_and_exact_masks(eval_epochs, backend):
    epoch = eval_epochs[backend]
    assert epoch["num_skipped"] == BAD_FILES
    assert epoch["len"] == -(-(GOOD_JPEGS + 2) // BATCH)
    assert epoch["images"].shape == (GOOD_JPEGS + 2, 3, SIZE, SIZE)
    assert epoch["images"].dtype == torch.float32 and epoch["labels"].dtype == torch.int64
    assert epoch["mask"].dtype == torch.bool and epoch["mask"].shape == (GOOD_JPEGS + 2, GRID * GRID)
    assert ((~epoch["mask"]).sum(dim=1) == VISIBLE).all()


@pytest.mark.parametrize("backend", ["dali", "ffcv"])
def test_backends_agree_with_torch_on_the_eval_transform(eval_epochs, backend):
    reference, other = eval_epochs["torch"], eval_epochs[backend]
    assert torch.equal(reference["labels"], other["labels"])
    difference = (_pixels(reference["images"]) - _pixels(other["images"])).abs().mean().item()
    assert difference <= 3 / 255, f"{backend} differs from torch by {difference * 255:.2f}/255"


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_split_the_epoch_without_overlap(folder, eval_epochs, backend):
    reference = _pixels(eval_epochs[backend]["images"]).flatten(1)
    seen = []
    for rank in range(2):
        images = _pixels(_epoch(build_loader(_config(folder, backend, rank=rank, world_size=2)))["images"])
        distance = torch.cdist(images.flatten(1), reference, compute_mode="donot_use_mm_for_euclid_dist")
        assert (distance.min(dim=1).values < 1e-3).all()
        seen += distance.argmin(dim=1).tolist()
    assert sorted(seen) == list(range(len(reference)))


def test_torch_training_shards_are_disjoint_equal_and_reshuffled(folder):
    loaders = [build_loader(_config(folder, "torch", train=True, rank=r, world_size=2)) for r in range(2)]
    epoch0 = [set(loader.sampler.indices().tolist()) for loader in loaders]
    whole_batches = (GOOD_JPEGS + 2) // (2 * BATCH)  # global batches of 2 x 8: the tail is dropped
    assert not epoch0[0] & epoch0[1] and len(epoch0[0]) == len(epoch0[1]) == whole_batches * BATCH
    assert len(loaders[0]) == len(loaders[1]) == whole_batches
    loaders[0].set_epoch(1)
    assert set(loaders[0].sampler.indices().tolist()) != epoch0[0]


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_mid_epoch_resume_gives_identical_batches(folder, backend):
    cfg = _config(folder, backend, train=True, batch_size=4)
    first = build_loader(cfg)
    first.set_epoch(3)
    batches = iter(first)
    next(batches), next(batches)
    state = first.state_dict()
    assert state == {"epoch": 3, "samples": 2 * 4}  # masks need no state
    rest = list(batches)

    resumed = build_loader(cfg)
    resumed.load_state_dict({"epoch": 3, "batches": 2, "mask": {"epoch": 0, "rng": {}}})  # older checkpoints
    resumed.set_epoch(3)  # the trainer's call for the resumed epoch keeps the resume point
    again = list(resumed)
    assert len(again) == len(rest) == len(first) - 2
    # A checkpoint at the epoch's end continues into the next epoch exactly.
    at_end = build_loader(cfg)
    at_end.load_state_dict(first.state_dict())
    for loader in (first, at_end):
        loader.set_epoch(4)
    rest.append(next(iter(first)))
    again.append(next(iter(at_end)))
    for a, b in zip(rest, again, strict=True):
        for key in ("images", "mask", "labels"):
            assert torch.equal(a[key], b[key]), key


def count_decoded(backend: str, monkeypatch) -> list[int]:
    """From now on, every image the backend decodes appends 1 (ffcv: the size of each batch its
    pipeline decodes)."""
    decoded = []
    if backend == "torch":  # workers=0: decoded in this process
        from pipelines import torch_loader

        real = torch_loader.decode_image
        monkeypatch.setattr(torch_loader, "decode_image", lambda *a, **k: decoded.append(1) or real(*a, **k))
    elif backend == "dali":  # the pipeline's source reads each file it hands to the decoder
        real = np.fromfile
        monkeypatch.setattr(np, "fromfile", lambda *a, **k: decoded.append(1) or real(*a, **k))
    else:
        from ffcv.loader.epoch_iterator import EpochIterator

        real = EpochIterator.run_pipeline

        def run_pipeline(self, b_ix, batch_indices, *args):
            decoded.extend([1] * len(batch_indices))
            return real(self, b_ix, batch_indices, *args)

        monkeypatch.setattr(EpochIterator, "run_pipeline", run_pipeline)
    return decoded


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_mid_epoch_resume_decodes_only_the_rest_of_the_epoch(folder, backend, monkeypatch):
    """Resumed after 2 of its 6 batches, an epoch decodes the 4 batches left (and a cut-short epoch at
    most DALI's or ffcv's read-ahead), never the consumed ones again."""
    cfg = _config(folder, backend, train=True, batch_size=4)
    first = build_loader(cfg)
    first.set_epoch(1)
    expected = [batch["labels"] for batch in first]
    resumed = build_loader(cfg)
    resumed.load_state_dict({"epoch": 1, "samples": 2 * 4})
    resumed.set_epoch(1)
    decoded = count_decoded(backend, monkeypatch)
    rest = list(resumed)
    assert len(decoded) == len(rest) * 4 == (len(first) - 2) * 4
    for labels, batch in zip(expected[2:], rest, strict=True):
        assert torch.equal(labels, batch["labels"])


def test_dali_builds_its_pipeline_once_and_reads_the_torch_order_and_crops(folder):
    """Three training epochs, the first cut short: one pipeline build; every image is the torch
    backend's image of the same position (same sample order, same crop and flip)."""
    loaders = {backend: build_loader(_config(folder, backend, train=True, batch_size=4, workers=1))
               for backend in ("torch", "dali")}
    for epoch in range(3):
        images = {}
        for backend, loader in loaders.items():
            loader.set_epoch(epoch)
            batches = iter(loader)
            if epoch == 0:
                next(batches)  # cut short, as the trainer does with steps_per_epoch
                continue
            images[backend] = _pixels(torch.cat([batch["images"] for batch in batches])).flatten(1)
        if images:
            distance = torch.cdist(images["dali"], images["torch"],
                                   compute_mode="donot_use_mm_for_euclid_dist")
            assert torch.equal(distance.argmin(dim=1), torch.arange(len(images["torch"]))), epoch
            assert (images["dali"] - images["torch"]).abs().mean() < 2 / 255
    assert loaders["dali"].builds == 1


@pytest.mark.slow
@pytest.mark.timeout(300)  # a close that waits for ffcv's thread forever fails here, not at the suite's bound
def test_ffcv_closes_the_epoch_iterator_of_a_cut_short_epoch(folder):
    """Stopped after any number of batches (ffcv's thread may have decoded the rest of the epoch and
    wait for room in its queue), the epoch's iterator ends at once."""
    import threading

    loader = build_loader(_config(folder, "ffcv", train=True, batch_size=4))
    before = threading.active_count()
    for epoch in range(1, len(loader)):
        loader.set_epoch(epoch)
        batches = iter(loader)
        for _ in range(epoch):
            next(batches)
        del batches  # the trainer drops an epoch's iterator at steps_per_epoch or a stop signal
    loader.set_epoch(len(loader))
    assert sum(1 for _ in loader) == len(loader)
    assert threading.active_count() == before


MASK_SCHEDULE = "green@0,blue@1,random@2"  # a new colour every epoch


def check_masks_by_batch_index(loader, cfg: LoaderConfig) -> list[dict]:
    """Read epochs 0 (dropped after one batch, as the trainer does with steps_per_epoch), 1, 2 and 2
    again (one batch); every batch's masks must be those of its (epoch, batch index), straight from
    the generator (a short batch: the first rows of a full one). Returns epoch 1's batches."""
    generator = MaskGenerator(cfg.schedule, GRID, cfg.mask_ratio, seed=cfg.seed, rank=cfg.rank)
    epoch_one = []
    for epoch, limit in ((0, 1), (1, None), (2, None), (2, 1)):
        loader.set_epoch(epoch)
        count = 0
        for index, batch in enumerate(loader):
            expected = generator(cfg.batch_size, epoch=epoch, index=index)[: len(batch["labels"])]
            assert torch.equal(batch["mask"], torch.from_numpy(expected)), (epoch, index)
            epoch_one += [batch] if epoch == 1 else []
            count += 1
            if count == limit:
                break  # the iterator is dropped mid-epoch
        assert count == (limit or len(loader))
    return epoch_one


@pytest.mark.parametrize(("backend", "workers"), [("torch", 0), ("torch", 2), ("dali", 1), ("dali", 3)])
def test_masks_depend_only_on_seed_rank_epoch_and_batch_index(folder, backend, workers):
    cfg = _config(folder, backend, train=True, drop_last=False, batch_size=10, workers=workers,
                  schedule=MASK_SCHEDULE, seed=5, rank=0, world_size=2)
    epoch_one = check_masks_by_batch_index(build_loader(cfg), cfg)
    assert [len(batch["labels"]) for batch in epoch_one] == [10, 6]  # rank 0 of 2: blocks 0 and 2 of 26


def test_torch_augmentation_does_not_depend_on_worker_count(folder):
    cfg = _config(folder, "torch", train=True, schedule=None)
    single = next(iter(build_loader(cfg)))
    multi = next(iter(build_loader(_config(folder, "torch", train=True, schedule=None, workers=2))))
    assert single["mask"] is None
    assert torch.equal(single["images"], multi["images"]) and torch.equal(single["labels"], multi["labels"])


def test_a_dropped_torch_loader_stops_its_workers_at_once(folder):
    """No reference cycle keeps a used loader (and its persistent workers) alive after its last reference
    goes: left to a later garbage collection, that may run in a worker forked by the next loader, which
    cannot stop them (eval.knn printed "Exception ignored ... can only test a child process")."""
    loader = build_loader(_config(folder, "torch", workers=2))
    _epoch(loader)
    workers = loader.dataloader._iterator._workers  # persistent: alive after the epoch
    assert workers and all(w.is_alive() for w in workers)
    gc.disable()  # only reference counting may free it
    try:
        dropped = weakref.ref(loader)
        del loader
        assert dropped() is None
        for worker in workers:
            worker.join(timeout=10)
        assert not any(w.is_alive() for w in workers)
    finally:
        gc.enable()


@pytest.mark.slow
def test_ffcv_training_epochs_and_their_masks(folder):
    cfg = _config(folder, "ffcv", train=True, schedule=MASK_SCHEDULE, seed=5)
    loader = build_loader(cfg)
    epoch = check_masks_by_batch_index(loader, cfg)
    assert len(loader) == len(epoch) == (GOOD_JPEGS + 2) // BATCH
    images = torch.cat([batch["images"] for batch in epoch])
    assert images.shape == (len(loader) * BATCH, 3, SIZE, SIZE)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_batches_live_on_the_device(folder, backend):
    batch = next(iter(build_loader(_config(folder, backend, device="cuda", train=True))))
    assert all(batch[key].device.type == "cuda" for key in ("images", "mask", "labels"))
    assert batch["images"].shape == (BATCH, 3, SIZE, SIZE) and batch["images"].dtype == torch.float32
    assert ((~batch["mask"]).sum(dim=1) == VISIBLE).all()


def test_torch_workers_leave_stop_signals_to_the_trainer(folder):
    """SIGTERM from another process (scancel signals the whole process group) must not break the
    epoch; the DataLoader's own terminate() must still stop a worker."""
    import signal
    import subprocess

    loader = build_loader(_config(folder, "torch", workers=2, train=True))
    batches = iter(loader)
    next(batches)
    workers = loader.dataloader._iterator._workers
    for worker in workers:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            subprocess.run(["kill", f"-{sig.name[3:]}", str(worker.pid)], check=True)
    rest = list(batches)
    assert 1 + len(rest) == len(loader)
    assert all(worker.is_alive() for worker in workers)
    for worker in workers:  # what multiprocessing does to daemonic children at interpreter exit
        worker.terminate()
        worker.join(timeout=10)
    assert not any(worker.is_alive() for worker in workers)


def test_process_exits_with_torch_workers_still_alive(folder):
    """Workers ignore others' SIGTERM; the parent's exit-time terminate() must still stop them, or the
    interpreter waits for them forever (CI once hung for 90 minutes on this)."""
    import subprocess
    import sys

    script = ("from pipelines import LoaderConfig, build_loader; "
              f"batches = iter(build_loader(LoaderConfig(data={str(folder)!r}, img_size={SIZE}, "
              f"patch_size={PATCH}, batch_size={BATCH}, workers=2, train=True))); "
              "next(batches); print('one batch', flush=True)")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "one batch" in done.stdout


def test_mask_stage_times_itself(folder):
    """bench/loaders.py reports the stage's share of the epoch from this timer."""
    import time

    loader = build_loader(_config(folder, "torch", train=True))
    start = time.perf_counter()
    batches = sum(1 for _ in loader)
    elapsed = time.perf_counter() - start
    assert batches == len(loader) > 0
    assert 0 < loader.masks.seconds < elapsed


def test_concurrent_scans_validate_each_file_once(tmp_path, monkeypatch):
    """torchrun ranks scan the same folder at once: one decodes every file, the others read its cache."""
    import threading

    from pipelines import manifest as manifest_module

    for i, photo in enumerate(_photos()[:2] * 6):
        (tmp_path / f"c{i % 2}").mkdir(exist_ok=True)
        photo.save(tmp_path / f"c{i % 2}" / f"{i}.jpg")
    checked, real_check = [], manifest_module._check

    def slow_check(path, *rest):
        checked.append(path)
        threading.Event().wait(0.02)  # long enough for the scans to overlap without the lock
        return real_check(path, *rest)

    monkeypatch.setattr(manifest_module, "_check", slow_check)
    results = [None] * 3
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, scan(tmp_path, workers=1)))
               for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(checked) == 12 and len(set(checked)) == 12
    assert all(len(result) == 12 and result.files == results[0].files for result in results)


@pytest.mark.parametrize("cpus", [1, 2, 7, 96])
@pytest.mark.parametrize("local_ranks", [None, "1", "3", "8", "16"])
def test_workers_default_shares_the_usable_cpus_among_the_ranks_of_the_node(monkeypatch, cpus, local_ranks):
    from pipelines.config import DataConfig

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(100, 100 + cpus)))  # not 0..n-1
    monkeypatch.setattr("os.cpu_count", lambda: 4 * cpus)  # the machine's count ignores the affinity
    if local_ranks is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_ranks)
    ranks = int(local_ranks or 1)
    workers = LoaderConfig.from_sections(DataConfig()).workers
    assert workers >= 1 and (workers * ranks <= cpus or workers == 1)
    assert workers == max(1, cpus // ranks)  # all usable CPUs busy when they split evenly
    assert LoaderConfig.from_sections(DataConfig(workers=3)).workers == 3  # an explicit value wins
