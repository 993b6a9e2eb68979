"""The ``torchglow`` command end to end: one tiny trained digits run per module, then every
subcommand through :func:`torchglow.cli.main`, and its error paths (one line, non-zero exit)."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from torchglow.cli import app as cli

from torchglow import preset

from conftest import assert_one_error_line, cli as call
from tool_checks import open_png


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread) -> str:
    from torchglow.config import TrainConfig
    from torchglow.train.loop import train

    out = tmp_path_factory.mktemp("run")
    train(preset("digits", n_steps=2, hidden_channels=16),
          TrainConfig(dataset="digits", out=str(out), epochs=1, max_steps=10, batch_size=32, init_images=64,
                      device="cpu", num_workers=0, sample_temperatures=(0.0, 1.0)), progress=False)
    return str(out)


# ------------------------------------------------------------------ train / evaluate / sample
def test_evaluate(run, capsys, tmp_path):
    from torchglow.train.checkpoint import load_model
    from torchglow.data import load_dataset
    from torchglow.tools.ood import scores_bpd

    code, out, _ = call(capsys, "evaluate", run, "--device", "cpu", "--out", tmp_path / "eval.json")
    assert code == 0
    result = json.loads(out)
    assert result["dataset"] == "digits/test" and result["images"] == 300
    assert json.loads((tmp_path / "eval.json").read_text()) == result
    # the mean of per-image bits/dim computed through log_prob, with other noise draws: 300 x 64
    # dimensions of U(0, 1/32) noise move the mean by far less than 0.01
    per_image = scores_bpd(load_model(run), load_dataset("digits", "test").images, seed=1)
    assert result["bits_per_dim"] == pytest.approx(float(per_image.mean()), abs=0.01)


def test_sample(run, capsys, tmp_path):
    code, out, _ = call(capsys, "sample", run, "--device", "cpu", "--temperatures", 0, 0.7, "--n", 3,
                        "--max-level", 12, "--out", tmp_path)
    assert code == 0
    summary = json.loads(out)
    assert summary["temperatures"] == [0.0, 0.7] and summary["max_level"] == 12
    assert summary["files"] == [str(tmp_path / "samples_T0-0.7_n3_seed0.png")]
    assert (tmp_path / "samples_T0-0.7_n3_seed0.json").is_file()


def test_sample_white_level_is_the_same_from_the_run_and_its_model_folder(run, capsys):
    """The digits use bins 0..16 of 32: from the run folder, a checkpoint in it or its model/ folder,
    the samples show bin 16 as white, as the trainer's grids; each call writes its own files."""
    levels, files = [], []
    for source in (run, Path(run) / "last.pt", Path(run) / "model"):
        code, out, _ = call(capsys, "sample", source, "--device", "cpu", "--n", 2, "--temperatures", 0.5,
                            "--name", f"from_{Path(source).name}")
        assert code == 0
        summary = json.loads(out)
        levels.append(summary["max_level"])
        files += summary["files"]
    assert levels == [16, 16, 16]
    assert all(Path(f).parent == Path(run) / "samples" for f in files)
    assert len({open_png(f).tobytes() for f in files}) == 1  # the same model (EMA weights) and seed


def test_sample_outside_a_run_shows_the_top_bin(run, capsys, tmp_path):
    from torchglow.train.checkpoint import load_model

    load_model(run).save_pretrained(tmp_path / "pre")
    code, out, _ = call(capsys, "sample", tmp_path / "pre", "--device", "cpu", "--n", 2)
    assert code == 0 and json.loads(out)["max_level"] == 31
    assert Path(json.loads(out)["files"][0]).parent == tmp_path / "pre" / "samples"


