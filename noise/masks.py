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
    their random words come from a counter-based generator (splitmix64 keyed by those four values,
    `random_words`), whatever was drawn before. So any backend, worker count, prefetch depth or
    resume point gives the same masks, and each distributed rank its own. Arrays live on ``device``
    (numpy for "cpu", CuPy for "cuda[:N]"); the words are drawn there, in a few array expressions
    per batch (no host generator, no host-to-device copies), with the same bits on both devices.

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
        if not 1 <= grid <= 256:
            raise ValueError(f"grid must be in [1, 256]; got {grid}")
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
        key = batch_key(self.seed, self.rank, epoch, index)
        with self._on_device():
            if colour == "random":
                return self._random_masks(key, batch_size)
            return self._colour_masks(key, self._banks[colour], batch_size)

    def _random_masks(self, key: int, batch_size: int):
        """Uniform random masking: in each row the K patches with the smallest random words stay visible."""
        xp, patches = self.xp, self.num_patches
        # The low 16 bits name the patch, so the words of a row are distinct: exactly K are <= the K-th.
        words = random_words(xp, key, (batch_size, patches)) >> SHIFT << SHIFT | xp.arange(patches, dtype=U64)
        kth = xp.partition(words, self.num_visible - 1, axis=1)[:, self.num_visible - 1, None]
        return words > kth

    def _colour_masks(self, key: int, bank, batch_size: int):
        """Per sample: a texture, an offset and flips; the crop's top K stay visible."""
        xp, grid = self.xp, self.grid
        count, height, width = bank.shape
        # Wrapped crops may start anywhere; in-bounds crops where the whole crop fits.
        starts = (height, width) if self.wrap else (height - grid + 1, width - grid + 1)
        words = random_words(xp, key, (5, batch_size))
        texture, top, left = (words[i] % U64(n) for i, n in enumerate((count, *starts)))
        flip = words[3:] >> U64(63) == 1
        cells = xp.arange(grid, dtype=U64)
        rows = (top[:, None] + xp.where(flip[0, :, None], U64(grid - 1) - cells, cells)) % U64(height)
        cols = (left[:, None] + xp.where(flip[1, :, None], U64(grid - 1) - cells, cells)) % U64(width)
        index = (texture[:, None, None] * height + rows[:, :, None]) * width + cols[:, None, :]
        values = bank.reshape(-1)[index.reshape(batch_size, -1)]
        # Crop values are distinct (rank-normalised textures), so exactly K are >= the K-th largest.
        kth = self.num_patches - self.num_visible
        threshold = xp.partition(values, kth, axis=1)[:, kth, None]
        return values < threshold


U64 = np.uint64
SHIFT = U64(16)  # random_masks: the bits of a word that hold its patch number (grids up to 256 x 256)
GOLDEN, MIX1, MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # splitmix64's constants


def mix64(x):
    """splitmix64's finaliser: a bijective scramble of uint64 arrays (numpy or CuPy, wrapping arithmetic)."""
    x = (x ^ (x >> U64(30))) * U64(MIX1)
    x = (x ^ (x >> U64(27))) * U64(MIX2)
    return x ^ (x >> U64(31))


def batch_key(seed: int, rank: int, epoch: int, index: int) -> int:
    """A 64-bit key from (seed, rank, epoch, batch index): each value folded in through splitmix64's
    finaliser, in Python integers (on the host, no arrays: a few microseconds)."""
    key = 0
    for value in (seed, rank, epoch, index):
        x = (key ^ (value + GOLDEN)) % 2**64
        x = (x ^ (x >> 30)) * MIX1 % 2**64
        x = (x ^ (x >> 27)) * MIX2 % 2**64
        key = x ^ (x >> 31)
    return key


def random_words(xp, key: int, shape: tuple[int, ...]):
    """Counter-based random uint64 words: word i is mix64(key + (i + 1) * GOLDEN), splitmix64's i-th
    output from state ``key``. One array expression on the device, the same bits from numpy and CuPy."""
    counters = xp.arange(1, int(np.prod(shape)) + 1, dtype=U64).reshape(shape)
    return mix64(counters * U64(GOLDEN) + U64(key))


def mask_to_torch(mask, device: str | torch.device | None = None) -> torch.Tensor:
    """A numpy or CuPy boolean mask as a torch BoolTensor, sharing memory (DLPack: no host copy)."""
    tensor = torch.from_dlpack(mask.view("uint8")).view(torch.bool)
    return tensor if device is None else tensor.to(device, non_blocking=True)

