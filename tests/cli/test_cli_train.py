"""``torchglow train`` (:mod:`torchglow.cli.train`): options, config files, the configs built from
them, data set errors, and a run on a folder of your own images."""

import dataclasses
import json

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from torchglow import ConfigError, GlowConfig
from torchglow.cli.app import main
from torchglow.cli.errors import CLIError
from torchglow.cli.train import build_configs, read_config_file
from torchglow.config import PRESETS, TRAIN_PRESETS, TrainConfig

from conftest import FUZZ, assert_one_error_line, cli as call

pytestmark = pytest.mark.usefixtures("one_thread")


def test_unknown_preset_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--preset", "nope"])
    assert e.value.code == 2
    assert "nope" in capsys.readouterr().err


def test_config_file_with_unknown_key(capsys, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("n_steps: 2\nlearning_rat: 0.1\n")
    code, _, err = call(capsys, "train", "--config", cfg, "--out", tmp_path / "r")
    assert code == 2 and "learning_rat" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args,option", [
    (["--n-steps", "abc"], "--n-steps"),
    (["--lr", "fast"], "--lr"),
    (["--preset", "cifar100"], "--preset"),
    (["--depth", "3"], "--depth"),
    (["--precision", "fp8"], "--precision"),
])
def test_argparse_errors_name_the_option(capsys, args, option):
    rc, _, err = call(capsys, "train", *args)
    assert rc == 2 and "Traceback" not in err
    assert option in err.strip().splitlines()[-1]


@pytest.mark.parametrize("text,field", [
    ('n_steps: "abc"\n', "n_steps"),
    ("n_levels: 2.5\n", "n_levels"),
    ("model:\n  image_shape: 5\n", "image_shape"),
    ("train:\n  lr: 1e-3\n", "YAML needs a dot"),  # YAML 1.1 reads 1e-3 as a string
    ("train:\n  sample_temperatures: hot\n", "sample_temperatures"),
    ("ema: maybe\n", "ema"),
    ("dataset: [digits]\n", "dataset"),
    ("preset: [cifar10]\n", "unknown preset"),
    ("preset: cifar100\n", "unknown preset 'cifar100'"),
    ("depth: 3\n", "unknown option(s) depth"),
    ("model: 3\n", "must hold mappings"),
    ("1: 2\n", "option names must be strings"),
    ("[1, 2]\n", "must hold a mapping"),
    ("n_steps: [\n", "not valid YAML"),
])
def test_config_file_errors(capsys, tmp_path, text, field):
    (tmp_path / "c.yaml").write_text(text)
    rc, _, err = call(capsys, "train", "--config", tmp_path / "c.yaml", "--out", tmp_path / "run")
    assert rc == 2
    assert_one_error_line(rc, err, field)


def test_config_file_that_is_missing_or_binary(capsys, tmp_path):
    rc, _, err = call(capsys, "train", "--config", tmp_path / "none.yaml")
    assert_one_error_line(rc, err, "none.yaml")
    (tmp_path / "bin.yaml").write_bytes(bytes(range(256)))
    rc, _, err = call(capsys, "train", "--config", tmp_path / "bin.yaml")
    assert_one_error_line(rc, err, "bin.yaml")


def test_too_many_levels_for_8x8(capsys, tmp_path):
    code, _, err = call(capsys, "train", "--n-levels", 4, "--out", tmp_path / "r")
    assert code == 2 and "n_levels" in err and "divisible" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, needle", [
    (["--dataset", "no-such-set"], "unknown data set 'no-such-set'"),
    (["--dataset", "fashion-mnist"], "--preset mnist"),
    (["--preset", "mnist", "--dataset", "imagenet64"], "--preset imagenet64"),
])
def test_train_data_set_errors_exit_2(capsys, tmp_path, argv, needle):
    code, _, err = call(capsys, "train", *argv, "--out", tmp_path / "r")
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_data_dir_of_images_without_dataset(capsys, tmp_path):
    folder = tmp_path / "pngs"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    code, _, err = call(capsys, "train", "--data-dir", folder, "--out", tmp_path / "r")
    assert code == 2 and f"pass --dataset {folder}" in err and len(err.strip().splitlines()) == 1, err


TINY_FOLDER = ["--n-steps", "1", "--hidden-channels", "8", "--epochs", "1", "--batch-size", "8", "--init-images", "8",
               "--sample-temperatures", "0", "1", "--device", "cpu", "--num-workers", "0"]


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, one_thread):
    """A tiny run on ``cats_and_ships/{train,test}/{cat,ship}/`` (8x8 PNGs and JPEGs), started from
    the folder's parent with relative paths, as a user would; (run, folder, stderr of the run)."""
    import os

    from tool_checks import split_folder

    root = tmp_path_factory.mktemp("own")
    split_folder(root / "cats_and_ships")
    cwd = os.getcwd()
    os.chdir(root)
    old_umask = os.umask(0o022)
    try:
        import contextlib
        import io

        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()) as out:
            rc = main(["train", "--dataset", "cats_and_ships", "--out", "run", *TINY_FOLDER])
    finally:
        os.umask(old_umask)
        os.chdir(cwd)
    assert rc == 0, err.getvalue()
    return root / "run", root / "cats_and_ships", err.getvalue(), out.getvalue()


