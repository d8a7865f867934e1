"""Tests for noise/: textures, banks, the mask generator and the torch helpers."""

import io
import logging
import sys

import numpy as np
import pytest
import torch
from scipy import ndimage, stats

import noise
import noise.stats
from model import mask_to_ids
from noise import (
    COLOURS,
    MASK_TYPES,
    MaskGenerator,
    colour_at,
    colour_noise,
    load_pattern_file,
    mask_to_torch,
    parse_schedule,
    pattern_bank,
    radial_power_spectrum,
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One bank cache for the module, so each default bank is generated once."""
    return tmp_path_factory.mktemp("banks")


def make_generator(cache_dir, schedule="green", **kwargs) -> MaskGenerator:
    return MaskGenerator(schedule, cache_dir=cache_dir, **kwargs)


def masks_of(generator: MaskGenerator, batch_size: int, epoch: int = 0, index: int = 0) -> np.ndarray:
    return generator(batch_size, epoch=epoch, index=index)


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize("mask_type", MASK_TYPES)
@pytest.mark.parametrize(("grid", "ratio"), [(14, 0.75), (7, 0.6)])
def test_exact_visible_count(cache_dir, mask_type, grid, ratio):
    generator = make_generator(cache_dir, mask_type, grid=grid, mask_ratio=ratio)
    mask = masks_of(generator, 64)
    assert mask.shape == (64, grid * grid) and mask.dtype == bool
    assert ((~mask).sum(axis=1) == int(grid * grid * (1 - ratio))).all()


@pytest.mark.parametrize("mask_type", MASK_TYPES)
def test_rows_differ_within_and_across_batches(cache_dir, mask_type):
    generator = make_generator(cache_dir, mask_type)
    first = masks_of(generator, 32)
    assert len(np.unique(first, axis=0)) >= 30
    both = np.concatenate([first, masks_of(generator, 32, index=1), masks_of(generator, 32, epoch=1)])
    assert len(np.unique(both, axis=0)) >= 90


def test_masks_are_a_pure_function_of_seed_rank_epoch_and_index(cache_dir):
    """Any call order, any earlier draws, a fresh generator: batch (epoch, index) gets the same masks."""
    schedule = "green@0,random@1,blue@2"
    keys = [(epoch, index) for epoch in range(3) for index in range(3)]
    forward = make_generator(cache_dir, schedule, seed=3)
    expected = {key: masks_of(forward, 16, *key) for key in keys}
    backward = make_generator(cache_dir, schedule, seed=3)
    for key in reversed(keys):
        masks_of(backward, 5, 2, 7)  # a draw in between changes nothing
        np.testing.assert_array_equal(masks_of(backward, 16, *key), expected[key])
    assert len({expected[key].tobytes() for key in keys}) == len(keys)
    for options in ({"seed": 3, "rank": 1}, {"seed": 4}):
        other = make_generator(cache_dir, schedule, **options)
        assert not any(np.array_equal(masks_of(other, 16, *key), expected[key]) for key in keys)
    # the schedule decides the colour of each epoch: epoch 2 draws blue masks, not green ones
    blue = make_generator(cache_dir, "blue", seed=3)
    np.testing.assert_array_equal(masks_of(blue, 16, 2, 1), expected[2, 1])


@pytest.mark.parametrize("source", ["generated", "file"])
def test_each_mask_is_the_top_k_of_a_transformed_crop(tmp_path, source):
    """Brute force: every mask must match one of all crops x flips of the bank; crops
    wrap around the borders of generated (seamless) textures and stay inside the authors' files."""
    grid, ratio, size = 4, 0.5, 6
    if source == "file":
        textures = np.random.default_rng(0).permutation(2 * size * size).reshape(2, size, size)
        np.savez(tmp_path / "bank.npz", textures)
        generator = MaskGenerator("blue", grid, ratio, bank_path=tmp_path / "bank.npz")
        offsets = range(size - grid + 1)
    else:
        options = {"count": 2, "size": size}
        generator = MaskGenerator("blue", grid, ratio, cache_dir=tmp_path, bank_options=options)
        offsets = range(size)
    textures = generator.textures("blue")

    cells = np.arange(grid)
    candidates = []
    for texture in textures:
        for top in offsets:
            for left in offsets:
                crop = texture[np.ix_((top + cells) % size, (left + cells) % size)]
                for flipped in (crop, crop[::-1], crop[:, ::-1], crop[::-1, ::-1]):
                    candidates.append(flipped)
    candidates = np.stack(candidates).reshape(len(candidates), -1)
    keep = int(grid * grid * (1 - ratio))
    threshold = np.sort(candidates, axis=1)[:, -keep, None]
    candidate_masks = {row.tobytes() for row in candidates < threshold}

    masks = masks_of(generator, 1000)
    assert all(row.tobytes() in candidate_masks for row in masks)
    # Most distinct crops show up; sharing offsets or flips across the batch would give far fewer.
    assert len({row.tobytes() for row in masks}) > 0.6 * len(candidate_masks)


# ---------------------------------------------------------------- schedules


def test_parse_schedule_and_colour_at(cache_dir):
    schedule = parse_schedule("green@0, blue@200,red@250,purple@275")
    assert schedule == [(0, "green"), (200, "blue"), (250, "red"), (275, "purple")]
    colours = [colour_at(schedule, epoch) for epoch in (0, 199, 200, 260, 999)]
    assert colours == ["green", "green", "blue", "red", "purple"]
    assert parse_schedule("random") == [(0, "random")]

    generator = make_generator(cache_dir, "green@0,white@5")
    assert [generator.colour(epoch) for epoch in (0, 4, 5, 9)] == ["green", "green", "white", "white"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("orange", "unknown mask colour 'orange'; allowed: white, red"),
        ("green@10", "first start epoch must be 0"),
        ("green@0,blue@0", "must increase strictly"),
        ("green@0,red@5,blue@2", "must increase strictly"),
        ("blue@2,green@0", "first start epoch must be 0"),
        ("green@x", "expected colour@epoch"),
        ("green@-1", "expected colour@epoch"),
        ("", "unknown mask colour ''"),
    ],
)
def test_bad_schedules_raise(text, message):
    with pytest.raises(ValueError, match=message):
        parse_schedule(text)


