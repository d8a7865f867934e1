"""The mask stage: per-sample crops of colour-noise textures -> boolean masks (True = masked)."""

import contextlib
import itertools
from pathlib import Path

import numpy as np
import torch

from noise.bank import load_pattern_file, pattern_bank
from noise.textures import COLOURS, check_colour, get_xp, rank_normalise

MASK_TYPES = (*COLOURS, "random")


def check_ratio(ratio: float) -> None:
    """Raise ValueError unless 0 < ratio < 1 (the share of patches hidden)."""
    if not 0 < ratio < 1:
        raise ValueError(f"mask_ratio must be in (0, 1); got {ratio}")


def parse_schedule(text: str) -> list[tuple[int, str]]:
    """Parse ``"green"`` or ``"green@0,blue@200,red@250"`` into [(start_epoch, colour), ...].

    A bare colour starts at epoch 0. The first item must start at epoch 0 and the start epochs
    must increase strictly, in the order written.
    """
    schedule = []
    for item in str(text).split(","):
        colour, _, start = (part.strip() for part in item.partition("@"))
        check_colour(colour, MASK_TYPES)
        if start and not start.isdigit():
            raise ValueError(
                f"bad schedule item {item.strip()!r} in {text!r}: expected colour@epoch, epoch >= 0"
            )
        schedule.append((int(start or 0), colour))
    epochs = [epoch for epoch, _ in schedule]
    if epochs[0] != 0 or any(b <= a for a, b in itertools.pairwise(epochs)):
        raise ValueError(
            f"bad schedule {text!r}: the first start epoch must be 0 and the start epochs must increase "
            "strictly, e.g. 'green' or 'green@0,blue@200,red@250,purple@275'"
        )
    return schedule


def colour_at(schedule: list[tuple[int, str]], epoch: int) -> str:
    """The colour in force at ``epoch``: the last entry that started at or before it."""
    return [colour for start, colour in schedule if start <= epoch][-1]


