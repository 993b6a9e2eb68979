"""The ``torchglow`` command end to end: one tiny trained digits run per module, then every
subcommand through :func:`torchglow.cli.main`, and its error paths (one line, non-zero exit)."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from torchglow import cli, preset


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread) -> str:
    from torchglow.train import TrainConfig, train

    out = tmp_path_factory.mktemp("run")
    train(preset("digits", n_steps=2, hidden_channels=16),
          TrainConfig(dataset="digits", out=str(out), epochs=1, max_steps=10, batch_size=32, init_images=64,
                      device="cpu", num_workers=0, sample_temperatures=(0.0, 1.0)), progress=False)
    return str(out)


def call(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def open_png(path) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        return img


# ------------------------------------------------------------------ train / evaluate / sample
def test_evaluate(run, capsys, tmp_path):
    code, out, _ = call(capsys, "evaluate", run, "--device", "cpu", "--out", tmp_path / "eval.json")
    assert code == 0
    result = json.loads(out)
    assert result["dataset"] == "digits/test" and result["images"] == 300
    assert 0 < result["bits_per_dim"] < 20
    assert json.loads((tmp_path / "eval.json").read_text()) == result


def test_sample(run, capsys, tmp_path):
    code, out, _ = call(capsys, "sample", run, "--device", "cpu", "--temperatures", 0, 0.7, "--n", 3,
                        "--max-level", 16, "--out", tmp_path)
    assert code == 0
    summary = json.loads(out)
    assert summary["temperatures"] == [0.0, 0.7] and summary["max_level"] == 16
    assert (tmp_path / "samples.png").is_file() and (tmp_path / "samples.json").is_file()


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
    assert summary["directions_from"]["images"] == 400 and 0 < summary["directions_from"]["with_attribute"]["class_3"] < 400
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
        assert all(0 <= m["auroc"] <= 1 for m in summary["metrics"][name].values())
    assert summary["noise_max_level"] == 16
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
    (["manipulate", "{run}", "--attribute", "Smiling"], "no per-image attributes"),
    (["manipulate", "{run}", "--class-attribute", "12"], "not a class"),
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


def test_too_many_levels_for_8x8(capsys, tmp_path):
    code, _, err = call(capsys, "train", "--n-levels", 4, "--out", tmp_path / "r")
    assert code == 2 and "n_levels" in err and "divisible" in err
    assert len(err.strip().splitlines()) == 1


def test_every_option_has_help():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in ("reconstruct", "interpolate", "manipulate", "ood"):
        for action in sub.choices[name]._actions:
            assert action.help, f"{name} {action.option_strings or action.dest}"


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