# ------------------------------------------------------------------ latent tools
def test_reconstruct_default_out(run, capsys):
    code, out, _ = call(capsys, "reconstruct", run, "--n", 6, "--device", "cpu", "--seed", 3)
    assert code == 0
    summary = json.loads(out)
    folder = Path(run) / "reconstruct"
    assert summary["max_abs_error"] < 1e-4 and summary["uint8_exact"]
    assert summary["images"] == 6 and len(set(summary["indices"])) == 6
    assert summary["dataset"] == "digits/test" and summary["checkpoint"] == run
    assert json.loads((folder / "reconstruction.json").read_text()) == summary
    assert open_png(folder / "reconstruction.png").mode == "L"
    # seeded: the same images again, other ones with another seed
    call(capsys, "reconstruct", run, "--n", 6, "--device", "cpu", "--seed", 3, "--out", folder / "again")
    assert json.loads((folder / "again" / "reconstruction.json").read_text())["indices"] == summary["indices"]


def test_reconstruct_from_a_checkpoint_file(run, capsys, tmp_path):
    code, out, _ = call(capsys, "reconstruct", Path(run) / "last.pt", "--n", 2, "--device", "cpu",
                        "--out", tmp_path)
    assert code == 0 and json.loads(out)["max_abs_error"] < 1e-4


def test_interpolate(run, capsys, tmp_path):
    code, out, _ = call(capsys, "interpolate", run, "--pairs", 2, "--steps", 5, "--method", "slerp",
                        "--device", "cpu", "--out", tmp_path)
    assert code == 0
    summary = json.loads(out)
    assert summary["methods"] == ["slerp"] and summary["pairs"] == 2 and summary["steps"] == 5
    assert summary["per_method"]["slerp"]["endpoint_max_abs_error"] < 1e-4
    assert not set(summary["indices_a"]) & set(summary["indices_b"])
    assert (tmp_path / "interpolation_slerp.png").is_file() and not (tmp_path / "interpolation_linear.png").exists()


def test_manipulate_class_attribute_then_reuse_directions(run, capsys, tmp_path):
    dirs = tmp_path / "d" / "three.safetensors"
    code, out, _ = call(capsys, "manipulate", run, "--class-attribute", 3, "--save-directions", dirs,
                        "--max-images", 400, "--alphas", -1, 0, 1, "--n", 3, "--device", "cpu",
                        "--out", tmp_path / "a")
    assert code == 0
    summary = json.loads(out)
    assert list(summary["attributes"]) == ["class_3"]
    from torchglow.data import load_dataset, pick_indices

    threes = int((load_dataset("digits", "train").labels[pick_indices(1497, 400, seed=0)] == 3).sum())
    assert summary["directions_from"]["images"] == 400
    assert summary["directions_from"]["with_attribute"] == {"class_3": threes}
    assert summary["attributes"]["class_3"]["alpha0_max_abs_error"] < 1e-4
    assert dirs.is_file() and summary["saved_directions"] == str(dirs)
    png = tmp_path / "a" / "manipulate_class_3.png"
    assert png.is_file() and (tmp_path / "a" / "manipulate.json").is_file()

    code, out, _ = call(capsys, "manipulate", run, "--directions", dirs, "--alphas", -1, 0, 1, "--n", 3,
                        "--device", "cpu", "--out", tmp_path / "b")
    assert code == 0
    reused = json.loads(out)
    assert reused["directions_from"] == str(dirs)
    assert reused["attributes"]["class_3"]["direction_norm_per_level"] == \
        summary["attributes"]["class_3"]["direction_norm_per_level"]
    assert (tmp_path / "b" / "manipulate_class_3.png").read_bytes() == png.read_bytes()


def test_manipulate_labels_csv(run, capsys, tmp_path):
    from torchglow.data import load_dataset

    labels = load_dataset("digits", "train").labels
    csv = tmp_path / "labels.csv"
    csv.write_text("id,small,odd\n" + "".join(f"{i},{int(v < 5)},{int(v % 2)}\n" for i, v in enumerate(labels.tolist())))
    code, out, _ = call(capsys, "manipulate", run, "--labels-csv", csv, "--attribute", "odd", "--n", 2,
                        "--device", "cpu", "--out", tmp_path)
    assert code == 0
    assert list(json.loads(out)["attributes"]) == ["odd"]
    assert (tmp_path / "manipulate_odd.png").is_file()


