"""Pattern banks: L textures of M x M per colour, generated once and cached on disk as npz."""

import hashlib
import json
import logging
import os
import zipfile
from pathlib import Path

import numpy as np

from noise.textures import (
    DEFAULT_ITERATIONS,
    DEFAULT_SIGMA,
    DEFAULT_SIGMAS,
    FILTER,
    check_colour,
    colour_noise,
)
from pipelines.cache import cache_root

log = logging.getLogger(__name__)

BANK_VERSION = 3  # bump when the generator changes, so stale caches are regenerated
DEFAULT_COUNT = 64  # textures per bank
DEFAULT_SIZE = 64  # M: a 14 x 14 crop has 64 * 64 offsets (wrap-around) x 4 flips per texture


def default_cache_dir() -> Path:
    """``banks`` in the user cache (``pipelines.cache.cache_root``: ``$COLORMAE_CACHE``, else
    ``$XDG_CACHE_HOME/colormae``, else ``~/.cache/colormae``, else a temporary folder)."""
    return cache_root() / "banks"


def bank_params(
    colour: str,
    *,
    count: int = DEFAULT_COUNT,
    size: int = DEFAULT_SIZE,
    seed: int = 0,
    iterations: int = DEFAULT_ITERATIONS,
    sigma: float = DEFAULT_SIGMA,
    sigmas: tuple[float, float] = DEFAULT_SIGMAS,
) -> dict:
    """Everything that determines a bank (what is stored with it and logged with a run)."""
    check_colour(colour)
    return {
        "colour": colour,
        "count": int(count),
        "size": int(size),
        "seed": int(seed),
        "iterations": int(iterations),
        "sigma": float(sigma),
        "sigmas": [float(s) for s in sigmas],
        "filter": FILTER,
        "version": BANK_VERSION,
    }


def generate_bank(params: dict) -> np.ndarray:
    """Generate the textures described by ``bank_params(...)`` (no caching; a progress bar on a terminal)."""
    shape = (params["count"], params["size"], params["size"])
    return colour_noise(
        params["colour"],
        shape,
        seed=params["seed"],
        iterations=params["iterations"],
        sigma=params["sigma"],
        sigmas=tuple(params["sigmas"]),
        progress=f"{params['colour']} bank ({shape[0]} x {shape[1]} x {shape[2]})",
    )


def _read_cache(path: Path, params: dict) -> np.ndarray | None:
    """The cached textures when ``path`` holds a readable bank with exactly these parameters."""
    try:
        with np.load(path) as data:
            if json.loads(str(data["params"])) == params:
                return data["textures"]
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as err:
        log.warning("ignoring unreadable bank cache %s (%s); regenerating", path, err)
    return None


def pattern_bank(
    colour: str,
    *,
    count: int = DEFAULT_COUNT,
    size: int = DEFAULT_SIZE,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    iterations: int = DEFAULT_ITERATIONS,
    sigma: float = DEFAULT_SIGMA,
    sigmas: tuple[float, float] = DEFAULT_SIGMAS,
) -> np.ndarray:
    """Textures [count, size, size] float32 for ``colour``, from the cache or generated and cached.

    The npz stores the parameters and the format version; a file whose stored parameters differ
    is regenerated. ``cache_dir`` defaults to ``default_cache_dir()``; an unwritable cache
    directory only costs a warning.
    """
    params = bank_params(
        colour, count=count, size=size, seed=seed, iterations=iterations, sigma=sigma, sigmas=sigmas
    )
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir or default_cache_dir()) / f"{colour}-{digest}.npz"
    if path.is_file():
        cached = _read_cache(path, params)
        if cached is not None:
            return cached
    bank = generate_bank(params)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, textures=bank, params=np.array(json.dumps(params)))
        os.replace(tmp, path)
    except OSError as err:
        log.warning("could not cache pattern bank at %s (%s); it will be regenerated next time", path, err)
    return bank


def _first_array(path: Path) -> tuple[str, np.ndarray]:
    """Name and contents of the first array in an npz archive."""
    with open(path, "rb") as f:
        if f.read(2) != b"PK":  # a zip archive; np.load would try anything else as a pickle
            raise ValueError("not an npz archive (no zip header)")
    data = np.load(path, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError("not an npz archive")
    with data:
        if not data.files:
            raise ValueError("the archive holds no arrays")
        return data.files[0], data[data.files[0]]


def load_pattern_file(path: str | Path) -> np.ndarray:
    """Load the authors' pattern file: an npz whose first array holds textures [L, M, N] (float32)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pattern file {path} does not exist")
    try:
        name, textures = _first_array(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"pattern file {path} is not a readable npz of textures [L, M, N]: {err}") from err
    if textures.ndim != 3 or 0 in textures.shape:
        raise ValueError(f"pattern file {path}: array {name!r} is {textures.shape}; expected [L, M, N]")
    if textures.dtype == bool or not np.issubdtype(textures.dtype, np.number):
        raise ValueError(f"pattern file {path}: array {name!r} has dtype {textures.dtype}; expected numbers")
    textures = textures.astype(np.float32)
    if not np.isfinite(textures).all():
        raise ValueError(f"pattern file {path}: array {name!r} holds NaN or infinite values")
    return textures
