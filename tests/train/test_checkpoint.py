"""Checkpoints: atomic writes that survive full disks and interrupts, and loading that fails with
one clear message naming the file for anything that is not a usable checkpoint."""

import errno
import io
import os

import pytest
import torch

from torchglow import Glow
from torchglow.train.checkpoint import (FORMAT, CheckpointError, atomic_save, config_diff, load_checkpoint, load_model,
                                  model_from_checkpoint)

from conftest import TINY, assert_one_error_line, cli, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def a_checkpoint(**config_overrides):
    model = Glow(tiny_config(**config_overrides))
    return {"format": FORMAT, "model_config": model.config.to_dict(), "model": model.state_dict(), "ema": None}


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_atomic_save_round_trip(tmp_path):
    ckpt = a_checkpoint()
    atomic_save(ckpt, tmp_path / "last.pt")
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert loaded["model_config"] == ckpt["model_config"]
    assert all(torch.equal(loaded["model"][k], v) for k, v in ckpt["model"].items())
    assert leftovers(tmp_path) == []


class _FullDisk:
    """A file that takes ``room`` bytes, then fails like a full disk."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        if self.room < len(data):
            self.f.write(bytes(data)[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()

    def fileno(self):
        return self.f.fileno()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_full_disk_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """torch.save reports a failed write as an opaque RuntimeError of its zip writer; atomic_save
    names the file and the OS error instead, and the previous checkpoint is untouched."""
    atomic_save(a_checkpoint(), tmp_path / "last.pt")
    before = (tmp_path / "last.pt").read_bytes()
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode="r", *a, **k: _FullDisk(real_fdopen(fd, mode, *a, **k), 2000))
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*last\.pt: No space left on device"):
        atomic_save(a_checkpoint(hidden_channels=16), tmp_path / "last.pt")
    monkeypatch.undo()
    assert (tmp_path / "last.pt").read_bytes() == before
    load_checkpoint(tmp_path / "last.pt")
    assert leftovers(tmp_path) == []


def test_failed_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    atomic_save(a_checkpoint(), tmp_path / "last.pt")
    before = (tmp_path / "last.pt").read_bytes()

    def no_space(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(CheckpointError, match="No space left on device"):
        atomic_save(a_checkpoint(hidden_channels=16), tmp_path / "last.pt")
    monkeypatch.undo()
    assert (tmp_path / "last.pt").read_bytes() == before
    assert leftovers(tmp_path) == []


def test_interrupt_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A fatal signal (here KeyboardInterrupt) half-way through torch.save: the exception goes on,
    the temporary file is removed and last.pt is the previous one."""
    atomic_save(a_checkpoint(), tmp_path / "last.pt")
    before = (tmp_path / "last.pt").read_bytes()
    real_save = torch.save

    def interrupted_save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save(a_checkpoint(hidden_channels=16), tmp_path / "last.pt")
    monkeypatch.undo()
    assert (tmp_path / "last.pt").read_bytes() == before
    assert leftovers(tmp_path) == []


def test_unwritable_folder(tmp_path):
    # a path below a regular file cannot be created, even as root (where chmod does not block)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*file/last\.pt"):
        atomic_save(a_checkpoint(), tmp_path / "file" / "last.pt")


@pytest.mark.parametrize("content,match", [
    (lambda good: good[: len(good) // 2], "truncated, corrupt or not a torch file"),
    (lambda good: good[:100], "truncated, corrupt or not a torch file"),
    (lambda good: b"", "truncated, corrupt or not a torch file"),
    (lambda good: b"model: 3\n", "truncated, corrupt or not a torch file"),
], ids=["half", "header", "empty", "text"])
def test_unreadable_files_give_one_line(tmp_path, content, match):
    atomic_save(a_checkpoint(), tmp_path / "good.pt")
    (tmp_path / "bad.pt").write_bytes(content((tmp_path / "good.pt").read_bytes()))
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(tmp_path / "bad.pt")
    message = str(info.value)
    assert str(tmp_path / "bad.pt") in message and "\n" not in message and len(message) < 400


def test_torch_files_that_are_not_checkpoints(tmp_path):
    torch.save({"a": torch.zeros(2)}, tmp_path / "dict.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    torch.save({"format": FORMAT, "model": {}}, tmp_path / "partial.pt")
    for name, match in (("dict.pt", "no 'torchglow-checkpoint-v1' marker"),
                        ("tensor.pt", "no 'torchglow-checkpoint-v1' marker"),
                        ("partial.pt", "incomplete torchglow checkpoint")):
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(tmp_path / name)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_whose_weights_do_not_fit_its_config(tmp_path):
    ckpt = a_checkpoint()
    ckpt["model_config"]["hidden_channels"] = 4
    atomic_save(ckpt, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=r"odd\.pt does not match the model config \(size mismatch"):
        load_model(tmp_path / "odd.pt")
    ckpt["model_config"]["n_levels"] = "two"
    with pytest.raises(CheckpointError, match="invalid model config"):
        model_from_checkpoint(ckpt, source="x.pt")


def test_load_model_from_folders(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nothing")
    Glow(tiny_config()).save_pretrained(tmp_path / "pre")
    (tmp_path / "pre" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot load pretrained model"):
        load_model(tmp_path / "pre")


def test_config_diff():
    a, b = tiny_config().to_dict(), tiny_config(hidden_channels=16, n_steps=3).to_dict()
    assert config_diff(a, b) == "hidden_channels 8 vs 16, n_steps 2 vs 3"
    assert config_diff(a, a) == ""


# ---------------------------------------------------------------- bad checkpoints given to the commands
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


def test_atomic_writes_honour_the_umask(tmp_path):
    """mkstemp makes 0600 files; a checkpoint and a JSON file get 0o666 & ~umask, as open() gives."""
    import os

    from torchglow.train.checkpoint import atomic_save
    from torchglow.files import default_file_mode, write_json_atomic

    old = os.umask(0o027)
    try:
        assert default_file_mode() == 0o640
        atomic_save({"a": 1}, tmp_path / "c.pt")
        write_json_atomic(tmp_path / "s.json", {"a": 1})
    finally:
        os.umask(old)
    assert os.umask(old) == old  # default_file_mode left the umask as it was
    for name in ("c.pt", "s.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name


def test_brief_messages_end_on_a_whole_word():
    from torchglow.train.checkpoint import _brief

    text = _brief(RuntimeError("word " * 60), limit=50)
    assert len(text) <= 50 and text.endswith("word...")
    assert _brief(ValueError("First sentence. Second one.")) == "First sentence"
