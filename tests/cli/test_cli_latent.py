"""``torchglow reconstruct``, ``interpolate`` and ``manipulate`` (:mod:`torchglow.cli.latent`)."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from torchglow import preset

from conftest import cli as call
from cli_checks import tiny_run
from tool_checks import open_png

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread) -> str:
    return tiny_run(tmp_path_factory)


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
