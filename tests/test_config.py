import pytest

from torchglow import ConfigError, GlowConfig, preset


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


def test_official_presets():
    cifar = preset("cifar10")
    assert (cifar.image_shape, cifar.n_levels, cifar.n_steps, cifar.hidden_channels) == ((3, 32, 32), 3, 32, 512)
    assert (cifar.coupling, cifar.permutation, cifar.lu, cifar.learn_top, cifar.n_bits) == ("affine", "invconv", True, True, 8)
    assert preset("imagenet32").n_steps == 48
    assert (preset("imagenet64").n_levels, preset("imagenet64").n_steps) == (4, 48)
    c256 = preset("celeba256")
    assert (c256.image_shape, c256.n_levels, c256.coupling, c256.n_bits) == ((3, 256, 256), 6, "additive", 5)