# ---------------------------------------------------------------- textures


def band_means(colour: str) -> dict[str, float]:
    """Mean power in the low (< 0.1), middle (0.1-0.3) and high (> 0.3 cycles/cell) bands."""
    textures = colour_noise(colour, (16, 64, 64), seed=1, xp=np)
    freqs, power = radial_power_spectrum(textures, bins=20)
    bands = {"low": freqs < 0.1, "middle": (freqs > 0.1) & (freqs < 0.3), "high": freqs > 0.3}
    return {name: float(power[inside].mean() / power.mean()) for name, inside in bands.items()}


def test_spectral_shapes():
    red, blue = band_means("red"), band_means("blue")
    assert red["low"] > 5 * red["middle"] > 5 * red["high"]
    assert blue["high"] > 5 * blue["middle"] > 5 * blue["low"]
    green, purple = band_means("green"), band_means("purple")
    assert green["middle"] > 5 * max(green["low"], green["high"])
    # band-stop: a notch in the middle (the sampled kernel passes less at Nyquist than exp(-2 pi^2 s^2 f^2))
    assert purple["middle"] < 0.5 * min(purple["low"], purple["high"])
    white = band_means("white")
    assert all(abs(share - 1) < 0.1 for share in white.values()), white  # flat within 10%


def scipy_step(colour: str, x, ndi=ndimage):
    """One filter step of the recipe, written with scipy's (or cupyx's) Gaussian filter on a torus."""
    def blur(sigma):
        return ndi.gaussian_filter(x, (0, sigma, sigma), mode="wrap")

    if colour == "white":
        return x
    if colour in ("red", "blue"):
        return blur(1.0) if colour == "red" else x - blur(1.0)
    band = blur(0.5) - blur(2.0)
    return band if colour == "green" else x - band


