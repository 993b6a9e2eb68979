"""``torchglow bench``: the printed summary, the JSON written on request, errors in flags."""

import json

from torchglow.cli.app import main

ARGS = ["bench", "--preset", "digits", "--batch-size", "4", "--device", "cpu", "--n-steps", "2", "--hidden-channels",
        "8", "--set", "n_levels=2", "--set", "image_shape=[1,8,8]", "--warmup", "0", "--repeats", "1", "--no-isolate",
        "--threads", "1", "--phases", "train"]


def test_bench_prints_only_by_default(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(ARGS) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["train_images_per_s"] > 0 and "written" not in printed
    assert printed["train_eager_kernels"]["ops"] > 0 and set(printed["peak_memory_mb"]) == {"train"}
    assert list(tmp_path.iterdir()) == []


def test_bench_writes_json_named_by_its_options(tmp_path, capsys):
    assert main([*ARGS, "--out", str(tmp_path)]) == 0
    files = list(tmp_path.glob("*.json"))
    assert [f.name for f in files] == ["digits-K2-L2-w8-image_shape[1,8,8]-b4-cpu-fp32-t1.json"]
    r = json.loads(files[0].read_text())
    assert r["name"] == files[0].stem and r["train_images_per_s"] > 0
    assert r["overrides"] == {"n_levels": 2, "image_shape": [1, 8, 8], "n_steps": 2, "hidden_channels": 8}
    assert r["threads"] == 1
    assert str(files[0]) in capsys.readouterr().out


def test_bench_errors_name_the_options(capsys):
    assert main([*ARGS, "--repeats", "0"]) == 2
    err = capsys.readouterr().err
    assert "torchglow bench: error: --repeats must be >= 1 and --warmup >= 0" in err