# ------------------------------------------------------------------ OOD
def test_ood_builtin_sets(run, capsys, tmp_path):
    code, out, _ = call(capsys, "ood", run, "--ood", "flipped", "inverted", "noise", "--typicality-m", 2, 5,
                        "--max-images", 100, "--device", "cpu", "--out", tmp_path)
    assert code == 0
    assert "AUROC" in out and "typicality_m5" in out
    summary = json.loads((tmp_path / "ood.json").read_text())
    assert summary["in_distribution"] == "digits/test"
    assert summary["ood_sets"] == {"flipped": 100, "inverted": 100, "noise": 100}
    assert summary["table"] in out
    for name in ("flipped", "inverted", "noise"):
        assert set(summary["metrics"][name]) == {"bpd", "complexity", "typicality_m2", "typicality_m5"}
    assert summary["noise_max_level"] == 16
    # the same numbers as the library on the same images: the CLI only parses and calls
    from torchglow.tools.ood import ood_report, ood_sets
    from torchglow.train.runs import open_run

    picked = open_run(run).pick("test", 100, 0, labels=False)
    sets = ood_sets(picked.images, 5, ("flipped", "inverted", "noise"), seed=0)
    direct = ood_report(open_run(run).model, picked.images, sets, tmp_path / "direct", typicality_m=(2, 5),
                        in_name="digits/test", verbose=False)
    assert summary["metrics"] == direct["metrics"]
    assert (tmp_path / "bpd_hist.png").is_file() and (tmp_path / "complexity_hist.png").is_file()


