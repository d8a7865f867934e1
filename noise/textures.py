"""Colour-noise textures: filtered white noise with an exactly uniform histogram.

One implementation serves numpy and CuPy: every function takes the array module ``xp``.
The random draws always come from a numpy generator on the host, so a given seed gives the
same texture on the CPU and on a GPU.
"""

import sys
from types import ModuleType

import numpy as np
from scipy import ndimage
from tqdm import tqdm

COLOURS = ("white", "red", "blue", "green", "purple")
DEFAULT_ITERATIONS = 5
DEFAULT_SIGMA = 1.0  # red (low-pass) and blue (high-pass), in texture cells
DEFAULT_SIGMAS = (0.5, 2.0)  # green (band-pass) and purple (band-stop): s1 < s2
FILTER = "sampled-gaussian-wrap"  # scipy.ndimage.gaussian_filter(mode="wrap") kernel, by FFT


def get_xp(device: str = "cpu") -> ModuleType:
    """The array module for a device: numpy for ``"cpu"``, CuPy for ``"cuda"`` or ``"cuda:N"``."""
    kind = str(device).split(":")[0]
    if kind == "cpu":
        return np
    if kind != "cuda":
        raise ValueError(f"unknown device {device!r}; allowed: 'cpu', 'cuda', 'cuda:N'")
    try:
        import cupy
    except ImportError as err:
        raise ValueError(f"device {device!r} needs CuPy, which is not installed; use device='cpu'") from err
    if not cupy.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CuPy finds no CUDA device; use device='cpu'")
    return cupy


def check_colour(colour: str, allowed: tuple[str, ...] = COLOURS) -> str:
    """Return ``colour`` or raise ValueError naming the allowed colours."""
    if colour not in allowed:
        raise ValueError(f"unknown mask colour {colour!r}; allowed: {', '.join(allowed)}")
    return colour


