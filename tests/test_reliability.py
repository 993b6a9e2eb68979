"""Reliability: bad input gives one clear error line (never a traceback), faults during a run lose
nothing, and numerical breakdowns are reported rather than silently produced.

The subprocess test that SIGTERMs a CLI run at random points is marked ``slow``; it interrupts
``TORCHGLOW_SIGTERM_ROUNDS`` (default 3) times.
"""

import dataclasses
import errno
import io
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from torchglow import ConfigError, Glow, GlowConfig, preset, to_uint8
from torchglow import checkpoint as ckpt_module
from torchglow import train as train_module
from torchglow.checkpoint import load_checkpoint
from torchglow.cli import CLIError, build_configs, read_config_file
from torchglow.data import DatasetError, load_dataset
from torchglow.health import (NumericalHealthWarning, check_samples, coupling_scales, health_record,
                              health_warnings, invconv_condition_numbers, min_coupling_scale, sample_checked)
from torchglow.sampling import sample_grid
from torchglow.layers import Coupling, InvConv1x1
from torchglow.config import TrainConfig
from torchglow.train import train

from conftest import assert_one_error_line, cli
from flow_checks import perturb

TINY = ["--n-steps", "2", "--hidden-channels", "16", "--device", "cpu", "--num-workers", "0"]
FOLDER_MODEL = ["--image-shape", "3", "8", "8", "--n-levels", "2", "--n-steps", "1", "--hidden-channels", "8",
                "--batch-size", "8", "--epochs", "1", "--init-images", "8", "--eval-batch-size", "64",
                "--sample-temperatures", "0", "1", "--device", "cpu", "--num-workers", "0"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_train_config(out, **overrides):
    fields = dict(dataset="digits", out=str(out), epochs=2, batch_size=32, eval_batch_size=300, warmup_images=500,
                  init_images=64, log_every=5, checkpoint_every=5, device="cpu", num_workers=0,
                  sample_temperatures=(0.0, 1.0))
    return TrainConfig(**{**fields, **overrides})


def tiny_model_config(**overrides):
    return preset("digits", **{"n_steps": 2, "hidden_channels": 16, **overrides})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run folder of a tiny digits model after 3 steps (last.pt, init/, model/)."""
    out = tmp_path_factory.mktemp("run") / "run"
    train(tiny_model_config(), tiny_train_config(out, max_steps=3), progress=False)
    return out


def write_image(path, size=(10, 12), mode="RGB", seed=0, fmt=None):
    rng = np.random.RandomState(seed)
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    Image.fromarray(rng.randint(0, 256, shape, dtype=np.uint8)).convert(mode).save(path, format=fmt)


def image_folder(root, n, **kwargs):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        write_image(root / f"img{i:03d}.png", seed=i, **kwargs)
    return root


# =========================================================================== 1. bad input
@pytest.mark.parametrize("args,option", [
    (["--n-steps", "abc"], "--n-steps"),
    (["--lr", "fast"], "--lr"),
    (["--preset", "cifar100"], "--preset"),
    (["--depth", "3"], "--depth"),
    (["--precision", "fp8"], "--precision"),
])
def test_argparse_errors_name_the_option(capsys, args, option):
    rc, _, err = cli(capsys, "train", *args)
    assert rc == 2 and "Traceback" not in err
    assert option in err.strip().splitlines()[-1]


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


def test_cuda_device_without_a_gpu(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is available")
    rc, _, err = cli(capsys, "train", "--device", "cuda", "--out", tmp_path / "run", "--n-steps", "1")
    assert_one_error_line(rc, err, "--device cuda", "no CUDA GPU")


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
    rc, _, err = cli(capsys, "train", "--config", tmp_path / "c.yaml", "--out", tmp_path / "run")
    assert rc == 2
    assert_one_error_line(rc, err, field)


def test_config_file_that_is_missing_or_binary(capsys, tmp_path):
    rc, _, err = cli(capsys, "train", "--config", tmp_path / "none.yaml")
    assert_one_error_line(rc, err, "none.yaml")
    (tmp_path / "bin.yaml").write_bytes(bytes(range(256)))
    rc, _, err = cli(capsys, "train", "--config", tmp_path / "bin.yaml")
    assert_one_error_line(rc, err, "bin.yaml")


# ---------------------------------------------------------------- image folders
def test_empty_folder(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    rc, _, err = cli(capsys, "train", "--dataset", tmp_path / "empty", "--out", tmp_path / "run", *FOLDER_MODEL)
    assert_one_error_line(rc, err, tmp_path / "empty", "holds no images")


def test_folder_of_unreadable_files_only(capsys, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    for i in range(3):
        (folder / f"x{i}.png").write_bytes(b"")
    with pytest.warns(UserWarning, match="skipped 3 unreadable"):
        rc, _, err = cli(capsys, "train", "--dataset", folder, "--out", tmp_path / "run", *FOLDER_MODEL)
    assert_one_error_line(rc, err, folder, "no readable images")


def test_unreadable_files_are_skipped_with_one_warning(capsys, tmp_path):
    """Empty, non-image and garbage files (with image extensions) are skipped with one warning that
    counts them; grey, RGBA and palette images of any size are converted to RGB and cropped/resized
    to the model's 8x8; the run finishes."""
    folder = image_folder(tmp_path / "imgs", 24)
    write_image(folder / "grey.png", size=(13, 9), mode="L")
    write_image(folder / "rgba.png", size=(40, 17), mode="RGBA")
    write_image(folder / "pal.gif", size=(5, 5), mode="P")
    write_image(folder / "big.jpg", size=(64, 64), fmt="JPEG")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("not an image")
    (folder / "noise.webp").write_bytes(os.urandom(500))
    (folder / "README.txt").write_text("ignored: not an image extension")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc, out, err = cli(capsys, "train", "--dataset", folder, "--out", tmp_path / "run", *FOLDER_MODEL)
    assert rc == 0, err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["finished"]
    assert "bits/dim" in out and f"torchglow sample {tmp_path / 'run'}" in out
    skipped = [str(w.message) for w in caught if "unreadable" in str(w.message)]
    assert skipped and all("skipped" in m for m in skipped)
    assert sum(int(m.split("skipped ")[1].split()[0]) for m in skipped) == 3  # over the train and test splits


def test_grey_and_odd_sized_images_are_converted(tmp_path):
    """Grey images become RGB (the grey plane repeated); any size is centre-cropped to a square
    and resized (Lanczos) to the model's size."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    write_image(folder / "grey.png", size=(13, 9), mode="L")
    write_image(folder / "wide.png", size=(40, 17), mode="RGBA")
    data = load_dataset(str(folder), "train", image_size=8, channels=3)
    for i in range(len(data)):
        x, _ = data[i]
        assert x.shape == (3, 8, 8) and x.dtype == torch.uint8
    grey = data[[p.name for p in data.paths].index("grey.png")][0]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_truncated_image_is_named(capsys, tmp_path):
    """A truncated PNG passes PIL's header check; decoding it fails, and the error names the file
    (image folders are decoded once at start-up, for the per-pixel baseline)."""
    folder = image_folder(tmp_path / "imgs", 24)
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (folder / "zz_truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    rc, _, err = cli(capsys, "train", "--dataset", folder, "--out", tmp_path / "run", *FOLDER_MODEL)
    assert_one_error_line(rc, err, folder / "zz_truncated.png", "truncated")


def test_data_set_smaller_than_the_batch(capsys, tmp_path):
    folder = image_folder(tmp_path / "imgs", 21)  # 20 training images, 1 test image
    rc, _, err = cli(capsys, "train", "--dataset", folder, "--out", tmp_path / "run", *FOLDER_MODEL,
                     "--batch-size", "32")
    assert_one_error_line(rc, err, "has 20 images, fewer than --batch-size 32")
    # under 20 images the 5% test split is empty
    small = image_folder(tmp_path / "small", 5)
    rc, _, err = cli(capsys, "train", "--dataset", small, "--out", tmp_path / "run", *FOLDER_MODEL)
    assert_one_error_line(rc, err, small, "no readable images in its test split")


def test_num_classes_without_class_subfolders(capsys, tmp_path):
    folder = image_folder(tmp_path / "imgs", 24)
    rc, _, err = cli(capsys, "train", "--dataset", folder, "--out", tmp_path / "run", *FOLDER_MODEL,
                     "--num-classes", "3")
    assert_one_error_line(rc, err, "--num-classes 3", "has no labels")


def test_unknown_data_set(capsys, tmp_path):
    rc, _, err = cli(capsys, "train", "--dataset", tmp_path / "nowhere", "--out", tmp_path / "run")
    assert_one_error_line(rc, err, "nowhere")


# ---------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def bad_checkpoints(tiny_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    good = (tiny_run / "last.pt").read_bytes()
    (root / "truncated.pt").write_bytes(good[: len(good) // 3])
    (root / "text.pt").write_text("not a checkpoint\n")
    torch.save({"weights": torch.zeros(3)}, root / "foreign.pt")
    ckpt = torch.load(tiny_run / "last.pt", weights_only=True)
    ckpt["model_config"]["hidden_channels"] = 8  # weights of width 16 under a config of width 8
    torch.save(ckpt, root / "mismatch.pt")
    return root


@pytest.mark.parametrize("command", ["evaluate", "sample"])
@pytest.mark.parametrize("name,phrase", [
    ("truncated.pt", "truncated, corrupt or not a torch file"),
    ("text.pt", "truncated, corrupt or not a torch file"),
    ("foreign.pt", "is not a torchglow checkpoint"),
    ("mismatch.pt", "does not match the model config"),
    ("missing.pt", "does not exist"),
])
def test_evaluate_and_sample_bad_checkpoints(capsys, tmp_path, bad_checkpoints, command, name, phrase):
    extra = ["--out", tmp_path / "o"] if command == "sample" else []
    rc, _, err = cli(capsys, command, bad_checkpoints / name, *extra)
    assert rc == 1
    assert_one_error_line(rc, err, bad_checkpoints / name, phrase)


@pytest.mark.parametrize("name,phrase", [
    ("truncated.pt", "truncated, corrupt or not a torch file"),
    ("text.pt", "truncated, corrupt or not a torch file"),
    ("foreign.pt", "is not a torchglow checkpoint"),
])
def test_init_from_bad_checkpoints(capsys, tmp_path, bad_checkpoints, name, phrase):
    rc, _, err = cli(capsys, "train", "--init-from", bad_checkpoints / name, "--out", tmp_path / "run", *TINY)
    assert_one_error_line(rc, err, bad_checkpoints / name, phrase)


def test_init_from_another_model_config(capsys, tmp_path, tiny_run):
    rc, _, err = cli(capsys, "train", "--init-from", tiny_run, "--out", tmp_path / "run",
                     "--n-steps", "2", "--hidden-channels", "8", "--device", "cpu")
    assert_one_error_line(rc, err, f"--init-from {tiny_run}", "another model config", "hidden_channels 16 vs 8")


def test_resume_errors(capsys, tmp_path, tiny_run):
    rc, _, err = cli(capsys, "train", "--resume", tmp_path / "nowhere")
    assert_one_error_line(rc, err, tmp_path / "nowhere")
    # a run made by another preset: its config is its own, so a preset or model option is refused
    rc, _, err = cli(capsys, "train", "--resume", tiny_run, "--preset", "mnist")
    assert_one_error_line(rc, err, "--resume continues a run with its own config")
    # a run folder whose last.pt comes from another model
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text((tiny_run / "config.json").read_text())
    ckpt = torch.load(tiny_run / "last.pt", weights_only=True)
    ckpt["model_config"]["n_steps"] = 3
    torch.save(ckpt, other / "last.pt")
    rc, _, err = cli(capsys, "train", "--resume", other)
    assert_one_error_line(rc, err, other / "last.pt", "another model config", "n_steps 3 vs 2")
    # stopped before its first checkpoint
    (other / "last.pt").unlink()
    rc, _, err = cli(capsys, "train", "--resume", other)
    assert_one_error_line(rc, err, "no last.pt", "without --resume")
    # a config.json that is not one
    (other / "config.json").write_text("{not json")
    rc, _, err = cli(capsys, "train", "--resume", other)
    assert_one_error_line(rc, err, other / "config.json")


# ---------------------------------------------------------------- fuzzing
GLOW_FIELDS = [f.name for f in dataclasses.fields(GlowConfig)]
TRAIN_FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]
ANY_VALUE = st.one_of(
    st.integers(), st.integers(-3, 70), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.sampled_from(["affine", "invconv", "digits", "cpu", "adam", "fp32", "none", "1e-3"]),
    st.lists(st.one_of(st.integers(-2, 40), st.floats(-2, 40), st.none(), st.text(max_size=3)), max_size=4),
    st.none(), st.booleans(), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
# TORCHGLOW_FUZZ_EXAMPLES raises the number of examples for a longer local search.
FUZZ = settings(max_examples=int(os.environ.get("TORCHGLOW_FUZZ_EXAMPLES", "50")), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(st.dictionaries(st.sampled_from(GLOW_FIELDS + TRAIN_FIELDS + ["preset"]), ANY_VALUE, max_size=6))
def test_fuzz_config_values(values):
    try:
        build_configs(dict(values), None)
    except (ConfigError, CLIError):
        pass
    for fields, cls in ((GLOW_FIELDS, GlowConfig), (TRAIN_FIELDS, TrainConfig)):
        try:
            cls(**{k: v for k, v in values.items() if k in fields})
        except ConfigError:
            pass


@FUZZ
@given(st.one_of(
    st.dictionaries(st.one_of(st.sampled_from(GLOW_FIELDS + TRAIN_FIELDS + ["model", "train"]), st.integers(),
                              st.none()), ANY_VALUE, max_size=6).map(lambda d: yaml.safe_dump(d)),
    st.text(max_size=60),
))
def test_fuzz_config_files(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(text)
    try:
        build_configs(read_config_file(str(path)), None)
    except (ConfigError, CLIError):
        pass


def _image_bytes(kind, seed, cut):
    buf = io.BytesIO()
    rng = np.random.RandomState(seed)
    Image.fromarray(rng.randint(0, 256, (9, 7, 3), dtype=np.uint8)).save(buf, kind)
    data = buf.getvalue()
    return data[: int(len(data) * cut)]


FILE_CONTENT = st.one_of(
    st.binary(max_size=300),
    st.builds(_image_bytes, st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "WEBP"]), st.integers(0, 9),
              st.floats(0.0, 1.0)),
)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from([".png", ".jpg", ".gif", ".bmp", ".webp"]), FILE_CONTENT),
                min_size=1, max_size=6))
def test_fuzz_image_folders(tmp_path_factory, files):
    """Random bytes and truncated images of every format: loading and iterating a folder raises
    nothing but DatasetError (and warns about skipped files); what it yields is well-formed."""
    folder = tmp_path_factory.mktemp("imgs")
    for i, (ext, content) in enumerate(files):
        (folder / f"f{i}{ext}").write_bytes(content)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            data = load_dataset(str(folder), "train", image_size=8)
        except DatasetError:
            return
        for i in range(len(data)):
            try:
                x, y = data[i]
            except DatasetError:
                continue
            assert x.shape == (3, 8, 8) and x.dtype == torch.uint8 and int(y) == -1


# =========================================================================== 2. faults during a run
def _poisoning_forward(monkeypatch, poisoned: dict[int, str]):
    """Glow.forward returning a NaN/inf loss, or a finite loss with an inf gradient, at the given
    training calls (1-based)."""
    forward = Glow.forward
    calls = {"n": 0, "hook": None}

    def flaky(self, x, y=None):
        out = forward(self, x, y)
        if not (self.training and torch.is_grad_enabled()):
            return out
        if calls["hook"] is not None:
            calls["hook"].remove()
            calls["hook"] = None
        calls["n"] += 1
        kind = poisoned.get(calls["n"])
        if kind == "nan":
            return out._replace(log_prob=out.log_prob * float("nan"))
        if kind == "inf":
            return out._replace(log_prob=out.log_prob + float("inf"))
        if kind == "grad":  # finite loss, infinite gradient
            p = next(self.parameters())
            calls["hook"] = p.register_hook(lambda g: torch.full_like(g, float("inf")))
        return out

    monkeypatch.setattr(Glow, "forward", flaky)


def test_nan_and_inf_at_random_steps(tmp_path, monkeypatch):
    """Skipped steps at random (seeded) points, and one run of max_bad_steps in a row, which restores
    the last checkpoint: the run finishes with finite weights and logs the health numbers."""
    rng = random.Random(1234)
    steps = 2 * (1497 // 32)
    poisoned = {s: rng.choice(["nan", "inf", "grad"]) for s in rng.sample(range(1, steps + 1), 12)}
    poisoned.update({s: "nan" for s in range(30, 35)})  # 5 in a row: restore last.pt (step 25)
    _poisoning_forward(monkeypatch, poisoned)
    result = train(tiny_model_config(), tiny_train_config(tmp_path / "run", max_bad_steps=5), progress=False)
    assert result.summary["finished"] and result.summary["skipped_steps"] == len(poisoned)
    for m in (result.model, result.eval_model):
        assert all(torch.isfinite(p).all() for p in m.parameters())
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum("restored" in r.get("event", "") for r in records) == 1
    epochs = [r for r in records if "test_bpd" in r]
    assert [r["epoch"] for r in epochs] == [1, 2]
    for r in epochs:
        assert 0.999 <= r["invconv_cond_max"] < 100 and 0.0 < r["coupling_scale_min"] <= 1.0
        assert math.isfinite(r["test_bpd"])


def test_sigterm_during_evaluation_then_resume(tmp_path, monkeypatch):
    """SIGTERM while the first epoch's test set is being evaluated: the evaluation finishes, the
    run checkpoints and stops; --resume then ends where an uninterrupted run ends."""
    real_evaluate = train_module.evaluate_bpd
    calls = {"n": 0}

    def signalled(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate_bpd", signalled)
    cfg = tiny_train_config(tmp_path / "run")
    stopped = train(tiny_model_config(), cfg, progress=False)
    monkeypatch.undo()
    assert stopped.summary["interrupted_by"] == "SIGTERM" and not stopped.summary["finished"]
    assert load_checkpoint(tmp_path / "run" / "last.pt")["state"]["step"] == stopped.summary["steps"] == 1497 // 32
    resumed = train(tiny_model_config(), cfg, resume=True, progress=False)
    reference = train(tiny_model_config(), tiny_train_config(tmp_path / "ref"), progress=False)
    assert resumed.summary["finished"] and resumed.summary["steps"] == reference.summary["steps"]
    assert resumed.summary["test_bpd"] == pytest.approx(reference.summary["test_bpd"], abs=1e-6)
    ref_state = reference.model.state_dict()
    for name, v in resumed.model.state_dict().items():
        torch.testing.assert_close(v, ref_state[name], atol=1e-6, rtol=0, msg=name)


def test_sigterm_during_a_checkpoint_write(tmp_path, monkeypatch):
    """SIGTERM arrives half-way through writing last.pt: the write completes, the run stops at the
    next step boundary with a loadable last.pt, and the signal handlers are put back."""
    real_save = torch.save
    calls = {"n": 0}

    def slow_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
        f.write(data[len(data) // 2:])

    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(torch, "save", slow_save)
    result = train(tiny_model_config(), tiny_train_config(tmp_path / "run"), progress=False)
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) == handler
    assert result.summary["interrupted_by"] == "SIGTERM" and not result.summary["finished"]
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["state"]["step"] == result.summary["steps"] == 10  # signalled while writing step 10's


def test_interrupt_mid_checkpoint_keeps_the_previous_one_and_resumes(tmp_path, monkeypatch):
    """A fatal interrupt while last.pt is being rewritten: the previous last.pt survives and the run
    resumes from it."""
    real_save = torch.save
    calls = {"n": 0}

    def dying_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[:1000])
            raise KeyboardInterrupt
        real_save(obj, f, *args, **kwargs)

    cfg = tiny_train_config(tmp_path / "run", max_steps=20)
    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model_config(), cfg, progress=False)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "run" / "last.pt")["state"]["step"] == 5
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]
    result = train(tiny_model_config(), cfg, resume=True, progress=False)
    assert result.summary["finished"] and result.summary["steps"] == 20


def test_full_disk_during_a_run(capsys, tmp_path, monkeypatch):
    """os.replace fails with ENOSPC on the second last.pt: one error line naming the file, exit 1,
    and the first last.pt intact."""
    real_replace = os.replace
    calls = {"n": 0}

    def replace(src, dst, *args, **kwargs):
        if str(dst).endswith("last.pt"):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(ckpt_module.os, "replace", replace)
    rc, _, err = cli(capsys, "train", "--out", tmp_path / "run", *TINY, "--epochs", "1", "--batch-size", "32",
                     "--init-images", "64", "--checkpoint-every", "5", "--max-steps", "20")
    monkeypatch.undo()
    assert rc == 1
    assert_one_error_line(rc, err, tmp_path / "run" / "last.pt", "No space left on device")
    assert load_checkpoint(tmp_path / "run" / "last.pt")["state"]["step"] == 5


def test_unwritable_run_folder(capsys, tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    rc, _, err = cli(capsys, "train", "--out", tmp_path / "file" / "run", *TINY, "--max-steps", "1")
    assert_one_error_line(rc, err, tmp_path / "file" / "run", "cannot write to run folder")


def test_unreadable_file_mid_run_checkpoints_first(tmp_path, monkeypatch):
    """A file that fails to decode mid-run (large folders are not all decoded at start-up): the run
    checkpoints at that step boundary and raises one line naming the file, even when a DataLoader
    worker wrapped the error in its traceback."""

    batches = train_module._Data.batches

    def failing(self, index_batches):
        for i, batch in enumerate(batches(self, index_batches)):
            if i == 7:
                raise DatasetError("Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most "
                                   "recent call last):\n  File ...\ntorchglow.data.DatasetError: cannot read image "
                                   "/data/x.png: image file is truncated")
            yield batch

    monkeypatch.setattr(train_module._Data, "batches", failing)
    with pytest.raises(DatasetError) as info:
        train(tiny_model_config(), tiny_train_config(tmp_path / "run"), progress=False)
    message = str(info.value)
    assert "\n" not in message and message.startswith("cannot read image /data/x.png: image file is truncated")
    assert "checkpointed at step 7" in message and "--resume" in message
    assert load_checkpoint(tmp_path / "run" / "last.pt")["state"]["step"] == 7


# ---------------------------------------------------------------- SIGTERM at random points (subprocess)
RUN = [sys.executable, "-c", "import sys, torch; torch.set_num_threads(1); from torchglow.cli import main; "
       "sys.exit(main(sys.argv[1:]))"]
RUN_ARGS = ["train", "--n-steps", "2", "--hidden-channels", "16", "--epochs", "2", "--batch-size", "32",
            "--init-images", "64", "--checkpoint-every", "5", "--device", "cpu", "--num-workers", "0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _launch(*args):
    return subprocess.Popen([*RUN, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV)


@pytest.mark.slow
def test_sigterm_at_random_points_then_resume_equals_uninterrupted(tmp_path):
    rounds = int(os.environ.get("TORCHGLOW_SIGTERM_ROUNDS", "3"))
    rng = random.Random(int(os.environ.get("TORCHGLOW_SIGTERM_SEED", "0")))
    ref = _launch(*RUN_ARGS, "--out", tmp_path / "ref")
    out, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err
    run = tmp_path / "run"
    stops = []
    for i in range(rounds):
        launched = time.time_ns()
        p = _launch(*RUN_ARGS, "--out", run) if i == 0 else _launch("train", "--resume", run)
        # train() rewrites config.json first thing: from then on SIGTERM is a clean stop
        while p.poll() is None and not ((run / "config.json").is_file()
                                        and (run / "config.json").stat().st_mtime_ns >= launched):
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 4.0))
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=300)
        assert "Traceback" not in err
        if p.returncode == -signal.SIGTERM:
            # train() had returned (handlers restored) and the process was exiting: the run is
            # complete on disk (summary.json written by this process); nothing was lost
            assert (run / "summary.json").stat().st_mtime_ns >= launched, err
        else:
            # 143 = 128 + SIGTERM: stopped cleanly (resumable); 0: it had finished
            assert p.returncode in (0, 143), err
            assert (p.returncode == 143) == ("resume with: torchglow train --resume" in out), out
        summary = json.loads((run / "summary.json").read_text())
        stops.append(summary["steps"])
        assert summary["interrupted_by"] in ("SIGTERM", None)
        assert load_checkpoint(run / "last.pt")["state"]["step"] == summary["steps"]
    p = _launch("train", "--resume", run)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0 and json.loads((run / "summary.json").read_text())["finished"], err
    a, b = load_checkpoint(tmp_path / "ref" / "last.pt"), load_checkpoint(run / "last.pt")
    assert a["state"]["step"] == b["state"]["step"] == 2 * (1497 // 32)
    for key in ("model", "ema"):
        for name, v in a[key].items():
            torch.testing.assert_close(b[key][name], v, atol=1e-6, rtol=0, msg=f"{key}.{name} (stops at {stops})")
    print(f"stopped at steps {stops}")


# =========================================================================== 3./4. numerical health
def collapse_scales(model, bias):
    """Every affine coupling's scale becomes sigmoid(bias + 2) (zero weights, a constant bias)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Coupling):
                last = m.nn[-1]
                last.conv.weight.zero_()
                last.logs.zero_()
                last.conv.bias.zero_()
                last.conv.bias[1::2] = bias


def test_invconv_condition_numbers():
    model = Glow(preset("digits", n_steps=2, hidden_channels=8))
    conds = invconv_condition_numbers(model)
    assert len(conds) == 4 and all(abs(c - 1.0) < 1e-5 for c in conds)  # random rotations
    conv = next(m for m in model.modules() if isinstance(m, InvConv1x1))
    with torch.no_grad():
        conv.log_s[0] += math.log(1000.0)
    w = conv.weight_matrix().detach().double()
    assert invconv_condition_numbers(model)[0] == pytest.approx(float(torch.linalg.cond(w)), rel=1e-9)
    assert invconv_condition_numbers(model)[0] > 100
    assert invconv_condition_numbers(Glow(preset("digits", permutation="shuffle"))) == []


def test_min_coupling_scale():
    model = Glow(preset("digits", n_steps=2, hidden_channels=8, dropout=0.0))
    x = torch.rand(8, 1, 8, 8) - 0.5
    model.initialize(x)
    assert min_coupling_scale(model, x) == pytest.approx(1 / (1 + math.exp(-2)), rel=1e-6)  # zero-init: sigmoid(2)
    collapse_scales(model, -5.0)
    assert min_coupling_scale(model, x) == pytest.approx(1 / (1 + math.exp(3)), rel=1e-5)
    collapse_scales(model, -200.0)  # below float32's range, still reported (float64)
    scale = min_coupling_scale(model, x)
    assert 0 < scale < 1e-80 and len(coupling_scales(model, x)) == 4
    assert any("coupling scale" in w for w in health_warnings(health_record(model, x)))
    model.set_memory("invertible")  # the check uses the plain forward and restores the mode
    assert min_coupling_scale(model, x) == scale and model.memory_mode == "invertible"
    assert min_coupling_scale(Glow(preset("digits", coupling="additive")), x) is None


def test_collapsed_scales_make_sampling_non_finite_and_it_is_reported(tmp_path):
    """The inverse divides by the coupling scales: collapsed scales overflow float32. Glow.sample
    returns the inf/NaN as is; check_samples/sample_checked warn once, to_uint8 maps them to valid
    pixels, sample_grid counts them in samples.json."""
    model = Glow(preset("digits", n_steps=2, hidden_channels=8))
    x = torch.rand(8, 1, 8, 8) - 0.5
    model.initialize(x)
    collapse_scales(model, -60.0)  # each inverse multiplies by ~e^58
    samples, stats = sample_checked(model, 4, 1.0, generator=torch.Generator().manual_seed(0))
    assert stats["nonfinite"] > 0
    with pytest.warns(NumericalHealthWarning, match="inf/NaN"):
        check_samples(samples, context="test collapsed")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_samples(samples, context="test collapsed")  # once per context
    images = to_uint8(samples, model.config.n_bits)
    assert images.dtype == torch.uint8
    summary = sample_grid(model, tmp_path, temperatures=[0.0, 1.0], n_per_row=4)
    assert summary["per_temperature"]["1"]["nonfinite"] > 0


def test_high_temperature_overflow_is_reported():
    model = Glow(preset("digits", n_steps=2, hidden_channels=8))
    model.initialize(torch.rand(8, 1, 8, 8) - 0.5)
    perturb(model, 0.02)
    fine, stats_1 = sample_checked(model, 4, 1.0, generator=torch.Generator().manual_seed(0))
    assert stats_1["nonfinite"] == 0
    hot, stats_hot = sample_checked(model, 4, 1e38, generator=torch.Generator().manual_seed(0))
    assert stats_hot["nonfinite"] > 0


@pytest.mark.slow
def test_cifar10_preset_long_chain_float32():
    """The full cifar10 preset (3 levels x 32 steps, 44M parameters) in float32: ActNorm initialised
    on random data, every parameter perturbed by 0.003 N(0, 1); decode(encode(x)) on 2 images.
    Measured max abs error 4.4e-06 (perturbation 0.001: 1.8e-06; 0.005: 7.5e-05; from 0.01 on
    some coupling scale collapses below 1e-9 and the float32 inverse overflows, which
    min_coupling_scale reports)."""
    torch.manual_seed(0)
    model = Glow.from_preset("cifar10")
    model.initialize(torch.rand(8, 3, 32, 32) - 0.5)
    perturb(model, 0.003)
    x = torch.rand(2, 3, 32, 32) - 0.5
    with torch.no_grad():
        latents, _ = model.encode(x)
        x_rec = model.decode(latents)
    err = float((x_rec - x).abs().max())
    print(f"cifar10 preset, float32, 96 steps: max abs reconstruction error {err:.3g}")
    assert err < 1e-4
    record = health_record(model, x)
    assert record["invconv_cond_max"] < 10 and record["coupling_scale_min"] > 0.1
    assert health_warnings(record) == []
