"""Training config: YAML + overrides, the shipped recipes, and validation before any compute."""

from pathlib import Path

import pytest

from configs import Config, ConfigError, flatten, from_dict, load_config, to_dict, validate
from pipelines import DataConfig, LoaderConfig

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture
def data_dir(tmp_path: Path) -> str:
    (tmp_path / "train" / "class_a").mkdir(parents=True)
    return str(tmp_path / "train")


def demo(data_dir: str, *overrides: str) -> Config:
    return load_config(CONFIGS / "demo.yaml", [f"data.path={data_dir}", *overrides])


def test_overrides_are_typed_and_applied_in_order(data_dir):
    cfg = demo(data_dir, "train.epochs=7", "mask.schedule=green@0,blue@3", "train.base_lr=1e-3",
               "train.clip_grad=null", "model.args={depth: 1}", "train.epochs=9")
    assert cfg.train.epochs == 9
    assert cfg.mask.schedule == "green@0,blue@3"
    assert cfg.train.base_lr == pytest.approx(1e-3) and isinstance(cfg.train.base_lr, float)
    assert cfg.model.args == {"depth": 1}
    assert cfg.name == "demo"
    validate(cfg)


def test_paper_recipes_share_one_base_and_scale_the_lr():
    for epochs in (300, 800, 1600):
        cfg = load_config(CONFIGS / f"vit_base_green_{epochs}ep.yaml")
        assert (cfg.model.preset, cfg.data.img_size, cfg.mask.schedule) == ("vit_base", 224, "green")
        assert (cfg.train.epochs, cfg.train.warmup_epochs, cfg.train.batch_size) == (epochs, 40, 4096)
        assert cfg.train.betas == [0.9, 0.95] and cfg.train.weight_decay == 0.05
        assert cfg.lr == pytest.approx(2.4e-3)  # 1.5e-4 x 4096 / 256
        assert cfg.train.device == "cuda"  # a GPU recipe: never a silent CPU run


def test_paper_recipe_validates_for_eight_gpus_given_its_data(data_dir):
    cfg = load_config(CONFIGS / "vit_base_green_800ep.yaml", [f"data.path={data_dir}"])
    validate(cfg, world_size=8)
    with pytest.raises(ConfigError, match="not divisible by world size 3"):
        validate(cfg, world_size=3)


def test_round_trip_through_checkpoint_dict(data_dir):
    cfg = demo(data_dir, "train.epochs=3", "model.args={depth: 2}")
    assert from_dict(to_dict(cfg)) == cfg
    flat = flatten(cfg)
    assert flat["train.epochs"] == 3 and flat["model.args.depth"] == 2 and flat["mask.schedule"] == "green"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.img_size=30", "not divisible by patch_size 4"),
        ("mask.ratio=1.0", "mask.ratio 1.0 must lie strictly between 0 and 1"),
        ("mask.ratio=0", "mask.ratio 0.0 must lie strictly between 0 and 1"),
        ("mask.schedule=teal", "mask.schedule 'teal' is invalid"),
        ("mask.schedule=green@0,pink@5", "mask.schedule 'green@0,pink@5' is invalid"),
        ("mask.schedule=green@0,red@5,blue@2", "start epochs must increase strictly"),
        ("data.loader=tfds", "data.loader 'tfds' is unknown; choose one of torch, dali, ffcv"),
        ("data.path=/nonexistent/imagenet/train", "data.path '/nonexistent/imagenet/train' is not a folder"),
        ("model.preset=vit_gigantic", "model.preset 'vit_gigantic' is unknown"),
        ("model.args={depthh: 2}", "unknown MAE argument"),
        ("train.precision=fp8", "train.precision 'fp8' is unknown"),
        ("train.warmup_epochs=5", "train.warmup_epochs 5 must lie in"),
        ("train.accum_steps=3", "is not divisible by world size 1 x train.accum_steps 3"),
    ],
)
def test_bad_values_give_one_clear_message(data_dir, override, message):
    cfg = demo(data_dir, override)
    with pytest.raises(ConfigError, match="invalid configuration") as err:
        validate(cfg)
    assert message in str(err.value)
    assert str(err.value).count("\n  - ") == 1  # exactly the one problem, nothing else


def test_every_problem_is_listed_at_once(data_dir):
    cfg = demo(data_dir, "mask.ratio=2", "data.loader=x", "data.path=/missing")
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value).count("\n  - ") == 3


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epoch=2", "unknown config key 'train.epoch' (did you mean 'epochs'?)"),
        ("optim.lr=1", "unknown config key 'optim'"),
        ("train.epochs=two", "config key 'train.epochs' must be int, got 'two'"),
        ("train.compile=maybe", "config key 'train.compile' must be bool"),
        ("train", "must look like section.key=value"),
    ],
)
def test_unknown_keys_and_wrong_types_are_named(data_dir, override, message):
    with pytest.raises(ConfigError) as err:
        demo(data_dir, override)
    assert message in str(err.value)


def test_unknown_key_in_a_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("base: " + str(CONFIGS / "demo.yaml") + "\ntrain:\n  warmup: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.warmup'"):
        load_config(path)


def test_the_loader_runs_with_every_data_and_mask_setting(data_dir, tmp_path):
    cfg = demo(data_dir, "data.loader=ffcv", f"data.ffcv_path={tmp_path}/x.beton", "data.workers=3",
               "data.img_size=48", "mask.schedule=green@0,blue@2", "mask.ratio=0.6", "mask.bank=b.npz")
    loader = LoaderConfig.from_sections(cfg.data, cfg.mask, patch_size=8, batch_size=4, rank=1, world_size=2)
    assert (loader.loader, loader.data, loader.ffcv_path, loader.workers, loader.img_size) == (
        "ffcv", data_dir, f"{tmp_path}/x.beton", 3, 48)
    assert (loader.schedule, loader.mask_ratio, loader.mask_bank) == ("green@0,blue@2", 0.6, "b.npz")
    assert (loader.patch_size, loader.batch_size, loader.rank, loader.world_size) == (8, 4, 1, 2)
    unmasked = LoaderConfig.from_sections(DataConfig(workers=None), train=False)
    assert unmasked.schedule is None and unmasked.workers == LoaderConfig().workers and not unmasked.train
