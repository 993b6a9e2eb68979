"""``torchglow ood`` (:mod:`torchglow.cli.ood`) on a tiny trained run."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from torchglow.cli.errors import in_flags

from conftest import cli as call
from cli_checks import tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread) -> str:
    return tiny_run(tmp_path_factory)


def test_ood_builtin_sets(run, capsys, tmp_path):
    code, out, _ = call(capsys, "ood", run, "--ood", "flipped", "inverted", "noise", "--typicality-m", 2, 5,
                        "--max-images", 100, "--device", "cpu", "--out", tmp_path)
    assert code == 0
    assert "AUROC" in out and "typicality_m5" in out
    summary = json.loads((tmp_path / "ood.json").read_text())
    assert summary["in_distribution"] == "digits/test"
    assert summary["ood_sets"] == {"flipped": 100, "inverted": 100, "noise": 100}
    assert in_flags(summary["table"]) in out and "(--in-split all, --max-images 0)" in out
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