def test_a_folder_run_says_what_it_trains_on(folder_run):
    """The first line: data, shape read from the images, bits, classes, images per split and the
    defaults for own images, which are not the digits preset's regularisers."""
    run, folder, err, out = folder_run
    first = err.splitlines()[0]
    for part in (f"data {folder}:", "3x8x8 images at 8 bits", "2 classes: cat, ship", "24 train / 8 test images",
                 "image shape read from the images", "no dropout or weight decay", "--preset digits"):
        assert part in first, (part, first)
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["n_bits"] == 8 and config["model"]["dropout"] == 0.0
    assert config["train"]["weight_decay"] == 0.0 and config["train"]["lr"] == 1e-3
    assert config["train"]["warmup_images"] == 10 * 24 and config["train"]["dataset"] == str(folder)
    assert config["command"].startswith("torchglow train --dataset cats_and_ships --out run")
    assert "3 steps per epoch, 1 epoch)" in err and "after 1 epoch, 3 steps" in out
    assert "scored with the EMA of the weights" in out


def test_own_data_defaults_and_presets(tmp_path):
    """--preset digits asks for the digits preset as it is; --image-shape is kept; an .npz file gets
    the own-data defaults too; a shape that does not fit the levels names --image-shape."""
    from tool_checks import split_folder

    folder = str(split_folder(tmp_path / "cs"))
    model, train, defaults = build_configs({"dataset": folder}, "digits")
    assert (model.n_bits, model.dropout, train.weight_decay, model.image_shape) == (5, 0.2, 0.3, (1, 8, 8))
    assert defaults == "defaults: the digits preset's"
    model, train, _ = build_configs({"dataset": folder, "image_shape": (1, 16, 16)}, None)
    assert model.image_shape == (1, 16, 16) and model.n_bits == 8 and train.epochs == 100
    import numpy as np

    np.savez(tmp_path / "a.npz", x=np.zeros((40, 4, 4), dtype=np.uint8), y=np.zeros(40))
    model, train, _ = build_configs({"dataset": str(tmp_path / "a.npz")}, None)
    assert model.image_shape == (1, 4, 4) and train.warmup_images == 10 * 38 and model.dropout == 0.0
    with pytest.raises(CLIError, match="read from the images of .*pass --image-shape"):
        build_configs({"dataset": folder, "n_levels": 4}, None)


def test_a_folder_run_files_card_and_modes(folder_run):
    """Files 0644 under umask 022 (atomic writes and safetensors make 0600); the model card names
    the data set, the test bits/dim and the command."""
    run, folder, _, _ = folder_run
    for name in ("config.json", "summary.json", "last.pt", "best.pt", "model/model.safetensors", "model/config.json",
                 "init/model.safetensors"):
        assert (run / name).stat().st_mode & 0o777 == 0o644, name
    card = (run / "model" / "README.md").read_text()
    test_bpd = json.loads((run / "summary.json").read_text())["test_bpd"]
    assert str(folder) in card and f"{test_bpd:.4f}" in card and "torchglow train --dataset cats_and_ships" in card


def test_tools_on_a_folder_run_from_another_directory(folder_run, capsys, tmp_path, monkeypatch):
    """The run stores the folder's absolute path: the tools work from anywhere; --split all scores
    every image (with the caveat of fewer than 100); a moved folder says so."""
    run, folder, _, _ = folder_run
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match="rests on 8 image.*fewer than 100"):
        code, out, _ = call(capsys, "evaluate", run, "--device", "cpu")
    assert code == 0 and json.loads(out)["images"] == 8 and "caveat" in json.loads(out)
    with pytest.warns(UserWarning, match="rests on 32 image"):
        code, out, _ = call(capsys, "evaluate", run, "--device", "cpu", "--split", "all")
    assert json.loads(out)["images"] == 32
    code, out, _ = call(capsys, "evaluate", run, "--device", "cpu", "--dataset", folder / "test", "--split", "all")
    assert json.loads(out)["images"] == 8  # test/ given as a folder of its own: its classes, all of it
    moved = folder.with_name("moved")
    folder.rename(moved)
    try:
        code, _, err = call(capsys, "evaluate", run, "--device", "cpu")
        assert_one_error_line(code, err, f"trained on {folder}", "not there any more", "--dataset NEW_PATH")
        code, out, _ = call(capsys, "evaluate", run, "--device", "cpu", "--dataset", moved)
        assert code == 0 and json.loads(out)["images"] == 8
    finally:
        moved.rename(folder)