def test_ood_folder_and_json(run, capsys, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(6):
        Image.fromarray(torch.randint(0, 256, (12, 12), generator=g, dtype=torch.uint8).numpy()).save(folder / f"{i}.png")
    code, out, _ = call(capsys, "ood", run, "--ood-folder", folder, "--typicality-m", 2, "--max-images", 40,
                        "--json", "--device", "cpu", "--out", tmp_path / "o")
    assert code == 0
    summary = json.loads(out)
    assert summary["ood_sets"] == {f"folder:{folder}": 6}


# ------------------------------------------------------------------ errors
def test_missing_run_is_one_line_exit_1(capsys, tmp_path):
    missing = tmp_path / "no_such_run"
    for tool in ("reconstruct", "interpolate", "manipulate", "ood", "evaluate", "sample"):
        code, _, err = call(capsys, tool, missing)
        assert code == 1, tool
        assert len(err.strip().splitlines()) == 1 and str(missing) in err, err


@pytest.mark.parametrize("argv, needle", [
    (["manipulate", "{run}", "--attribute", "Smiling"], "no per-image attributes: pass --class-attribute C"),
    (["manipulate", "{run}", "--class-attribute", "12"], "--class-attribute 12 is not a class"),
    (["manipulate", "{run}", "--directions", "{run}/nope.safetensors"], "does not exist"),
    (["manipulate", "{run}", "--directions", "{run}/last.pt"], "cannot read directions"),
    (["interpolate", "{run}", "--steps", "1"], "steps"),
    (["ood", "{run}", "--ood"], "no OOD set"),
])
def test_tool_errors_are_one_line(run, capsys, argv, needle):
    code, _, err = call(capsys, *[a.format(run=run) for a in argv], "--device", "cpu")
    assert code != 0
    assert len(err.strip().splitlines()) == 1 and needle in err, err


def test_class_attribute_needs_labels(run, capsys, tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(4):
        Image.new("L", (8, 8), color=i * 40).save(folder / f"{i}.png")
    code, _, err = call(capsys, "manipulate", run, "--dataset", folder, "--directions-split", "train",
                        "--class-attribute", 3, "--device", "cpu")
    assert code == 2 and "no class labels" in err and len(err.strip().splitlines()) == 1


def test_unknown_attribute_in_directions(run, capsys, tmp_path):
    dirs = tmp_path / "d.safetensors"
    assert call(capsys, "manipulate", run, "--class-attribute", 3, "--save-directions", dirs, "--n", 1,
                "--max-images", 100, "--device", "cpu", "--out", tmp_path)[0] == 0
    code, _, err = call(capsys, "manipulate", run, "--directions", dirs, "--attribute", "Smiling", "--device", "cpu")
    assert code == 2 and "unknown attribute" in err and "Smiling" in err and "class_3" in err


def test_unknown_preset_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--preset", "nope"])
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


def subcommands():
    parser = cli.build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices


def test_every_option_of_every_subcommand_has_help_without_markup():
    """Help for every option, without reStructuredText markup, and every default that means something
    shown as it would be typed (not a Python list)."""
    for name, sub in subcommands().items():
        shown = cli.HelpFormatter(name)
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest}"
            assert "`" not in action.help, f"{name} {action.option_strings}: {action.help}"
            text = shown._expand_help(action)
            if action.default not in (None, False, argparse.SUPPRESS) and action.dest != "help":
                assert "(default: " in text and "[" not in text, f"{name} {action.option_strings}: {text}"


def test_help_shows_defaults_and_data_set_names(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # argparse wraps after hyphens
    assert "(default: 12)" in text and "(default: --ema)" in text  # the digits preset's K; a bool
    assert "digits, mnist, fashion-mnist, cifar10" in text
    with pytest.raises(SystemExit):
        cli.main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--batch-size BATCH_SIZE images per forward pass (default: 256)" in text


def test_field_help_reads_the_attributes_section_at_any_indentation():
    class Flat:
        """Title.

Attributes:
  a: first,
    continued.
  b: ``second`` with :func:`markup`.
Returns:
  not a field
"""

    def nested():
        class Deep:
            """Title.

            Attributes:
                    a: first.
            """

        return Deep

    assert cli.field_help(Flat) == {"a": "first, continued.", "b": "second with markup."}
    assert cli.field_help(nested()) == {"a": "first."}


def test_every_config_field_has_help():
    from torchglow.config import TrainConfig
    import dataclasses

    for cls in (cli.GlowConfig, TrainConfig):
        helps = cli.field_help(cls)
        assert set(helps) == {f.name for f in dataclasses.fields(cls)}, cls
        assert all(helps.values())


def test_version(capsys):
    from torchglow import __version__

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"torchglow {__version__}"


@pytest.mark.parametrize("argv, needle", [
    (["train", "--preset", "digit"], "did you mean 'digits'?"),
    (["train", "--nsteps", "3"], "did you mean --n-steps?"),
    (["sample", "x", "--n", "0"], "must be >= 1"),
    (["train", "--threads", "0"], "--threads"),
    (["reconstruct", "x", "--dataset", "mnst"], "did you mean 'mnist'?"),
])
def test_parse_errors_are_one_line(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert len(err.strip().splitlines()) == 1 and needle in err and "see torchglow" in err, err


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


def test_threads_option(capsys, tmp_path, run):
    code, _, _ = call(capsys, "sample", run, "--threads", 2, "--n", 1, "--temperatures", 0, "--out", tmp_path)
    assert code == 0 and torch.get_num_threads() == 2
    torch.set_num_threads(1)


@pytest.mark.slow
def test_skipped_images_are_one_warning_line(run, tmp_path):
    """In a real process, where warnings are printed: one line, without a Python source line."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.new("L", (8, 8), color=i * 40).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    proc = subprocess.run([sys.executable, "-m", "torchglow", "ood", run, "--ood-folder", folder, "--threads", "1",
                           "--typicality-m", "2", "--device", "cpu", "--out", tmp_path / "o"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()  # the skipped file, then the caveat of 4 OOD images
    assert len(lines) == 2 and all(line.startswith("torchglow ood: warning: ") for line in lines), lines
    assert lines[0].startswith(f"torchglow ood: warning: image folder {folder}: skipped 1 unreadable"), lines


def test_missing_data_set_names_the_download_option(run, capsys, tmp_path):
    code, _, err = call(capsys, "ood", run, "--ood-dataset", "mnist", "--ood-data-dir", tmp_path / "none",
                        "--device", "cpu", "--out", tmp_path / "o")
    assert code == 1 and "add --download to fetch them" in err and "download=True" not in err, err
    assert not (tmp_path / "none").exists()


# ------------------------------------------------------------------ class-conditional pretrained folder
def test_tools_on_a_class_conditional_pretrained_folder(capsys, tmp_path):
    from torchglow import Glow
    from torchglow.data import load_dataset
    from torchglow.preprocess import dequantize, preprocess

    torch.manual_seed(0)
    model = Glow(preset("digits", n_steps=1, hidden_channels=8, num_classes=10))
    train = load_dataset("digits", "train")
    model.initialize(dequantize(preprocess(train.images[:64], 5), 5), train.labels[:64])
    model.save_pretrained(tmp_path / "pre")
    pre = tmp_path / "pre"
    # a pretrained folder does not say its data set
    code, _, err = call(capsys, "reconstruct", pre, "--device", "cpu")
    assert code == 2 and "--dataset" in err
    common = ["--dataset", "digits", "--device", "cpu"]
    code, out, _ = call(capsys, "reconstruct", pre, "--n", 3, *common)
    assert code == 0 and json.loads(out)["max_abs_error"] < 1e-4
    assert (pre / "reconstruct" / "reconstruction.png").is_file()
    code, out, _ = call(capsys, "interpolate", pre, "--pairs", 1, "--steps", 3, *common)
    assert code == 0 and json.loads(out)["per_method"]["linear"]["endpoint_max_abs_error"] < 1e-4
    code, out, _ = call(capsys, "manipulate", pre, "--class-attribute", 3, 8, "--max-images", 200, "--n", 2, *common)
    assert code == 0 and list(json.loads(out)["attributes"]) == ["class_3", "class_8"]
    code, out, _ = call(capsys, "ood", pre, "--ood", "flipped", "--max-images", 20, "--typicality-m", 2, *common)
    assert code == 0 and "flipped" in out


def test_bench_subcommand_writes_json(tmp_path, capsys):
    rc = cli.main(["bench", "--preset", "digits", "--batch-size", "4", "--device", "cpu", "--n-steps", "2",
               "--hidden-channels", "8", "--warmup", "0", "--repeats", "1", "--phases", "sample", "--no-isolate",
               "--name", "tiny", "--out-dir", str(tmp_path)])
    assert rc == 0
    r = json.loads((tmp_path / "tiny.json").read_text())
    assert r["sample_images_per_s"] > 0 and r["config"]["n_steps"] == 2 and "train" not in r
    assert str(tmp_path / "tiny.json") in capsys.readouterr().out


# ------------------------------------------------------------------ your own images: a folder run
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
            rc = cli.main(["train", "--dataset", "cats_and_ships", "--out", "run", *TINY_FOLDER])
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
    model, train, defaults = cli.build_configs({"dataset": folder}, "digits")
    assert (model.n_bits, model.dropout, train.weight_decay, model.image_shape) == (5, 0.2, 0.3, (1, 8, 8))
    assert defaults == "defaults: the digits preset's"
    model, train, _ = cli.build_configs({"dataset": folder, "image_shape": (1, 16, 16)}, None)
    assert model.image_shape == (1, 16, 16) and model.n_bits == 8 and train.epochs == 100
    import numpy as np

    np.savez(tmp_path / "a.npz", x=np.zeros((40, 4, 4), dtype=np.uint8), y=np.zeros(40))
    model, train, _ = cli.build_configs({"dataset": str(tmp_path / "a.npz")}, None)
    assert model.image_shape == (1, 4, 4) and train.warmup_images == 10 * 38 and model.dropout == 0.0
    with pytest.raises(cli.CLIError, match="read from the images of .*pass --image-shape"):
        cli.build_configs({"dataset": folder, "n_levels": 4}, None)


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


def test_fast_on_the_cpu_says_when_it_pays(run, capsys, tmp_path):
    """One note line saying that --fast pays only on a GPU."""
    for command in (["sample", run, "--temperatures", "0", "--out", tmp_path], ["evaluate", run]):
        code, _, err = call(capsys, *command, "--device", "cpu", "--fast")
        assert code == 0
        notes = [line for line in err.splitlines() if "--fast" in line]
        assert len(notes) == 1 and "pays off only on a GPU" in notes[0], err
