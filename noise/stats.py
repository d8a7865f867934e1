"""Mask statistics: how much masks clump, how big their visible regions are, where their power lies.

- ``neighbour_agreement``: share of adjacent patch pairs (right and down neighbours) that are both
  hidden or both visible; uniform random masking at ratio 0.75 gives about 0.62.
- ``visible_region``: mean size, in patches, of the 4-connected regions of visible patches.
- ``low`` / ``mid`` / ``high``: shares of the mask's spectral power (mean removed) at radial
  frequencies up to 1/6, up to 1/3 and above 1/3 cycles per patch (they sum to 1).
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from noise.masks import MaskGenerator

STATISTICS = ("neighbour_agreement", "visible_region", "low", "mid", "high")
BAND_EDGES = (1 / 6, 1 / 3)  # cycles per patch between the low, mid and high bands
DEFAULT_MASKS = 2000  # masks per estimate: standard errors of about 0.002 on the shares


def per_mask_statistics(masks: np.ndarray, grid: int) -> dict[str, np.ndarray]:
    """Each statistic of ``STATISTICS`` for each boolean mask of ``masks`` (B, grid*grid), True = hidden."""
    hidden = np.asarray(masks, dtype=bool).reshape(-1, grid, grid)
    agree_right = hidden[:, :, 1:] == hidden[:, :, :-1]
    agree_down = hidden[:, 1:, :] == hidden[:, :-1, :]
    pairs = agree_right[0].size + agree_down[0].size
    agreement = (agree_right.sum(axis=(1, 2)) + agree_down.sum(axis=(1, 2))) / pairs

    within_a_mask = np.zeros((3, 3, 3), dtype=bool)
    within_a_mask[1] = ndimage.generate_binary_structure(2, 1)  # 4-connected, never across masks
    labels, count = ndimage.label(~hidden, structure=within_a_mask)
    mask_of_region = np.zeros(count + 1, dtype=np.int64)
    where = np.nonzero(labels)
    mask_of_region[labels[where]] = where[0]
    regions = np.bincount(mask_of_region[1:], minlength=len(hidden))
    region_size = (~hidden).sum(axis=(1, 2)) / np.maximum(regions, 1)

    visible = (~hidden).astype(np.float64)
    power = np.abs(np.fft.fft2(visible - visible.mean(axis=(1, 2), keepdims=True))) ** 2
    frequency = np.hypot(*np.meshgrid(np.fft.fftfreq(grid), np.fft.fftfreq(grid), indexing="ij"))
    band = np.digitize(frequency, BAND_EDGES, right=True)  # 0 low, 1 mid, 2 high; DC holds no power
    total = np.maximum(power.sum(axis=(1, 2)), 1e-12)
    shares = {name: power[:, band == i].sum(axis=1) / total for i, name in enumerate(("low", "mid", "high"))}
    return {"neighbour_agreement": agreement, "visible_region": region_size, **shares}


def mask_statistics(masks: np.ndarray, grid: int) -> dict[str, float]:
    """The mean of each statistic over ``masks`` (B, grid*grid)."""
    return {name: float(values.mean()) for name, values in per_mask_statistics(masks, grid).items()}


def colour_statistics(
    colours: Sequence[str],
    grid: int = 14,
    ratio: float = 0.75,
    *,
    count: int = DEFAULT_MASKS,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    bank_path: str | Path | None = None,
) -> dict[str, dict[str, float]]:
    """``mask_statistics`` of ``count`` masks per mask type (a colour or ``"random"``), as runs draw them."""
    results = {}
    for colour in colours:
        generator = MaskGenerator(colour, grid, ratio, seed=seed, cache_dir=cache_dir, bank_path=bank_path)
        results[colour] = mask_statistics(generator(count, epoch=0, index=0), grid)
    return results


def format_table(statistics: dict[str, dict[str, float]]) -> str:
    """``colour_statistics`` as a text table, one row per mask type."""
    columns = [(name, max(len(name), 6) + 2) for name in STATISTICS]
    lines = [f"{'mask':<8}" + "".join(f"{name:>{width}}" for name, width in columns)]
    for colour, values in statistics.items():
        lines.append(f"{colour:<8}" + "".join(f"{values[name]:>{width}.3f}" for name, width in columns))
    return "\n".join(lines)
