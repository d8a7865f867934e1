"""Colour-noise masks for ColorMAE: textures, pattern banks and the per-sample mask stage.

Defaults (all configurable, and stored with every cached bank):
- textures: 5 filter steps, each followed by exact rank normalisation; red/blue sigma 1.0,
  green/purple sigmas (0.5, 2.0), in texture cells (``noise.textures``);
- banks: 64 textures of 64 x 64 per colour, seed 0, cached as npz in the user cache's ``banks/``
  (``$COLORMAE_CACHE``, else ``~/.cache/colormae``: ``noise.bank``); all five generate in about a
  second on 2 cores;
- filter: the sampled Gaussian kernel of ``scipy.ndimage.gaussian_filter(mode="wrap")``, applied by FFT;
- masks: per-sample texture, offset (wrap-around for generated banks, in bounds for the authors'
  files) and flips; the masks of a batch are a pure function of (seed, rank, epoch, batch index)
  (``noise.masks.MaskGenerator``);
- statistics: neighbour agreement, visible region size and spectral band shares (``noise.stats``).

``python -m noise.show --out masks.png`` draws a gallery of textures, masks and spectra and prints
the statistics of each mask type. The modules load on first use, so `noise.config` (the config
section) imports without torch.
"""

from importlib import import_module

from noise.config import MaskConfig

_LAZY = {
    **dict.fromkeys(("BANK_VERSION", "DEFAULT_COUNT", "DEFAULT_SIZE", "bank_params", "default_cache_dir",
                     "load_pattern_file", "pattern_bank"), "noise.bank"),
    **dict.fromkeys(("MASK_TYPES", "MaskGenerator", "check_ratio", "colour_at", "mask_to_torch",
                     "parse_schedule"),
                    "noise.masks"),
    **dict.fromkeys(("COLOURS", "DEFAULT_ITERATIONS", "DEFAULT_SIGMA", "DEFAULT_SIGMAS", "colour_noise",
                     "get_xp", "radial_power_spectrum", "rank_normalise"), "noise.textures"),
}
__all__ = ["MaskConfig", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'noise' has no attribute {name!r}")
    return getattr(import_module(_LAZY[name]), name)
