"""Dataset preparation commands.

    python -m pipelines.prepare fashion-mnist --out data/fashion-mnist [--limit N]
    python -m pipelines.prepare ffcv --src DIR/train --out DIR/train.beton [--max-resolution 512]
    python -m pipelines.prepare jpeg-corpus --out DIR --n 2000
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from errors import DataError

from .manifest import Manifest, exclusive, scan

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)  # fmt: skip
FASHION_MNIST_SPLITS = {"train": "train", "val": "t10k"}
STAMP = ".prepared.json"
# Where the JPEG corpus takes its photos from: (module, folder inside it), the first installed one wins.
PHOTO_SOURCES = (("mvtbdata", "images"), ("skimage", "data"), ("matplotlib", "mpl-data/sample_data"))
BETON_WRITE_MODES = ("raw", "jpg", "smart", "proportion")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST family's format, gzipped or not) as a uint8 array: images (N, H, W) or
    labels (N,)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = np.frombuffer(data, dtype=">u4", count=ndim, offset=4)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _ensure_fashion_mnist(src: Path) -> None:
    if (src / "train-images-idx3-ubyte.gz").exists():
        return
    if src == FASHION_MNIST_DIR and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"prepare: installing the Debian package {FASHION_MNIST_PACKAGE}", flush=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", FASHION_MNIST_PACKAGE], check=False)
    if not (src / "train-images-idx3-ubyte.gz").exists():
        raise SystemExit(
            f"Fashion-MNIST IDX files not found in {src}; install them with "
            f"`sudo apt-get install {FASHION_MNIST_PACKAGE}` or pass --src DIR"
        )


def prepare_fashion_mnist(out: Path, *, src: Path = FASHION_MNIST_DIR, limit: int | None = None) -> Path:
    """IDX files -> out/{train,val}/<class>/<index>.png as 3-channel 28x28 PNGs (idempotent)."""
    stamp = out / STAMP
    wanted = {"dataset": "fashion-mnist", "limit": limit}
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        print(f"prepare: {out} is ready (Fashion-MNIST, limit={limit})")
        return out
    _ensure_fashion_mnist(src)
    jobs = []
    for split, prefix in FASHION_MNIST_SPLITS.items():
        images = read_idx(src / f"{prefix}-images-idx3-ubyte.gz")[:limit]
        labels = read_idx(src / f"{prefix}-labels-idx1-ubyte.gz")[:limit]
        if (out / split).exists():
            shutil.rmtree(out / split)  # a different limit, or an interrupted run
        for name in FASHION_MNIST_CLASSES:
            (out / split / name).mkdir(parents=True)
        jobs += [
            (np.repeat(img[:, :, None], 3, axis=2), out / split / FASHION_MNIST_CLASSES[y] / f"{i:05d}.png")
            for i, (img, y) in enumerate(zip(images, labels, strict=True))
        ]
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(tqdm(pool.map(lambda job: Image.fromarray(job[0]).save(job[1], compress_level=1), jobs),
                  total=len(jobs), desc="fashion-mnist", unit="img", disable=not sys.stderr.isatty()))
    stamp.write_text(json.dumps(wanted))
    print(f"prepare: wrote {len(jobs)} Fashion-MNIST images to {out}/{{train,val}}")
    return out


def _corpus_photos() -> list[Path]:
    """Real colour photographs big enough to cut 500x375 from, from the first package of
    PHOTO_SOURCES that is installed (GPU images without mvtb-data often carry scikit-image)."""
    for module, folder in PHOTO_SOURCES:
        try:
            package = importlib.import_module(module)
        except ImportError:
            continue
        photos = []
        for path in sorted((Path(package.__file__).parent / folder).rglob("*")):
            if path.suffix.lower() not in (".jpg", ".jpeg", ".png"):
                continue
            with Image.open(path) as img:
                if img.mode in ("RGB", "RGBA") and min(img.size) >= 375 and max(img.size) >= 500:
                    photos.append(path)
        if photos:
            print(f"prepare: {len(photos)} photos from {module}", flush=True)
            return photos
    return []


def prepare_jpeg_corpus(out: Path, *, n: int = 2000, classes: int = 10, seed: int = 0) -> Path:
    """ImageNet-like JPEGs (~500x375, quality 90) in `classes` folders, cut from real photos."""
    stamp = out / STAMP
    wanted = {"dataset": "jpeg-corpus", "n": n, "classes": classes, "seed": seed}
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        print(f"prepare: {out} is ready (JPEG corpus, n={n})")
        return out
    photos = _corpus_photos()
    if not photos:
        raise SystemExit("no photos found in mvtb-data, scikit-image or matplotlib; `pip install mvtb-data`")
    def cut_photo(photo: int) -> None:
        with Image.open(photos[photo]) as img:
            img = img.convert("RGB")
        for i in range(photo, n, len(photos)):
            rng = np.random.default_rng([seed, i])
            width, height = (500, 375) if rng.random() < 0.75 else (375, 500)
            scale = max(width / img.width, height / img.height) * rng.uniform(1.0, 2.0)  # the crop fits
            w, h = int(width / scale), int(height / scale)
            x, y = int(rng.integers(0, img.width - w + 1)), int(rng.integers(0, img.height - h + 1))
            crop = img.crop((x, y, x + w, y + h)).resize((width, height), Image.BICUBIC)
            if rng.random() < 0.5:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            crop.save(out / f"n{photo % classes:08d}" / f"img_{i:06d}.JPEG", quality=90)

    if out.exists():
        shutil.rmtree(out)
    for c in range(classes):
        (out / f"n{c:08d}").mkdir(parents=True)
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(tqdm(pool.map(cut_photo, range(min(n, len(photos)))), total=min(n, len(photos)),
                  desc="jpeg-corpus", unit="photo", disable=not sys.stderr.isatty()))
    stamp.write_text(json.dumps(wanted))
    print(f"prepare: wrote {n} JPEGs cut from {len(photos)} photos to {out}")
    return out


class _ManifestImages:
    """(RGB PIL image, label) pairs of the manifest's good files, as ffcv's writer wants them."""

    def __init__(self, manifest: Manifest):
        self.files, self.labels = manifest.files, manifest.labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        with Image.open(self.files[index]) as img:
            return img.convert("RGB"), self.labels[index]


def write_beton(
    manifest: Manifest,
    out: str | os.PathLike,
    *,
    max_resolution: int = 512,
    jpeg_quality: int = 90,
    write_mode: str = "jpg",
    workers: int | None = None,
) -> Path:
    """Write the manifest's good files to `out` (.beton) plus `out`.json with classes and skips.

    ffcv's writer forks worker processes: call it from a process that runs no decoder threads yet
    (`python -m pipelines.prepare ffcv`, as `ensure_beton` does).
    """
    from ffcv.fields import IntField, RGBImageField  # ffcv only where a .beton is written
    from ffcv.writer import DatasetWriter

    if write_mode not in BETON_WRITE_MODES:
        raise ValueError(f"write_mode={write_mode!r}: allowed values are {', '.join(BETON_WRITE_MODES)}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality={jpeg_quality} must be in [1, 100]")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    image = RGBImageField(write_mode=write_mode, max_resolution=max_resolution, jpeg_quality=jpeg_quality)
    writer = DatasetWriter(str(tmp), {"image": image, "label": IntField()}, num_workers=workers or -1)
    writer.from_indexed_dataset(_ManifestImages(manifest))
    meta = {"classes": manifest.classes, "num_skipped": manifest.num_skipped,
            "signature": manifest.signature(), "num_images": len(manifest)}  # what `check_beton` compares
    Path(f"{out}.json").write_text(json.dumps(meta))
    os.replace(tmp, out)
    return out


def ensure_beton(manifest: Manifest | None, ffcv_path: str | None, workers: int) -> Path:
    """The .beton the ffcv loader reads: `ffcv_path` (checked against the manifest's folder when there is
    one, `check_beton`), else one in the data folder's cache named by the manifest's signature (a changed
    folder gets a new file). A missing one is written from the
    manifest's folder by one rank at a time, in a fresh `python -m pipelines.prepare ffcv` process:
    ffcv's writer forks, which is unsafe once this process runs decoder threads (torch, DALI, numba).
    """
    path = Path(ffcv_path) if ffcv_path else None
    if path is None:
        if manifest is None:
            raise ValueError("the ffcv loader needs `data` (a class folder) or `ffcv_path` (a .beton)")
        path = manifest.cache_dir / f"ffcv-{manifest.signature()}.beton"
    if path.exists():
        if ffcv_path and manifest is not None:  # a cached one is named by its signature
            check_beton(path, manifest)
        return path
    if manifest is None:
        raise FileNotFoundError(f"ffcv_path {path} does not exist and `data` is not set to write it")
    with exclusive(path.with_name(path.name + ".lock")):  # one writer among concurrent ranks
        if not path.exists():
            _write_beton_in_subprocess(manifest.root, path, workers)
    return path


def check_beton(path: Path, manifest: Manifest) -> None:
    """Raise DataError unless the .beton was written from the manifest's folder as it is now (its
    .json records the signature it was written with)."""
    meta_file = Path(f"{path}.json")
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    rewrite = f"rewrite it with python -m pipelines.prepare ffcv --src {manifest.root} --out {path}"
    if "signature" not in meta:
        raise DataError(f"data.ffcv_path {path} cannot be checked against data.path {manifest.root}: it "
                        f"records no data signature (no {meta_file.name} of pipelines.prepare); {rewrite}")
    if meta["signature"] != manifest.signature():
        raise DataError(f"data.ffcv_path {path} was written from another state of {manifest.root} "
                        f"({meta.get('num_images', '?')} images, signature {meta['signature']}; the folder "
                        f"now has {len(manifest)}, signature {manifest.signature()}): {rewrite}")


def _write_beton_in_subprocess(src: Path, out: Path, workers: int) -> None:
    log.warning("writing %s from %s (first use of the ffcv loader on this folder)", out, src)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "pipelines.prepare", "ffcv", "--src", str(src), "--out", str(out)]
    subprocess.run([*command, "--workers", str(workers or os.cpu_count())], check=True, env=env)
    log.warning("wrote %s (%.1f MB); data.ffcv_path=PATH or COLORMAE_CACHE=DIR puts .beton files on "
                "another disk", out, out.stat().st_size / 2**20)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    fm = commands.add_parser("fashion-mnist", help="Debian IDX files -> train/ and val/ class folders")
    fm.add_argument("--out", type=Path, required=True)
    fm.add_argument("--src", type=Path, default=FASHION_MNIST_DIR, help="folder with the gzipped IDX files")
    fm.add_argument("--limit", type=int, default=None, help="keep the first N images of each split")
    ff = commands.add_parser("ffcv", help="class folder -> .beton")
    ff.add_argument("--src", type=Path, required=True)
    ff.add_argument("--out", type=Path, required=True)
    ff.add_argument("--max-resolution", type=int, default=512, help="longest side kept (pixels)")
    ff.add_argument("--jpeg-quality", type=int, default=90)
    ff.add_argument("--write-mode", default="jpg", help=" | ".join(BETON_WRITE_MODES))
    ff.add_argument("--workers", type=int, default=None)
    jc = commands.add_parser("jpeg-corpus", help="ImageNet-like JPEG folders cut from real photos")
    jc.add_argument("--out", type=Path, required=True)
    jc.add_argument("--n", type=int, default=2000)
    jc.add_argument("--classes", type=int, default=10)
    args = parser.parse_args(argv)

    if args.command == "fashion-mnist":
        prepare_fashion_mnist(args.out, src=args.src, limit=args.limit)
    elif args.command == "jpeg-corpus":
        prepare_jpeg_corpus(args.out, n=args.n, classes=args.classes)
    else:
        manifest = scan(args.src, workers=args.workers)
        path = write_beton(manifest, args.out, max_resolution=args.max_resolution,
                           jpeg_quality=args.jpeg_quality, write_mode=args.write_mode, workers=args.workers)
        print(f"prepare: wrote {len(manifest)} images to {path} ({manifest.num_skipped} skipped)")


if __name__ == "__main__":
    sys.exit(main())
