"""Colour-noise masks for ColorMAE: textures, pattern banks and the per-sample mask stage."""

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