def rank_rows(x: np.ndarray) -> np.ndarray:
    """Each texture's values replaced by rank / (N - 1) (the textures here have no ties)."""
    flat = x.reshape(len(x), -1)
    return ((stats.rankdata(flat, axis=1, method="ordinal") - 1) / (flat.shape[1] - 1)).reshape(x.shape)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_filter_step_is_scipys_wraparound_gaussian(sigma):
    x = np.random.default_rng(0).random((3, 24, 30))
    response = noise.textures.filter_response("red", np, (24, 30), sigma=sigma)
    expected = ndimage.gaussian_filter(x, (0, sigma, sigma), mode="wrap")
    np.testing.assert_allclose(noise.textures.apply_filter(x, response), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("colour", COLOURS)
def test_two_step_texture_follows_the_recipe_step_by_step(colour):
    """White noise, ranked; then filter, rank-normalise, filter, rank-normalise (the same white noise:
    colour_noise draws it first from its seed)."""
    shape = (4, 32, 40)
    expected = rank_rows(np.random.default_rng(3).random(shape))
    for _ in range(2):
        expected = rank_rows(scipy_step(colour, expected))
    textures = colour_noise(colour, shape, seed=3, iterations=2)
    assert np.mean(textures != expected.astype(np.float32)) < 0.002  # FFT rounding may swap a rank


@pytest.mark.parametrize("colour", COLOURS)
def test_histogram_exactly_uniform(colour):
    textures = colour_noise(colour, (3, 32, 48), seed=0, xp=np, iterations=2)
    assert textures.dtype == np.float32 and textures.shape == (3, 32, 48)
    uniform = np.arange(32 * 48, dtype=np.float32) / (32 * 48 - 1)
    for texture in textures:
        np.testing.assert_array_equal(np.sort(texture.ravel()), uniform)


def test_rank_normalise_breaks_ties_randomly():
    flat = np.zeros((1, 4, 4), dtype=np.float32)
    a, b = noise.rank_normalise(flat, seed=0), noise.rank_normalise(flat, seed=1)
    np.testing.assert_array_equal(np.sort(a.ravel()), np.arange(16, dtype=np.float32) / 15)
    assert not np.array_equal(a, b)


def test_colour_noise_is_deterministic_and_parameters_matter():
    a = colour_noise("green", (2, 32, 32), seed=5)
    np.testing.assert_array_equal(a, colour_noise("green", (2, 32, 32), seed=5))
    assert not np.array_equal(a, colour_noise("green", (2, 32, 32), seed=6))
    assert not np.array_equal(a, colour_noise("green", (2, 32, 32), seed=5, sigmas=(0.5, 3.0)))


# ---------------------------------------------------------------- mask statistics


def test_statistics_of_hand_made_masks():
    checkerboard = (np.indices((4, 4)).sum(axis=0) % 2).astype(bool).reshape(1, 16)
    halves = (np.indices((4, 4))[1] >= 2).reshape(1, 16)  # two visible columns, two hidden
    values = noise.stats.per_mask_statistics(np.concatenate([checkerboard, halves]), 4)
    np.testing.assert_allclose(values["neighbour_agreement"], [0.0, 20 / 24])
    np.testing.assert_allclose(values["visible_region"], [1.0, 8.0])
    np.testing.assert_allclose([values[band] for band in ("low", "mid", "high")], [[0, 0], [0, 1], [1, 0]],
                               atol=1e-12)  # checkerboard: (0.5, 0.5); halves: 0.25 cycles per patch


@pytest.fixture(scope="module")
def mask_statistics(cache_dir) -> dict[str, dict[str, np.ndarray]]:
    """Per-mask statistics of 2,000 masks per mask type (grid 14, ratio 0.75), as a run draws them."""
    statistics = {}
    for mask_type in MASK_TYPES:
        masks = np.concatenate([masks_of(make_generator(cache_dir, mask_type), 500, 0, i) for i in range(4)])
        statistics[mask_type] = noise.stats.per_mask_statistics(masks, 14)
    return statistics


def test_mask_statistics_show_the_colours(mask_statistics):
    """Red clumps most, blue spreads most (below white), green in between; purple keeps blobs
    (more low-frequency power than white) and specks (more high-frequency power than green)."""
    mean = {colour: {name: values.mean() for name, values in stats_.items()}
            for colour, stats_ in mask_statistics.items()}
    for name in ("neighbour_agreement", "visible_region"):
        assert mean["red"][name] > mean["green"][name] > mean["white"][name] > mean["blue"][name], name
    assert mean["purple"]["low"] > 2 * mean["white"]["low"]
    assert mean["purple"]["high"] > mean["green"]["high"] > mean["red"]["high"]
    assert mean["purple"]["visible_region"] > mean["white"]["visible_region"] > mean["blue"]["visible_region"]


def test_white_masks_are_random_masks_within_sampling_error(mask_statistics):
    white, random = mask_statistics["white"], mask_statistics["random"]
    for name in noise.stats.STATISTICS:
        error = np.hypot(white[name].std(), random[name].std()) / np.sqrt(len(white[name]))
        assert abs(white[name].mean() - random[name].mean()) < 4 * error, name


def test_show_prints_the_statistics_of_each_mask_type(tmp_path, cache_dir, capsys):
    from noise import show

    show.main(["--out", str(tmp_path / "masks.png"), "--colours", "red", "random", "--grid", "7",
               "--masks", "50", "--cache-dir", str(cache_dir)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[-3].split() == ["mask", *noise.stats.STATISTICS]
    expected = noise.stats.colour_statistics(["red", "random"], 7, count=50, cache_dir=cache_dir)
    for line, (mask_type, values) in zip(lines[-2:], expected.items(), strict=True):
        assert line.split() == [mask_type, *(f"{values[name]:.3f}" for name in noise.stats.STATISTICS)]


# ---------------------------------------------------------------- banks


def test_pattern_bank_is_cached_with_its_parameters(tmp_path, monkeypatch, caplog):
    params = {"count": 4, "size": 32, "seed": 2}
    bank = pattern_bank("red", cache_dir=tmp_path, **params)
    assert bank.shape == (4, 32, 32) and bank.dtype == np.float32
    (path,) = tmp_path.glob("red-*.npz")

    def no_generation(params):
        raise AssertionError("bank regenerated although cached")

    monkeypatch.setattr(noise.bank, "generate_bank", no_generation)
    np.testing.assert_array_equal(pattern_bank("red", cache_dir=tmp_path, **params), bank)
    monkeypatch.undo()

    path.write_bytes(b"not an npz")  # a corrupt cache file is regenerated, with a warning
    with caplog.at_level(logging.WARNING):
        np.testing.assert_array_equal(pattern_bank("red", cache_dir=tmp_path, **params), bank)
    assert "unreadable bank cache" in caplog.text

    stale = dict(np.load(path))
    np.savez(path, textures=stale["textures"] + 1, params=np.array('{"version": 0}'))
    np.testing.assert_array_equal(pattern_bank("red", cache_dir=tmp_path, **params), bank)

    other = pattern_bank("red", cache_dir=tmp_path, count=4, size=32, seed=3)
    assert not np.array_equal(other, bank) and len(list(tmp_path.glob("red-*.npz"))) == 2


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal (progress bars draw only there)."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_bank_generation_shows_a_progress_bar_on_a_terminal_only(tmp_path, monkeypatch, terminal):
    stderr = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    bank = pattern_bank("blue", cache_dir=tmp_path, count=3, size=16)
    drawn = stderr.getvalue()
    assert ("blue bank (3 x 16 x 16)" in drawn and "/5" in drawn) if terminal else drawn == ""
    np.testing.assert_array_equal(bank, noise.bank.generate_bank(noise.bank_params("blue", count=3, size=16)))


def test_default_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("COLORMAE_CACHE", str(tmp_path))
    assert noise.default_cache_dir() == tmp_path / "banks"


def test_authors_npz_layout_loads(tmp_path):
    textures = np.random.default_rng(0).integers(0, 8, size=(5, 20, 24), dtype=np.uint8)  # many ties
    np.savez(tmp_path / "green_patterns.npz", textures, np.zeros(3))
    loaded = load_pattern_file(tmp_path / "green_patterns.npz")
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, textures)

    generator = MaskGenerator("green", 14, bank_path=tmp_path / "{colour}_patterns.npz")
    assert ((~masks_of(generator, 128)).sum(axis=1) == 49).all()  # ties in the file still give exactly K


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"garbage", "not a readable npz"),
        ({"x": np.zeros((4, 4))}, r"is \(4, 4\); expected \[L, M, N\]"),
        ({"x": np.zeros((0, 4, 4))}, "expected"),
        ({"x": np.full((2, 4, 4), np.nan)}, "NaN"),
        ({"x": np.array(["a", "b"])}, "expected"),
        ({}, "holds no arrays"),
    ],
)
def test_bad_pattern_files_raise(tmp_path, content, message):
    path = tmp_path / "bank.npz"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        np.savez(path, **content)
    with pytest.raises(ValueError, match=message):
        load_pattern_file(path)


