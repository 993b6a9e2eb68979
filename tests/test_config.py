import dataclasses

import pytest
import torch

from torchglow import ConfigError, GlowConfig, preset

from conftest import assert_one_error_line, cli


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(image_shape=(3, 30, 32), n_levels=3), "divisible"),
        (dict(coupling="sigmoid"), "coupling"),
        (dict(permutation="random"), "permutation"),
        (dict(n_bits=9), "n_bits"),
        (dict(n_bits=0), "n_bits"),
        (dict(n_steps=0), "n_steps"),
        (dict(hidden_channels=2.5), "hidden_channels"),
        (dict(num_classes=1), "num_classes"),
        (dict(lu="yes"), "lu"),
        (dict(weight_y=-1.0), "weight_y"),
        (dict(image_shape=(3, 32)), "image_shape"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(dropout="0.2"), "dropout"),
        (dict(padding="reflect"), "padding"),
        (dict(class_layers="zeros"), "class_layers"),
    ],
)
def test_invalid_configs_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        GlowConfig(**overrides)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'cifar100'"):
        preset("cifar100")


def test_json_round_trip(tmp_path):
    cfg = preset("celeba256", num_classes=4)
    cfg.save(tmp_path / "c.json")
    assert GlowConfig.load(tmp_path / "c.json") == cfg


def test_unknown_field_in_file(tmp_path):
    (tmp_path / "c.json").write_text('{"n_levels": 2, "depth": 3}')
    with pytest.raises(ConfigError, match="depth"):
        GlowConfig.load(tmp_path / "c.json")


# The official runs' flags, from the openai/glow README (the width is train.py's default, 512).
# --flow_permutation 0/1/2: reverse/shuffle/1x1 convolution; --flow_coupling 0/1: additive/affine.
OFFICIAL_COMMANDS = {
    "cifar10": "--image_size 32 --n_level 3 --depth 32 --flow_permutation 2 --flow_coupling 1 --learntop --n_bits_x 8",
    "imagenet32": "--image_size 32 --n_level 3 --depth 48 --flow_permutation 2 --flow_coupling 1 --learntop --n_bits_x 8",
    "imagenet64": "--image_size 64 --n_level 4 --depth 48 --flow_permutation 2 --flow_coupling 1 --learntop --n_bits_x 8",
    "celeba256": "--image_size 256 --n_level 6 --depth 32 --flow_permutation 2 --flow_coupling 0 --learntop --n_bits_x 5",
    "lsun64": "--image_size 64 --n_level 3 --depth 48 --flow_permutation 2 --flow_coupling 1 --learntop --n_bits_x 8",
    "lsun96": "--image_size 96 --n_level 5 --depth 64 --flow_permutation 2 --flow_coupling 0 --learntop --n_bits_x 5",
    "lsun128": "--image_size 128 --n_level 5 --depth 64 --flow_permutation 2 --flow_coupling 0 --learntop --n_bits_x 5",
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_COMMANDS))
def test_presets_are_the_official_runs(name):
    flags = OFFICIAL_COMMANDS[name].split()

    def flag(f):
        return int(flags[flags.index(f) + 1])

    cfg = preset(name)
    size = flag("--image_size")
    assert cfg.image_shape == (3, size, size)
    assert (cfg.n_levels, cfg.n_steps, cfg.hidden_channels, cfg.n_bits) == (
        flag("--n_level"), flag("--depth"), 512, flag("--n_bits_x"))
    assert cfg.permutation == ("reverse", "shuffle", "invconv")[flag("--flow_permutation")]
    assert cfg.coupling == ("additive", "affine")[flag("--flow_coupling")]
    assert cfg.learn_top == ("--learntop" in flags)
    assert (cfg.num_classes, cfg.dropout) == (None, 0.0)
    assert (cfg.padding, cfg.class_layers) == ("edge", "linear_zeros")  # tfops.py: edge_bias=True, linear_zeros


def test_padding_and_class_layers_round_trip_and_default_to_the_old_model(tmp_path):
    cfg = preset("cifar10", num_classes=10)
    cfg.save(tmp_path / "c.json")
    assert GlowConfig.load(tmp_path / "c.json") == cfg
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("padding", "class_layers")}
    assert GlowConfig.from_dict(old) == dataclasses.replace(cfg, padding="zero", class_layers="linear")


def test_lsun_presets_train_on_lsun():
    from torchglow.config import TRAIN_PRESETS
    from torchglow.data import DATASETS

    for name in ("lsun64", "lsun96", "lsun128"):
        assert TRAIN_PRESETS[name]["dataset"] in DATASETS and TRAIN_PRESETS[name]["dataset"].startswith("lsun-")
        assert TRAIN_PRESETS[name]["warmup_images"] == 10 * 50_000  # epochs_warmup x n_train


def test_each_precision_has_its_autocast_dtype():
    from torchglow.config import PRECISIONS, autocast_dtype

    assert [autocast_dtype(p) for p in PRECISIONS] == [None, torch.bfloat16, torch.float16]


def test_preset_overrides_replace_only_the_named_fields():
    cfg = preset("digits", n_steps=3, num_classes=10)
    assert (cfg.n_steps, cfg.num_classes) == (3, 10)
    assert dataclasses.replace(cfg, n_steps=preset("digits").n_steps, num_classes=None) == preset("digits")


@pytest.mark.parametrize("args,field", [
    (["--n-bits", "9"], "n_bits"),
    (["--n-bits", "0"], "n_bits"),
    (["--image-shape", "1", "10", "10"], "divisible by 2**n_levels"),  # digits: 2 levels
    (["--n-levels", "40"], "divisible by 2**n_levels"),
    (["--epochs", "0"], "epochs"),
    (["--lr", "inf"], "lr"),
    (["--lr", "-1"], "lr"),
    (["--beta2", "1.5"], "beta2"),
    (["--sample-temperatures", "nan"], "sample_temperatures"),
    (["--device", "gpu"], "device"),
    (["--weight-y", "nan"], "weight_y"),
    (["--weight-decay", "-0.1"], "weight_decay"),
    (["--dropout", "1"], "dropout"),
    (["--dropout", "0.2", "--memory", "invertible"], "dropout"),
])
def test_configs_that_cannot_work(capsys, tmp_path, args, field):
    rc, _, err = cli(capsys, "train", "--out", tmp_path / "run", *args)
    assert rc == 2
    assert_one_error_line(rc, err, field)
    assert not (tmp_path / "run").exists()  # refused before anything is written
