"""`python -m pipelines.prepare`: Fashion-MNIST folders and the JPEG corpus (ffcv: test_pipelines.py)."""

import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines import scan
from pipelines.prepare import FASHION_MNIST_CLASSES, main


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture
def idx_folder(tmp_path) -> Path:
    """Small IDX files in the Debian package's layout (same format, 12 train / 6 test images)."""
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 12), ("t10k", 6)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(count) % 10)
    return tmp_path


def test_fashion_mnist_class_folders_are_rgb_and_idempotent(idx_folder, tmp_path, capsys):
    out = tmp_path / "fm"
    main(["fashion-mnist", "--out", str(out), "--src", str(idx_folder), "--limit", "10"])
    train, val = scan(out / "train"), scan(out / "val")
    assert train.classes == sorted(FASHION_MNIST_CLASSES) and len(train) == 10 and len(val) == 6
    image = Image.open(train.files[0])
    assert image.mode == "RGB" and image.size == (28, 28)
    label = train.classes[train.labels[0]]
    assert label == FASHION_MNIST_CLASSES[int(Path(train.files[0]).stem) % 10]

    main(["fashion-mnist", "--out", str(out), "--src", str(idx_folder), "--limit", "10"])
    assert "is ready" in capsys.readouterr().out


def test_fashion_mnist_missing_package_says_how_to_install(tmp_path):
    with pytest.raises(SystemExit, match="apt-get install dataset-fashion-mnist"):
        main(["fashion-mnist", "--out", str(tmp_path / "fm"), "--src", str(tmp_path / "nowhere")])


def test_jpeg_corpus_is_imagenet_like(tmp_path):
    main(["jpeg-corpus", "--out", str(tmp_path / "corpus"), "--n", "6", "--classes", "3"])
    manifest = scan(tmp_path / "corpus")
    assert len(manifest) == 6 and len(manifest.classes) == 3 and manifest.num_skipped == 0
    for path in manifest.files:
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.mode == "RGB" and sorted(img.size) == [375, 500]