def test_bad_generator_arguments_raise(tmp_path, cache_dir):
    with pytest.raises(ValueError, match="allowed: white, red, blue, green, purple, random"):
        make_generator(cache_dir, "orange")
    for ratio in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"mask_ratio must be in \(0, 1\)"):
            make_generator(cache_dir, mask_ratio=ratio)
    np.savez(tmp_path / "small.npz", np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="grid 14 is larger than the green textures"):
        MaskGenerator("green", 14, bank_path=tmp_path / "small.npz")
    with pytest.raises(ValueError, match="unknown mask colour"):
        colour_noise("orange", (8, 8), seed=0)
    with pytest.raises(ValueError, match="allowed: 'cpu', 'cuda'"):
        noise.get_xp("tpu")
    assert noise.get_xp("cpu") is np


def test_bank_options_are_used(tmp_path):
    options = {"count": 4, "size": 16, "sigma": 2.0}
    generator = MaskGenerator("red", 7, cache_dir=tmp_path, bank_options=options)
    assert ((~masks_of(generator, 8)).sum(axis=1) == 12).all()
    with pytest.raises(ValueError, match=r"grid 20 is larger than the red textures \(16, 16\)"):
        MaskGenerator("red", 20, cache_dir=tmp_path, bank_options=options)
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        masks_of(generator, 8, epoch=-1)
    with pytest.raises(ValueError, match="batch index must be >= 0"):
        masks_of(generator, 8, index=-1)


