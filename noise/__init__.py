"""Colour-noise masks for ColorMAE: textures, pattern banks and the per-sample mask stage.

Defaults (all configurable, and stored with every cached bank):
- textures: 5 filter steps, each followed by exact rank normalisation; red/blue sigma 1.0,
  green/purple sigmas (0.5, 2.0), in texture cells (``noise.textures``);
- banks: 64 textures of 64 x 64 per colour, seed 0, cached as npz in ``$COLORMAE_CACHE/banks``
  or ``~/.cache/colormae/banks`` (``noise.bank``); all five generate in about a second on 2 cores;
- filter: the sampled Gaussian kernel of ``scipy.ndimage.gaussian_filter(mode="wrap")``, applied by FFT;
- masks: per-sample texture, offset (wrap-around for generated banks, in bounds for the authors'
  files) and flips; the masks of a batch are a pure function of (seed, rank, epoch, batch index)
  (``noise.masks.MaskGenerator``);
- statistics: neighbour agreement, visible region size and spectral band shares (``noise.stats``).

``python -m noise.show --out masks.png`` draws a gallery of textures, masks and spectra and prints
the statistics of each mask type.
"""

from noise.bank import (
    BANK_VERSION,
    DEFAULT_COUNT,
    DEFAULT_SIZE,
    bank_params,
    default_cache_dir,
    load_pattern_file,
    pattern_bank,
)
from noise.masks import MASK_TYPES, MaskGenerator, colour_at, mask_to_ids, mask_to_torch, parse_schedule
from noise.textures import (
    COLOURS,
    DEFAULT_ITERATIONS,
    DEFAULT_SIGMA,
    DEFAULT_SIGMAS,
    colour_noise,
    get_xp,
    radial_power_spectrum,
    rank_normalise,
)

__all__ = [
    "BANK_VERSION",
    "COLOURS",
    "DEFAULT_COUNT",
    "DEFAULT_ITERATIONS",
    "DEFAULT_SIGMA",
    "DEFAULT_SIGMAS",
    "DEFAULT_SIZE",
    "MASK_TYPES",
    "MaskGenerator",
    "bank_params",
    "colour_at",
    "colour_noise",
    "default_cache_dir",
    "get_xp",
    "load_pattern_file",
    "mask_to_ids",
    "mask_to_torch",
    "parse_schedule",
    "pattern_bank",
    "radial_power_spectrum",
    "rank_normalise",
]
