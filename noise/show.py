"""Mask gallery: per colour a texture, four masks and the radial power spectrum, in one PNG;
the mask statistics of each colour (``noise.stats``) are printed below.

python -m noise.show --out masks.png [--colours green blue random] [--grid 14] [--ratio 0.75]
"""

import argparse
from collections.abc import Sequence
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m noise.show` (plain argparse: --help answers before torch loads)."""
    parser = argparse.ArgumentParser(prog="python -m noise.show", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--colours", nargs="+", default=None,
                        help="mask types to draw: white red blue green purple random (default: all)")
    parser.add_argument("--grid", type=int, default=14, help="patch grid side (image size / patch size) "
                        "(default: 14)")
    parser.add_argument("--ratio", type=float, default=0.75, help="mask ratio in (0, 1) (default: 0.75)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the masks (default: 0)")
    parser.add_argument(
        "--cache-dir", default=None, help="pattern bank cache (default: noise.default_cache_dir())"
    )
    parser.add_argument("--bank", default=None, help="authors' pattern npz ('{colour}' is replaced) "
                        "(default: generated banks)")
    parser.add_argument("--masks", type=int, default=None,
                        help="masks per statistic (default: noise.stats.DEFAULT_MASKS)")
    return parser


if __name__ == "__main__":  # --help and usage errors answer here, before torch and matplotlib load
    build_parser().parse_args()

from pipelines.cache import matplotlib_config

matplotlib_config()  # a font cache that lasts, also where HOME is not writable

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from noise.masks import MASK_TYPES, MaskGenerator
from noise.stats import DEFAULT_MASKS, colour_statistics, format_table
from noise.textures import COLOURS, check_colour, radial_power_spectrum

MASKS_PER_COLOUR = 4


def render(
    path: str | Path,
    colours: Sequence[str] = COLOURS,
    grid: int = 14,
    ratio: float = 0.75,
    *,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    bank_path: str | Path | None = None,
) -> Path:
    """Draw the gallery for ``colours`` into the PNG ``path`` and return the path.

    The textures are the default banks, or the authors' files at ``bank_path`` (as MaskGenerator
    reads it). ``"random"`` is accepted too: its row shows masks only (it has no texture).
    """
    for colour in colours:
        check_colour(colour, MASK_TYPES)
    columns = 2 + MASKS_PER_COLOUR
    figure = Figure(figsize=(2.0 * columns, 2.0 * len(colours)), layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(f"ColorMAE masks (white = visible patch), seed {seed}", fontsize=10)
    axes = figure.subplots(len(colours), columns, squeeze=False)
    for row, colour in zip(axes, colours, strict=True):
        generator = MaskGenerator(colour, grid, ratio, seed=seed, cache_dir=cache_dir, bank_path=bank_path)
        masks = generator(MASKS_PER_COLOUR, epoch=0, index=0)
        for axis, mask in zip(row[1:-1], masks, strict=True):
            axis.imshow(~mask.reshape(grid, grid), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            axis.set_title(f"mask {grid}x{grid}, {ratio:.0%} hidden", fontsize=8)
        for axis in row[:-1]:
            axis.set_xticks([])
            axis.set_yticks([])
        row[0].set_ylabel(colour, fontsize=12)
        if colour == "random":
            row[-1].axis("off")
            row[0].text(0.5, 0.5, "uniform random\n(no texture)", ha="center", va="center", fontsize=9)
        else:
            draw_bank(row[0], row[-1], generator.textures(colour))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def draw_bank(texture_axis, spectrum_axis, bank: np.ndarray) -> None:
    """The bank's first texture and its radially averaged power spectrum (over 16 textures)."""
    texture_axis.imshow(bank[0], cmap="gray", interpolation="nearest")
    texture_axis.set_title(f"texture {bank.shape[1]}x{bank.shape[2]}", fontsize=8)
    freqs, power = radial_power_spectrum(bank[:16])
    spectrum_axis.semilogy(freqs, power / power.mean())
    spectrum_axis.set_ylim(1e-3, 3e1)
    spectrum_axis.set_title("radial power spectrum", fontsize=8)
    spectrum_axis.set_xlabel("cycles / cell", fontsize=8)
    spectrum_axis.tick_params(labelsize=7)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: draw the gallery and print the statistics table."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.colours, args.masks = args.colours or list(MASK_TYPES), args.masks or DEFAULT_MASKS
    options = {"seed": args.seed, "cache_dir": args.cache_dir, "bank_path": args.bank}
    try:
        path = render(args.out, args.colours, args.grid, args.ratio, **options)
        statistics = colour_statistics(args.colours, args.grid, args.ratio, count=args.masks, **options)
    except ValueError as err:
        parser.error(str(err))
    print(f"wrote {path}\n\nmask statistics of {args.masks} masks, grid {args.grid}, ratio {args.ratio}:")
    print(format_table(statistics))


if __name__ == "__main__":
    main()