# ---------------------------------------------------------------- torch helpers


def test_mask_to_torch_shares_numpy_memory(cache_dir):
    mask = masks_of(make_generator(cache_dir), 4)
    tensor = mask_to_torch(mask)
    assert tensor.dtype == torch.bool and tuple(tensor.shape) == mask.shape
    mask[0, 0] = not mask[0, 0]
    assert bool(tensor[0, 0]) == mask[0, 0]


def test_mask_to_ids_matches_the_mask(cache_dir):
    mask = mask_to_torch(masks_of(make_generator(cache_dir), 16))
    ids_keep, ids_restore = mask_to_ids(mask)
    assert ids_keep.shape == (16, 49) and ids_restore.shape == (16, 196)
    assert ids_keep.dtype == ids_restore.dtype == torch.int64
    for row, keep in zip(mask, ids_keep, strict=True):
        assert torch.equal(keep, torch.nonzero(~row).flatten())  # visible patches, ascending
    rebuilt = torch.ones(16, 196)
    rebuilt[:, :49] = 0
    assert torch.equal(torch.gather(rebuilt, 1, ids_restore).bool(), mask)  # the MAE way back

    with pytest.raises(ValueError, match="same number of visible"):
        mask_to_ids(torch.tensor([[True, False], [True, True]]))
    with pytest.raises(ValueError, match="bool tensor"):
        mask_to_ids(mask.float())