def gaussian_response(xp: ModuleType, shape: tuple[int, int], sigma: float):
    """Frequency response, for ``rfft2`` spectra, of a wrap-around blur with a sampled Gaussian kernel.

    The kernel is scipy's ``gaussian_filter`` kernel (std ``sigma`` cells, radius ``4 sigma``,
    sampled and normalised), wrapped around the borders; its DFT makes one step cost two FFTs
    whatever ``sigma`` is, and keeps textures seamless. The blur is separable: the response is a
    column factor times a row factor, each the DFT of the 1-D kernel's impulse response.
    """

    def response(length: int) -> np.ndarray:
        impulse = np.zeros(length)
        impulse[0] = 1.0
        return np.fft.fft(ndimage.gaussian_filter1d(impulse, sigma, mode="wrap")).real

    rows, cols = response(shape[0]), response(shape[1])[: shape[1] // 2 + 1]
    return xp.asarray(rows[:, None] * cols[None, :])


def filter_response(
    colour: str,
    xp: ModuleType,
    shape: tuple[int, int],
    sigma: float = DEFAULT_SIGMA,
    sigmas: tuple[float, float] = DEFAULT_SIGMAS,
):
    """Frequency response of one filter step for ``colour`` (the spec's table), or None for white."""
    check_colour(colour)
    if colour == "white":
        return None
    if colour in ("red", "blue"):
        low = gaussian_response(xp, shape, sigma)
        return low if colour == "red" else 1 - low
    s1, s2 = sigmas
    if not 0 < s1 < s2:
        raise ValueError(f"sigmas must satisfy 0 < s1 < s2; got {sigmas}")
    band = gaussian_response(xp, shape, s1) - gaussian_response(xp, shape, s2)
    return band if colour == "green" else 1 - band


def apply_filter(textures, response, xp: ModuleType = np):
    """Filter textures (..., M, N) with a ``filter_response`` by FFT: float64 (..., M, N)."""
    size = textures.shape[-2:]
    spectrum = xp.fft.rfft2(xp.asarray(textures, dtype=xp.float64)) * response
    return xp.fft.irfft2(spectrum, s=size)


def _ranks(flat, tie_order, xp: ModuleType):
    """Rows of ``flat`` (T, N) replaced by rank / (N - 1) (float32); equal values ordered by ``tie_order``.

    ``tie_order`` holds one random permutation per row. Ties are rare in float64, so a fast sort
    comes first; only when it finds equal values does a stable sort of the randomly permuted row
    order them randomly.
    """
    count = flat.shape[1]
    rows = xp.arange(flat.shape[0])[:, None]
    order = xp.argsort(flat, axis=1)
    ordered = xp.take_along_axis(flat, order, axis=1)
    if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        shuffled = xp.take_along_axis(flat, tie_order, axis=1)
        order = tie_order[rows, xp.argsort(shuffled, axis=1, kind="stable")]
    ranks = xp.empty(flat.shape, dtype=xp.float32)
    ranks[rows, order] = xp.arange(count, dtype=xp.float32) / (count - 1)
    return ranks


def _tie_orders(rng: np.random.Generator, textures: int, count: int) -> np.ndarray:
    """One uniformly random permutation of ``range(count)`` per texture."""
    return rng.permuted(np.tile(np.arange(count), (textures, 1)), axis=1)


def rank_normalise(x, *, seed: int = 0, xp: ModuleType = np):
    """Map each texture (last two axes) to exactly uniform values rank / (N - 1), ties broken randomly."""
    shape = x.shape
    flat = xp.asarray(x).reshape(-1, shape[-2] * shape[-1])
    tie_order = xp.asarray(_tie_orders(np.random.default_rng(seed), *flat.shape))
    return _ranks(flat, tie_order, xp).reshape(shape)


def colour_noise(
    colour: str,
    shape: tuple[int, ...],
    *,
    seed: int,
    xp: ModuleType = np,
    iterations: int = DEFAULT_ITERATIONS,
    sigma: float = DEFAULT_SIGMA,
    sigmas: tuple[float, float] = DEFAULT_SIGMAS,
    progress: str | None = None,
):
    """Colour-noise textures of ``shape`` (..., M, N), float32, each exactly uniform on [0, 1].

    White noise is filtered ``iterations`` times by the colour's filter (red: low-pass G_s;
    blue: high-pass 1 - G_s; green: band-pass G_s1 - G_s2; purple: band-stop 1 - (G_s1 - G_s2);
    white: none), and after every step each texture is rank-normalised (value -> rank / (N-1),
    ties broken randomly), so the histogram stays exactly uniform. ``progress`` labels a progress
    bar over the filter steps, shown on a terminal only.
    """
    check_colour(colour)
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"shape must be (..., M, N) with positive sizes; got {shape}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1; got {iterations}")
    rng = np.random.default_rng(seed)
    size = shape[-2:]
    white = xp.asarray(rng.random(shape)).reshape(-1, size[0] * size[1])
    tie_order = xp.asarray(_tie_orders(rng, *white.shape))
    x = _ranks(white, tie_order, xp)
    response = filter_response(colour, xp, size, sigma, sigmas)
    if response is not None:
        steps = tqdm(range(iterations), desc=progress, unit="filter step", leave=False,
                     disable=progress is None or not sys.stderr.isatty())
        for _ in steps:
            x = _ranks(apply_filter(x.reshape(-1, *size), response, xp).reshape(x.shape), tie_order, xp)
    return x.reshape(shape)


def radial_power_spectrum(textures: np.ndarray, bins: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged power spectrum of numpy textures (..., M, N), averaged over textures.

    Returns (bin centres in cycles per cell, from 0 to 0.5; mean power per bin). The mean of
    each texture is removed first, so the DC term does not count.
    """
    x = np.asarray(textures, dtype=np.float64).reshape(-1, *textures.shape[-2:])
    x = x - x.mean(axis=(-2, -1), keepdims=True)
    power = (np.abs(np.fft.fft2(x)) ** 2).mean(axis=0)
    fy = np.fft.fftfreq(x.shape[-2])[:, None]
    fx = np.fft.fftfreq(x.shape[-1])[None, :]
    radius = np.sqrt(fy**2 + fx**2)
    edges = np.linspace(0.0, 0.5, bins + 1)
    which = np.digitize(radius, edges[1:-1])
    inside = (radius > 0) & (radius <= 0.5)
    totals = np.bincount(which[inside], weights=power[inside], minlength=bins)
    counts = np.bincount(which[inside], minlength=bins)
    return (edges[:-1] + edges[1:]) / 2, totals / np.maximum(counts, 1)