class MaskGenerator:
    """Draws masks (B, grid*grid), True = masked, with exactly K = int(grid*grid*(1-ratio)) visible.

    Each sample draws its own texture, crop offset and horizontal and vertical flips; the K highest
    values of the crop stay visible. Crops of the generated, seamless banks wrap around the texture
    borders; crops of the authors' files (``bank_path``) stay inside them. ``"random"`` is uniform
    random masking.

    The masks of batch ``index`` of ``epoch`` are a pure function of (seed, rank, epoch, index):
    they are drawn from their own numpy generator, seeded by those four values, whatever was drawn
    before. So any backend, worker count, prefetch depth or resume point gives the same masks, and
    each distributed rank its own. Arrays live on ``device`` (numpy for "cpu", CuPy for
    "cuda[:N]"); the draws are made on the host, so both devices give the same masks.

    Banks come from ``pattern_bank(colour, cache_dir=cache_dir, **bank_options)``, or with
    ``bank_path`` from the authors' npz ("{colour}" in the path is replaced by the colour; loaded
    textures are rank-normalised: order kept, ties broken).
    """

    def __init__(
        self,
        schedule: str = "green",
        grid: int = 14,
        mask_ratio: float = 0.75,
        *,
        seed: int = 0,
        rank: int = 0,
        device: str = "cpu",
        bank_path: str | Path | None = None,
        cache_dir: str | Path | None = None,
        bank_options: dict | None = None,
    ):
        check_ratio(mask_ratio)
        if grid < 1:
            raise ValueError(f"grid must be >= 1; got {grid}")
        self.schedule = parse_schedule(schedule)
        self.grid, self.mask_ratio = int(grid), float(mask_ratio)
        self.num_patches = self.grid * self.grid
        self.num_visible = int(self.num_patches * (1 - self.mask_ratio))
        if self.num_visible < 1:
            raise ValueError(f"mask_ratio {mask_ratio} leaves no visible patch on a {grid}x{grid} grid")
        self.seed, self.rank = int(seed), int(rank)
        self.device = str(device)
        self.xp = get_xp(self.device)
        self.wrap = bank_path is None  # generated banks are seamless; the authors' files may not be
        colours = sorted({colour for _, colour in self.schedule} - {"random"})
        self._banks = {
            colour: self._load_bank(colour, bank_path, cache_dir, bank_options or {}) for colour in colours
        }

    def _load_bank(self, colour: str, bank_path, cache_dir, options: dict):
        """The colour's textures on the generator's device."""
        if bank_path is None:
            textures = pattern_bank(colour, cache_dir=cache_dir, **options)
        else:
            path = str(bank_path).replace("{colour}", colour)
            textures = rank_normalise(load_pattern_file(path))
        if min(textures.shape[1:]) < self.grid:
            raise ValueError(
                f"grid {self.grid} is larger than the {colour} textures {textures.shape[1:]}; "
                "use textures of at least grid x grid cells"
            )
        with self._on_device():
            return self.xp.asarray(textures)

    def textures(self, colour: str) -> np.ndarray:
        """The colour's texture bank (L, M, N) as a host numpy array (a copy when it lives on a GPU)."""
        bank = self._banks[colour]
        return bank if isinstance(bank, np.ndarray) else bank.get()

    def _on_device(self):
        """Context that makes CuPy allocate on this generator's GPU (no-op on the CPU)."""
        if self.xp is np:
            return contextlib.nullcontext()
        index = self.device.partition(":")[2]
        return self.xp.cuda.Device(int(index) if index else None)

    def colour(self, epoch: int) -> str:
        """The mask type in force at ``epoch``."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0; got {epoch}")
        return colour_at(self.schedule, epoch)

    def __call__(self, batch_size: int, *, epoch: int, index: int):
        """The boolean masks (batch_size, grid*grid), True = masked, of batch ``index`` of ``epoch``."""
        colour = self.colour(epoch)
        if index < 0:
            raise ValueError(f"batch index must be >= 0; got {index}")
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(self.rank, epoch, index)))
        with self._on_device():
            if colour == "random":
                return self._random_masks(rng, batch_size)
            return self._colour_masks(rng, self._banks[colour], batch_size)

    def _random_masks(self, rng: np.random.Generator, batch_size: int):
        """Uniform random masking: each row is an independent random permutation of K False entries."""
        row = np.arange(self.num_patches) >= self.num_visible
        return self.xp.asarray(rng.permuted(np.tile(row, (batch_size, 1)), axis=1))

    def _colour_masks(self, rng: np.random.Generator, bank, batch_size: int):
        """Per sample: a texture, an offset and flips; the crop's top K stay visible."""
        xp, grid = self.xp, self.grid
        count, height, width = bank.shape
        # Wrapped crops may start anywhere; in-bounds crops where the whole crop fits.
        starts = (height, width) if self.wrap else (height - grid + 1, width - grid + 1)
        # Small per-sample draws on the host (same stream on every device), index maths on xp.
        texture = xp.asarray(rng.integers(count, size=batch_size))
        top = xp.asarray(rng.integers(starts[0], size=batch_size))
        left = xp.asarray(rng.integers(starts[1], size=batch_size))
        flip = xp.asarray(rng.integers(2, size=(2, batch_size), dtype=bool))
        cells = xp.arange(grid)
        rows = (top[:, None] + xp.where(flip[0, :, None], grid - 1 - cells, cells)) % height
        cols = (left[:, None] + xp.where(flip[1, :, None], grid - 1 - cells, cells)) % width
        index = (texture[:, None, None] * height + rows[:, :, None]) * width + cols[:, None, :]
        values = bank.reshape(-1)[index.reshape(batch_size, -1)]
        # Crop values are distinct (rank-normalised textures), so exactly K are >= the K-th largest.
        kth = self.num_patches - self.num_visible
        threshold = xp.partition(values, kth, axis=1)[:, kth, None]
        return values < threshold


def mask_to_torch(mask, device: str | torch.device | None = None) -> torch.Tensor:
    """A numpy or CuPy boolean mask as a torch BoolTensor, sharing memory (DLPack: no host copy)."""
    tensor = torch.from_dlpack(mask.view("uint8")).view(torch.bool)
    return tensor if device is None else tensor.to(device, non_blocking=True)