# ---------------------------------------------------------------- GPU (CuPy) path


@pytest.mark.gpu
def test_cupy_path_matches_numpy(cache_dir):
    cupy = pytest.importorskip("cupy")
    textures = colour_noise("green", (2, 32, 32), seed=0, xp=cupy)
    assert isinstance(textures, cupy.ndarray)
    uniform = np.arange(32 * 32, dtype=np.float32) / (32 * 32 - 1)
    np.testing.assert_array_equal(np.sort(textures.get()[0].ravel()), uniform)
    reference = colour_noise("green", (2, 32, 32), seed=0)
    assert np.mean(np.abs(textures.get() - reference)) < 1e-3  # same noise; FFT rounding may swap ranks

    for schedule in ("green", "random"):
        cpu = make_generator(cache_dir, schedule)
        gpu = make_generator(cache_dir, schedule, device="cuda:0")
        mask = masks_of(gpu, 64, 1, 2)
        assert isinstance(mask, cupy.ndarray)
        np.testing.assert_array_equal(mask.get(), masks_of(cpu, 64, 1, 2))
        tensor = mask_to_torch(mask)
        assert tensor.is_cuda and torch.equal(tensor.cpu(), torch.from_numpy(mask.get()))


@pytest.mark.gpu
@pytest.mark.parametrize("colour", COLOURS)
def test_cupy_filter_step_and_recipe_match_cupyx(colour):
    """The GPU twin of the scipy checks: one filter step, then the two-step recipe, on CuPy."""
    cupy = pytest.importorskip("cupy")
    from cupyx.scipy import ndimage as cupy_ndimage

    x = cupy.asarray(np.random.default_rng(0).random((3, 24, 30)))
    for sigma in (0.5, 1.0, 2.0):
        response = noise.textures.filter_response("red", cupy, (24, 30), sigma=sigma)
        expected = cupy_ndimage.gaussian_filter(x, (0, sigma, sigma), mode="wrap")
        filtered = noise.textures.apply_filter(x, response, cupy)
        np.testing.assert_allclose(filtered.get(), expected.get(), rtol=0, atol=1e-5)

    shape = (4, 32, 40)
    expected = rank_rows(np.random.default_rng(3).random(shape))
    for _ in range(2):
        expected = rank_rows(scipy_step(colour, cupy.asarray(expected), cupy_ndimage).get())
    textures = colour_noise(colour, shape, seed=3, iterations=2, xp=cupy)
    assert np.mean(textures.get() != expected.astype(np.float32)) < 0.002


def test_show_renders_a_png(tmp_path, cache_dir):
    from noise import show

    path = show.render(tmp_path / "gallery" / "masks.png", ["green", "random"], grid=7, cache_dir=cache_dir)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="unknown mask colour"):
        show.render(tmp_path / "x.png", ["orange"])


def test_show_draws_the_banks_the_run_uses(tmp_path, cache_dir, monkeypatch):
    """With the authors' files (mask.bank), the gallery shows their textures, not the default bank."""
    from noise import show

    textures = np.random.default_rng(1).random((3, 16, 16), dtype=np.float32)
    np.savez(tmp_path / "blue_patterns.npz", textures)
    drawn = []
    monkeypatch.setattr(show, "draw_bank", lambda texture_axis, spectrum_axis, bank: drawn.append(bank))
    show.render(tmp_path / "masks.png", ["blue"], grid=7, cache_dir=cache_dir,
                bank_path=tmp_path / "{colour}_patterns.npz")
    assert drawn[0].shape == textures.shape
    for shown, original in zip(drawn[0], textures, strict=True):  # rank-normalised: same ordering
        np.testing.assert_array_equal(np.argsort(shown.ravel()), np.argsort(original.ravel()))
