"""Tests for noise/: textures, banks, the mask generator and the torch helpers."""

import copy
import io
import logging

import numpy as np
import pytest
import torch

import noise
from noise import (
    COLOURS,
    MASK_TYPES,
    MaskGenerator,
    colour_at,
    colour_noise,
    load_pattern_file,
    mask_to_ids,
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


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize("mask_type", MASK_TYPES)
@pytest.mark.parametrize(("grid", "ratio"), [(14, 0.75), (7, 0.6)])
def test_exact_visible_count(cache_dir, mask_type, grid, ratio):
    generator = make_generator(cache_dir, mask_type, grid=grid, mask_ratio=ratio, rotate=True)
    mask = generator(64)
    assert mask.shape == (64, grid * grid) and mask.dtype == bool
    assert ((~mask).sum(axis=1) == int(grid * grid * (1 - ratio))).all()


@pytest.mark.parametrize("mask_type", MASK_TYPES)
def test_rows_differ_within_and_across_calls(cache_dir, mask_type):
    generator = make_generator(cache_dir, mask_type)
    first, second = generator(32), generator(32)
    assert len(np.unique(first, axis=0)) >= 30
    both = np.concatenate([first, second])
    assert len(np.unique(both, axis=0)) >= 60


def test_same_seed_same_masks_and_ranks_differ(cache_dir):
    schedule = "green@0,random@1"
    a, b = make_generator(cache_dir, schedule, seed=3), make_generator(cache_dir, schedule, seed=3)
    other_rank = make_generator(cache_dir, schedule, seed=3, rank=1)
    other_seed = make_generator(cache_dir, schedule, seed=4)
    for epoch in (0, 1):
        for generator in (a, b, other_rank, other_seed):
            generator.set_epoch(epoch)
        mask = a(16)
        np.testing.assert_array_equal(mask, b(16))
        assert not np.array_equal(mask, other_rank(16))
        assert not np.array_equal(mask, other_seed(16))


def test_state_dict_continues_the_stream(cache_dir):
    generator = make_generator(cache_dir, "green@0,random@2")
    generator(8)
    generator.set_epoch(2)
    state = copy.deepcopy(generator.state_dict())
    expected = [generator(8) for _ in range(3)]

    buffer = io.BytesIO()
    torch.save({"mask": state}, buffer)
    buffer.seek(0)
    restored = make_generator(cache_dir, "green@0,random@2")
    restored.load_state_dict(torch.load(buffer, weights_only=True)["mask"])
    assert restored.colour == "random"
    for mask in expected:
        np.testing.assert_array_equal(restored(8), mask)


def test_each_mask_is_the_top_k_of_a_transformed_wraparound_crop(tmp_path):
    """Brute force: every mask must match one of all crops x flips x transposes of the bank."""
    grid, ratio, size = 4, 0.5, 6
    textures = np.random.default_rng(0).permutation(2 * size * size).reshape(2, size, size)
    np.savez(tmp_path / "bank.npz", textures)
    generator = MaskGenerator("blue", grid, ratio, bank_path=tmp_path / "bank.npz", rotate=True)

    cells = np.arange(grid)
    candidates = []
    for texture in textures:
        for top in range(size):
            for left in range(size):
                crop = texture[np.ix_((top + cells) % size, (left + cells) % size)]
                for flipped in (crop, crop[::-1], crop[:, ::-1], crop[::-1, ::-1]):
                    candidates += [flipped, flipped.T]
    candidates = np.stack(candidates).reshape(len(candidates), -1)
    keep = int(grid * grid * (1 - ratio))
    threshold = np.sort(candidates, axis=1)[:, -keep, None]
    candidate_masks = {row.tobytes() for row in candidates < threshold}

    masks = generator(1000)
    assert all(row.tobytes() in candidate_masks for row in masks)
    # ~470 of the 576 crops expected; sharing offsets or flips across the batch would give <= 144.
    assert len({row.tobytes() for row in masks}) > 300


# ---------------------------------------------------------------- schedules


def test_parse_schedule_and_colour_at(cache_dir):
    schedule = parse_schedule("red@250, green@0,blue@200,purple@275")
    assert schedule == [(0, "green"), (200, "blue"), (250, "red"), (275, "purple")]
    colours = [colour_at(schedule, epoch) for epoch in (0, 199, 200, 260, 999)]
    assert colours == ["green", "green", "blue", "red", "purple"]
    assert parse_schedule("random") == [(0, "random")]

    generator = make_generator(cache_dir, "green@0,white@5")
    assert generator.colour == "green"
    generator.set_epoch(5)
    assert generator.colour == "white"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("orange", "unknown mask colour 'orange'; allowed: white, red"),
        ("green@10", "one must be 0"),
        ("green@0,blue@0", "distinct"),
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
    assert purple["middle"] < 0.2 * min(purple["low"], purple["high"])
    white = band_means("white")
    assert all(abs(share - 1) < 0.1 for share in white.values()), white  # flat within 10%


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
    assert ((~generator(128)).sum(axis=1) == 49).all()  # ties in the file still give exactly K


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


def test_bank_options_are_used_and_reported(tmp_path):
    options = {"count": 4, "size": 16, "sigma": 2.0}
    generator = MaskGenerator("red", 7, cache_dir=tmp_path, bank_options=options)
    assert generator.bank_info["red"] == noise.bank_params("red", **options)
    assert ((~generator(8)).sum(axis=1) == 12).all()
    with pytest.raises(ValueError, match=r"grid 20 is larger than the red textures \(16, 16\)"):
        MaskGenerator("red", 20, cache_dir=tmp_path, bank_options=options)
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        generator.set_epoch(-1)


# ---------------------------------------------------------------- torch helpers


def test_mask_to_torch_shares_numpy_memory(cache_dir):
    mask = make_generator(cache_dir)(4)
    tensor = mask_to_torch(mask)
    assert tensor.dtype == torch.bool and tuple(tensor.shape) == mask.shape
    mask[0, 0] = not mask[0, 0]
    assert bool(tensor[0, 0]) == mask[0, 0]


def test_mask_to_ids_matches_the_mask(cache_dir):
    mask = mask_to_torch(make_generator(cache_dir)(16))
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
        cpu = make_generator(cache_dir, schedule, rotate=True)
        gpu = make_generator(cache_dir, schedule, rotate=True, device="cuda:0")
        mask = gpu(64)
        assert isinstance(mask, cupy.ndarray)
        np.testing.assert_array_equal(mask.get(), cpu(64))
        tensor = mask_to_torch(mask)
        assert tensor.is_cuda and torch.equal(tensor.cpu(), torch.from_numpy(mask.get()))


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