def test_num_classes_must_match_the_folder(folder_run, capsys, tmp_path):
    _, folder, _, _ = folder_run
    code, _, err = call(capsys, "train", "--dataset", folder, "--out", tmp_path / "r", "--num-classes", "3",
                        *TINY_FOLDER)
    assert_one_error_line(code, err, "has 2 classes: cat, ship, but --num-classes is 3: pass --num-classes 2")


def test_manipulate_by_class_name_keeps_earlier_files(folder_run, capsys, tmp_path):
    run, _, _, _ = folder_run
    for i in range(2):
        code, out, _ = call(capsys, "manipulate", run, "--device", "cpu", "--class-attribute", "cat", "--n", "2",
                            "--out", tmp_path)
        assert code == 0
        assert json.loads(out)["files"] == [str(tmp_path / f"manipulate_class_cat{'-2' if i else ''}.png")]
    assert (tmp_path / "manipulate.json").is_file() and (tmp_path / "manipulate-2.json").is_file()
    summary = json.loads((tmp_path / "manipulate-2.json").read_text())["attributes"]["class_cat"]
    assert summary["frames"] == 2 * 5 and "nonfinite_frames" in summary and "clipped_frames" in summary
    code, _, err = call(capsys, "manipulate", run, "--device", "cpu", "--class-attribute", "dog", "--out", tmp_path)
    assert_one_error_line(code, err, "--class-attribute dog is not a class of", "cat, ship")


# ---------------------------------------------------------------- fuzzing: a config, or one line naming what was given
GLOW_FIELDS = [f.name for f in dataclasses.fields(GlowConfig)]
TRAIN_FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]
ANY_VALUE = st.one_of(
    st.integers(), st.integers(-3, 70), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.sampled_from(["affine", "invconv", "digits", "cpu", "adam", "fp32", "none", "1e-3"]),
    st.lists(st.one_of(st.integers(-2, 40), st.floats(-2, 40), st.none(), st.text(max_size=3)), max_size=4),
    st.none(), st.booleans(), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def same(built, given) -> bool:
    """Whether a config holds the value given for it (a list as the tuple it becomes; NaN as NaN)."""
    if isinstance(given, list):
        return isinstance(built, tuple) and len(built) == len(given) and all(map(same, built, given))
    return built == given or (built != built and given != given)


def check_built_or_refused(values: dict) -> None:
    """``build_configs(values)`` either builds configs holding every given value (and the preset's
    for the rest), or refuses with one line that names one of the given fields or the preset."""
    try:
        model, train, _ = build_configs(dict(values), None)
    except (ConfigError, CLIError) as e:
        message = str(e)
        assert message and "\n" not in message, message
        names = {*values, *(f.replace("_", "-") for f in values)}
        assert any(name in message for name in names), (message, values)
        return
    preset = values.get("preset") or "digits"
    defaults = {**PRESETS[preset], **TRAIN_PRESETS.get(preset, {})}
    built = {**dataclasses.asdict(model), **dataclasses.asdict(train)}
    for field in GLOW_FIELDS + TRAIN_FIELDS:
        if field in values:
            assert same(built[field], values[field]), (field, built[field], values[field])
        elif field in defaults:
            assert built[field] == defaults[field], (field, built[field], defaults[field])


@FUZZ
@given(st.dictionaries(st.sampled_from(GLOW_FIELDS + TRAIN_FIELDS + ["preset"]), ANY_VALUE, max_size=6))
def test_fuzz_config_values(values):
    check_built_or_refused(values)


@FUZZ
@given(st.one_of(
    st.dictionaries(st.one_of(st.sampled_from(GLOW_FIELDS + TRAIN_FIELDS + ["model", "train"]), st.integers(),
                              st.none()), ANY_VALUE, max_size=6).map(lambda d: yaml.safe_dump(d)),
    st.text(max_size=60),
))
def test_fuzz_config_files(tmp_path_factory, text):
    """A config file is read into option values (then as :func:`check_built_or_refused` says), or
    refused with one line naming the file."""
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(text)
    try:
        values = read_config_file(str(path))
    except CLIError as e:
        assert "\n" not in str(e) and str(path) in str(e), str(e)
        return
    assert all(isinstance(k, str) and "-" not in k for k in values)
    check_built_or_refused(values)


def test_data_dir_of_an_unknown_user_is_not_a_crash():
    """``~name`` of no user cannot be expanded: it is no folder of images (found by the fuzz test)."""
    assert build_configs({"data_dir": "~no-such-user-here"}, "mnist")[1].data_dir == "~no-such-user-here"


def test_resume_of_a_folder_without_a_run_says_it_cannot_resume(capsys, tmp_path):
    rc, _, err = call(capsys, "train", "--resume", str(tmp_path), "--threads", "1")
    line = assert_one_error_line(rc, err, "cannot resume:", f"{tmp_path}/config.json does not exist")
    assert rc == 1 and line.endswith(f"(is {tmp_path} a torchglow run folder?)")
