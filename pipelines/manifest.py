"""Dataset manifest: one parallel scan that validates every image of a class-folder tree.

The scan decodes each file once, sorts it into *good* (usable as is), *converted* (a CMYK, palette,
RGBA, ... image re-saved as an RGB PNG in the cache folder, so every backend's decoder reads it)
or *skipped* (zero-byte, truncated, not an image, unsupported mode, smaller than MIN_SIDE pixels,
more than `max_pixels` pixels (read from the header, never decoded), a dangling symlink or a symlink
loop). Class folders without a usable image are not classes (a warning names them; labels stay
dense). Nothing is written into the data folder: the result is cached as a small TSV in the user
cache (`cache_dir_for`), and later scans only re-check files whose size or mtime changed. Concurrent
scans of one folder (the ranks of a torchrun job) take turns on a lock file in the cache folder: the
first validates, the others find its result cached.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from errors import DataError

from .cache import cache_root

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
CONVERTIBLE_MODES = ("RGB", "L", "LA", "P", "PA", "RGBA", "CMYK", "YCbCr", "1")
MIN_SIDE = 2  # pixels: every backend's evaluation centre crop of a smaller image is empty
PILLOW_MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # Pillow's decompression-bomb limit: the default max_pixels
_MANIFEST_FILE = "manifest.tsv"
_VERSION = "colormae-manifest-v2"


@dataclass
class Manifest:
    """Good files of a class-folder tree, their labels, and the files that were skipped."""

    root: Path
    classes: list[str]
    files: list[str] = field(default_factory=list)  # absolute paths every backend reads
    labels: list[int] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path relative to root, reason)
    cache_dir: Path | None = None

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.files)

    def signature(self) -> str:
        """Short hash of the good-file list, used to name derived artefacts (e.g. .beton files)."""
        lines = (f"{f}\t{y}" for f, y in zip(self.files, self.labels, strict=True))
        digest = hashlib.sha1("\n".join(lines).encode())
        return digest.hexdigest()[:12]


def cache_dir_for(root: Path) -> Path:
    """The cache folder of the data folder `root` (an absolute path): `<cache root>/data/<name>-<hash>`.

    Never inside `root`, which may be read-only or shared with other tools.
    """
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:16]
    folder = cache_root() / "data" / f"{root.name}-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _list_files(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names and (relative path, label) of every image-named file, in sorted order."""
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist (expected {root}/<class>/<image>)")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    items = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / name):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel_dir = os.path.relpath(dirpath, root)
            items += [
                (os.path.join(rel_dir, f), label)
                for f in sorted(filenames)
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
            ]
    if not items:
        raise DataError(
            f"no images found in {root}: expected class folders {root}/<class>/<image> "
            f"with extensions {', '.join(IMAGE_EXTENSIONS)}"
        )
    return classes, items


def _check(path: Path, converted: Path, max_pixels: int) -> tuple[str, str]:
    """Validate one file: ("ok", ""), ("convert", new path) or ("bad", reason)."""
    if path.stat().st_size == 0:
        return "bad", "zero-byte file"
    try:
        with Image.open(path) as img:  # reads the header only
            if img.width * img.height > max_pixels:
                return "bad", f"too large ({img.width} x {img.height}; data.max_pixels is {max_pixels})"
            if img.mode not in CONVERTIBLE_MODES:
                return "bad", f"unsupported mode {img.mode} (allowed: {', '.join(CONVERTIBLE_MODES)})"
            img.load()  # a full decode: truncated or corrupt data raises here
            if min(img.size) < MIN_SIDE:
                return "bad", f"too small ({img.width} x {img.height}; at least {MIN_SIDE} pixels a side)"
            if img.format in ("JPEG", "PNG") and img.mode in ("RGB", "L"):
                return "ok", ""
            converted.parent.mkdir(parents=True, exist_ok=True)
            img.convert("RGB").save(converted)
            return "convert", str(converted)
    except UnidentifiedImageError:
        return "bad", "not an image"
    except Image.DecompressionBombError as err:  # over twice Pillow's limit: refused by Image.open itself
        return "bad", f"too large ({err}; data.max_pixels is {max_pixels})"
    except (OSError, SyntaxError, ValueError) as err:
        return "bad", f"corrupt or truncated ({err})"


@contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `lock_path` (created if needed): one process at a time, even across
    the ranks of a job on one machine (and across machines on file systems that support flock)."""
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_cache(path: Path, header: str) -> dict[str, tuple[str, str, str, str]]:
    if not path.exists():
        return {}
    lines = path.read_text().splitlines()
    if not lines or lines[0] != header:  # another format, or files checked against another pixel limit
        return {}
    entries = {}
    for line in lines[1:]:
        rel, size, mtime, status, detail = line.split("\t")
        entries[rel] = (size, mtime, status, detail)
    return entries


def _write_cache(path: Path, header: str, entries: dict[str, tuple[str, str, str, str]]) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text("\n".join([header, *("\t".join((rel, *e)) for rel, e in entries.items())]) + "\n")
    os.replace(tmp, path)  # atomic: concurrent ranks never see half a file


def _validate(root: Path, items: list[tuple[str, int]], cache: Path, workers: int | None, max_pixels: int
              ) -> dict[str, tuple[str, str, str, str]]:
    """(size, mtime, status, detail) per file: cached entries still valid, the rest decoded now."""
    header = f"{_VERSION}\tmax_pixels={max_pixels}"
    old = _read_cache(cache / _MANIFEST_FILE, header)
    entries: dict[str, tuple[str, str, str, str]] = {}
    todo = []
    for rel, _ in items:
        try:
            st = os.stat(root / rel)
        except OSError as err:  # a dangling symlink, a symlink loop, no permission
            entries[rel] = ("", "", "bad", f"unreadable ({err.strerror})")
            continue
        size, mtime = str(st.st_size), str(st.st_mtime_ns)
        cached = old.get(rel)
        if cached and cached[:2] == (size, mtime) and (cached[2] != "convert" or Path(cached[3]).exists()):
            entries[rel] = cached
        else:
            todo.append((rel, size, mtime))
    if todo:
        converted = cache / "converted"
        # threads: PIL decodes without the GIL; images over the limit are skipped and counted, not warned of
        with ThreadPoolExecutor(workers or os.cpu_count()) as pool, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            results = pool.map(lambda t: _check(root / t[0], converted / (t[0] + ".png"), max_pixels), todo)
            results = tqdm(results, total=len(todo), desc=f"scan {root}", unit="file",
                           disable=not sys.stderr.isatty())
            for (rel, size, mtime), (status, detail) in zip(todo, results, strict=True):
                entries[rel] = (size, mtime, status, detail)
        _write_cache(cache / _MANIFEST_FILE, header, entries)
    return entries


def scan(root: str | os.PathLike, workers: int | None = None, max_pixels: int | None = None) -> Manifest:
    """Validate every image under `root` (cached), log and return the skipped ones.

    Images over `max_pixels` (default: Pillow's decompression-bomb limit) are skipped; Pillow's own
    limit is set to the same value, so the loaders decode every image the scan keeps. Raises DataError
    (a FileNotFoundError) with the expected layout when `root` is missing or holds no usable image.
    """
    max_pixels = max_pixels or PILLOW_MAX_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    root = Path(root).expanduser().resolve()
    classes, items = _list_files(root)
    if (root / ".colormae").is_dir():
        log.warning("%s/.colormae is an old cache folder, no longer used: delete it (tools such as "
                    "torchvision's ImageFolder take it for a class)", root)
    cache = cache_dir_for(root)
    with exclusive(cache / "manifest.lock"):
        entries = _validate(root, items, cache, workers, max_pixels)

    good = [(rel, label) for rel, label in items if entries[rel][2] != "bad"]
    used = sorted({label for _, label in good})
    if len(used) < len(classes):
        unused = [name for label, name in enumerate(classes) if label not in used]
        log.warning("%d class folders of %s hold no usable image and are not classes: %s", len(unused), root,
                    ", ".join(unused[:10]) + (" ..." if len(unused) > 10 else ""))
    dense = {label: index for index, label in enumerate(used)}  # labels 0..C-1 over the real classes
    manifest = Manifest(root=root, classes=[classes[label] for label in used], cache_dir=cache)
    manifest.skipped = [(rel, entries[rel][3]) for rel, _ in items if entries[rel][2] == "bad"]
    for rel, label in good:
        _, _, status, detail = entries[rel]
        manifest.files.append(detail if status == "convert" else str(root / rel))
        manifest.labels.append(dense[label])
    if manifest.skipped:
        shown = "; ".join(f"{rel}: {reason}" for rel, reason in manifest.skipped[:10])
        more = f" (and {manifest.num_skipped - 10} more)" if manifest.num_skipped > 10 else ""
        log.warning("skipped %d of %d files in %s: %s%s", manifest.num_skipped, len(items), root, shown, more)
    if not manifest.files:
        raise DataError(f"no usable images in {root}: all {len(items)} files were skipped")
    return manifest
