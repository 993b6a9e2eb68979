"""Training: the run folder, resuming, the end of a run, and the faults a run survives (non-finite
steps, SIGTERM, interrupts and full disks while writing checkpoints, files that go bad mid-run)
without losing what it had done.

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
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

from torchglow import Glow

from torchglow import GlowConfig
from torchglow.train import checkpoint as ckpt_module
from torchglow.train import data as data_module
from torchglow.train import loop as train_module
from torchglow.train import text as text_module
from torchglow.train.checkpoint import CheckpointError, load_checkpoint
from torchglow import ConfigError
from torchglow.config import train_preset
from torchglow.data import DatasetError
from torchglow.health import invconv_condition_numbers
from torchglow.train import TrainingError, train

from conftest import TINY, assert_one_error_line, cli, tiny_model_config, tiny_train_config
from tool_checks import image_folder

pytestmark = pytest.mark.usefixtures("one_thread")


def state_dicts_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_run_folder_and_learning(tmp_path):
    result = train(tiny_model_config(), tiny_train_config(tmp_path / "run"), progress=False)
    run = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "last.pt", "best.pt", "summary.json", "bpd.png",
                 "samples/epoch_001.png", "samples/epoch_002.png", "model/config.json", "model/model.safetensors"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary == json.loads(json.dumps(result.summary))
    assert summary["finished"] and summary["steps"] == 2 * (1497 // 32)
    assert summary["images_seen"] == summary["steps"] * 32
    # two short epochs of a tiny model already beat a uniform 5-bit model by far
    assert summary["test_bpd"] < 4.0
    assert 2.0 < summary["baseline_bpd"] < 3.0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"train_bpd", "lr", "grad_norm", "images_per_sec"} <= set(next(r for r in lines if "train_bpd" in r))
    assert [r["epoch"] for r in lines if "test_bpd" in r] == [1, 2]
    reloaded = Glow.from_pretrained(run / "model")
    assert state_dicts_equal(reloaded.state_dict(), result.eval_model.state_dict())


def test_resume_gives_the_same_result(tmp_path):
    """N steps straight vs N/2, stop, resume, N/2 (crossing an epoch end): identical state."""
    full = train(tiny_model_config(), tiny_train_config(tmp_path / "a", max_steps=60), progress=False)
    half_cfg = tiny_train_config(tmp_path / "b", max_steps=30)
    train(tiny_model_config(), half_cfg, progress=False)
    resumed = train(tiny_model_config(), dataclasses.replace(half_cfg, max_steps=60), resume=True, progress=False)
    assert resumed.summary["steps"] == full.summary["steps"] == 60
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert state_dicts_equal(a["model"], b["model"])
    assert state_dicts_equal(a["ema"], b["ema"])
    assert a["state"]["step"] == b["state"]["step"] and a["state"]["images"] == b["state"]["images"]


def test_resume_refuses_another_model_config(tmp_path):
    cfg = tiny_train_config(tmp_path / "r", max_steps=3)
    train(tiny_model_config(), cfg, progress=False)
    with pytest.raises(CheckpointError, match="another model config"):
        train(tiny_model_config(hidden_channels=8), dataclasses.replace(cfg, max_steps=6), resume=True, progress=False)


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
    assert_one_error_line(rc, err, "no last.pt", f"--out {other} --overwrite")
    rc, _, err = cli(capsys, "train", "--out", other)  # and without --resume: the message says how
    assert_one_error_line(rc, err, "before its first checkpoint", "--overwrite")
    # a config.json that is not one
    (other / "config.json").write_text("{not json")
    rc, _, err = cli(capsys, "train", "--resume", other)
    assert_one_error_line(rc, err, other / "config.json")


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


def test_non_finite_steps_are_skipped(tmp_path, monkeypatch):
    _poisoning_forward(monkeypatch, {3: "nan", 7: "nan"})
    result = train(tiny_model_config(), tiny_train_config(tmp_path / "nan", epochs=1), progress=False)
    assert result.summary["finished"] and result.summary["skipped_steps"] == 2
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    events = [json.loads(l) for l in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert sum("skipped" in e.get("event", "") for e in events) == 2


def test_persistent_non_finite_loss_restores_then_stops(tmp_path, monkeypatch):
    cfg = tiny_train_config(tmp_path / "div", epochs=1, max_steps=4)
    train(tiny_model_config(), cfg, progress=False)  # leaves a good last.pt
    forward = Glow.forward
    monkeypatch.setattr(Glow, "forward", lambda self, x, y=None: forward(self, x, y)._replace(
        log_prob=forward(self, x, y).log_prob * float("inf")))
    with pytest.raises(TrainingError, match="still non-finite after restoring"):
        train(tiny_model_config(), dataclasses.replace(cfg, max_steps=30, max_bad_steps=2), resume=True, progress=False)


def test_nan_and_inf_at_random_steps(tmp_path, monkeypatch):
    """Skipped steps at random (seeded) points, and one run of max_bad_steps in a row, which restores
    the last checkpoint: the run finishes with finite weights and logs the health numbers."""
    rng = random.Random(1234)
    # within the first of the run's two epochs (46 steps each), so every poisoned call happens: the
    # skipped-step count below then checks that each was skipped
    poisoned = {s: rng.choice(["nan", "inf", "grad"]) for s in rng.sample(range(1, 46), 12)}
    poisoned.update({s: "nan" for s in range(30, 35)})  # 5 in a row: restore last.pt (step 25)
    _poisoning_forward(monkeypatch, poisoned)
    cfg = tiny_train_config(tmp_path / "run", max_bad_steps=5, checkpoint_every=5)
    result = train(tiny_model_config(), cfg, progress=False)
    assert result.summary["finished"] and result.summary["skipped_steps"] == len(poisoned)
    for m in (result.model, result.eval_model):
        assert all(torch.isfinite(p).all() for p in m.parameters())
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum("restored" in r.get("event", "") for r in records) == 1
    epochs = [r for r in records if "test_bpd" in r]
    assert [r["epoch"] for r in epochs] == [1, 2]
    # the last epoch's health numbers are the final evaluation model's
    assert epochs[-1]["invconv_cond_max"] == pytest.approx(max(invconv_condition_numbers(result.eval_model)),
                                                           rel=1e-6)
    assert all(0.0 < r["coupling_scale_min"] < 1.0 and math.isfinite(r["test_bpd"]) for r in epochs)


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
    cfg = tiny_train_config(tmp_path / "run", checkpoint_every=5)
    stopped = train(tiny_model_config(), cfg, progress=False)
    monkeypatch.undo()
    assert stopped.summary["interrupted_by"] == "SIGTERM" and not stopped.summary["finished"]
    resumed = train(tiny_model_config(), cfg, resume=True, progress=False)
    reference = train(tiny_model_config(), tiny_train_config(tmp_path / "ref", checkpoint_every=5), progress=False)
    # stopped after the first of two equal epochs
    assert 2 * stopped.summary["steps"] == reference.summary["steps"] == resumed.summary["steps"]
    assert load_checkpoint(tmp_path / "run" / "last.pt")["state"]["step"] == resumed.summary["steps"]
    assert resumed.summary["finished"]
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
    result = train(tiny_model_config(), tiny_train_config(tmp_path / "run", checkpoint_every=5), progress=False)
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) == handler
    assert result.summary["interrupted_by"] == "SIGTERM" and not result.summary["finished"]
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["state"]["step"] == result.summary["steps"] == 10  # signalled while writing the second (every 5)


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

    cfg = tiny_train_config(tmp_path / "run", max_steps=20, checkpoint_every=5)
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
    """Image files that go bad mid-run (an image folder is decoded once at start-up, then again on
    access by a DataLoader worker, which wraps the error in its traceback): the run checkpoints at
    that step boundary and raises one line naming the file."""
    folder = image_folder(tmp_path / "imgs", 40)  # 38 training images: 9 batches of 4
    batches = data_module.DataSplit.batches

    def truncating(self, index_batches):
        for i, batch in enumerate(batches(self, index_batches)):
            if i == 2:  # the worker has read a few batches ahead; it reads the later ones truncated
                for path in folder.iterdir():
                    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            yield batch

    monkeypatch.setattr(data_module.DataSplit, "batches", truncating)
    cfg = tiny_train_config(tmp_path / "run", dataset=str(folder), epochs=1, batch_size=4, init_images=8,
                            num_workers=1)
    with pytest.raises(DatasetError) as info:
        train(GlowConfig(image_shape=(3, 8, 8), n_levels=2, n_steps=1, hidden_channels=8), cfg, progress=False)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message and "worker" not in message, message
    assert message.startswith(f"cannot read image {folder}{os.sep}img") and "truncated" in message, message
    step = int(re.search(r"checkpointed at step (\d+)", message).group(1))
    assert 3 <= step < 9 and f"`resume` {tmp_path / 'run'}" in message
    assert load_checkpoint(tmp_path / "run" / "last.pt")["state"]["step"] == step


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
            assert (out + err).count("resume with: torchglow train --resume") == (p.returncode == 143), err
        summary = json.loads((run / "summary.json").read_text())
        stops.append(summary["steps"])
        assert summary["interrupted_by"] in ("SIGTERM", None)
        assert load_checkpoint(run / "last.pt")["state"]["step"] == summary["steps"]
    p = _launch("train", "--resume", run)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0 and json.loads((run / "summary.json").read_text())["finished"], err
    a, b = load_checkpoint(tmp_path / "ref" / "last.pt"), load_checkpoint(run / "last.pt")
    assert a["state"]["step"] == b["state"]["step"] == json.loads((tmp_path / "ref" / "summary.json").read_text())["steps"]
    for key in ("model", "ema"):
        for name, v in a[key].items():
            torch.testing.assert_close(b[key][name], v, atol=1e-6, rtol=0, msg=f"{key}.{name} (stops at {stops})")
    print(f"stopped at steps {stops}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from torchglow import distributed

    try:
        result = train(tiny_model_config(dropout=0.0), tiny_train_config(out, epochs=1, max_steps=8), progress=False)
        torch.save(result.model.state_dict(), os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        distributed.teardown()


@pytest.mark.slow  # two spawned processes that each import torch
def test_ddp_two_processes_match_single_process(tmp_path):
    """2 processes on gloo: ActNorm init and parameters identical on both ranks after several steps,
    and equal to one process with the same global batch."""
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "ddp"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert state_dicts_equal(r0, r1)
    # no dropout: each rank draws its own masks, so only a deterministic model can match one process
    single = train(tiny_model_config(dropout=0.0), tiny_train_config(tmp_path / "single", epochs=1, max_steps=8),
                   progress=False)
    for k, v in single.model.state_dict().items():
        torch.testing.assert_close(r0[k], v, atol=2e-5, rtol=1e-4, msg=k)


def test_weight_decay_is_decoupled(tmp_path):
    """One step with decay differs from one without by exactly -lr·wd·(initial weights): the decay
    is applied to the weights, not added to the gradient that Adamax normalises."""
    runs = {wd: train(tiny_model_config(), tiny_train_config(tmp_path / f"wd{wd}", max_steps=1, weight_decay=wd),
                      progress=False) for wd in (0.0, 0.5)}
    init = Glow.from_pretrained(tmp_path / "wd0.0" / "init").state_dict()
    lr = 1e-3 * 32 / 500  # first step of the linear warm-up
    plain, decayed = runs[0.0].model.state_dict(), runs[0.5].model.state_dict()
    for name, p in runs[0.0].model.named_parameters():
        torch.testing.assert_close(decayed[name] - plain[name], -lr * 0.5 * init[name], atol=1e-7, rtol=1e-5)


@pytest.mark.slow
def test_fast_training_matches_eager(tmp_path):
    """--fast (regional torch.compile, inductor on CPU) takes the same steps as eager execution."""
    # no dropout: inductor draws its masks with its own RNG
    results = {c: train(tiny_model_config(dropout=0.0),
                        tiny_train_config(tmp_path / str(c), epochs=1, max_steps=2, fast=c),
                        progress=False) for c in (False, True)}
    eager, compiled = results[False].model.state_dict(), results[True].model.state_dict()
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-5, atol=1e-6)


def test_train_preset():
    cfg = train_preset("digits", epochs=3)
    assert (cfg.dataset, cfg.epochs, cfg.lr, cfg.weight_decay) == ("digits", 3, 2e-3, 0.3)
    with pytest.raises(ConfigError, match="unknown preset"):
        train_preset("cifar100")


# ---------------------------------------------------------------- run folders, totals, the end of a run
def test_out_holding_a_run_is_refused_unless_overwrite(tmp_path):
    cfg = tiny_train_config(tmp_path / "r", max_steps=2)
    train(tiny_model_config(), cfg, progress=False)
    best = (tmp_path / "r" / "best.pt").stat().st_mtime_ns
    with pytest.raises(ConfigError, match=r"already holds a run: continue it with `resume` .*another `out`.*`overwrite`"):
        train(tiny_model_config(), cfg, progress=False)
    assert (tmp_path / "r" / "best.pt").stat().st_mtime_ns == best  # nothing touched
    result = train(tiny_model_config(), dataclasses.replace(cfg, overwrite=True, max_steps=1), progress=False)
    lines = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert result.summary["steps"] == 1 and max(r["step"] for r in lines) == 1  # only the new run's lines


def test_max_steps_mid_epoch_scores_against_the_best(tmp_path, capsys):
    """A run stopped by max_steps inside its second epoch: the final evaluation is an epoch line,
    logged with the fractional epoch, and best.pt holds the better of the two scores."""
    result = train(tiny_model_config(), tiny_train_config(tmp_path / "m", max_steps=60), progress=False)
    err = capsys.readouterr().err
    assert "step 60 (epoch 1.30): test" in err
    tested = [json.loads(line) for line in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()
              if "test_bpd" in line]
    assert [(r["step"], r["epoch"]) for r in tested] == [(46, 1), (60, 1.3043)]
    best = min(r["test_bpd"] for r in tested)
    assert result.summary["best_test_bpd"] == best and result.summary["test_bpd"] == tested[-1]["test_bpd"]
    assert load_checkpoint(tmp_path / "m" / "best.pt")["state"]["best_bpd"] == best


def test_resume_of_a_finished_run_says_so_and_keeps_totals(tmp_path, capsys):
    cfg = tiny_train_config(tmp_path / "f", epochs=1, max_steps=5)
    first = train(tiny_model_config(), cfg, progress=False).summary
    capsys.readouterr()
    again = train(tiny_model_config(), cfg, resume=True, progress=False).summary
    assert f"{tmp_path / 'f'} is finished" in capsys.readouterr().err
    assert again["steps"] == first["steps"] == 5 and again["test_bpd"] == first["test_bpd"]
    assert again["wall_time_s"] >= first["wall_time_s"]
    longer = train(tiny_model_config(), dataclasses.replace(cfg, max_steps=8), resume=True, progress=False).summary
    assert longer["steps"] == 8 and longer["wall_time_s"] > first["wall_time_s"]


def test_ctrl_c_exits_130_with_the_resume_command(tmp_path, capsys, monkeypatch):
    from torchglow.cli import app as cli
    from torchglow.train.step import TrainStep

    call = TrainStep.__call__

    def interrupt_at_step_3(self, x, y=None):
        out = call(self, x, y)
        if int(self.counters["steps"]) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(TrainStep, "__call__", interrupt_at_step_3)
    run = tmp_path / "c"
    rc = cli.main(["train", "--n-steps", "2", "--hidden-channels", "16", "--epochs", "1", "--batch-size", "32",
                   "--init-images", "64", "--device", "cpu", "--num-workers", "0", "--out", str(run)])
    assert rc == 130
    captured = capsys.readouterr()
    assert (captured.out + captured.err).count(f"resume with: torchglow train --resume {run}") == 1
    assert load_checkpoint(run / "last.pt")["state"]["step"] == 3


# ---------------------------------------------------------------- paths of the step inside training
def test_fp16_training_path(tmp_path):
    """fp16 coupling networks with the device loss scale: the run finishes with finite weights, and
    the scale left its initial 2**16 only by halving on overflow or doubling after 2000 steps."""
    result = train(tiny_model_config(), tiny_train_config(tmp_path / "h", epochs=1, max_steps=10, precision="fp16"),
                   progress=False)
    assert result.summary["finished"] and all(torch.isfinite(p).all() for p in result.model.parameters())
    scale = load_checkpoint(tmp_path / "h" / "last.pt")["trainer"]["counters"]["loss_scale"].item()
    assert math.log2(scale) == int(math.log2(scale)) and scale <= 2.0**16


def test_init_from_starts_from_the_trained_weights(tmp_path):
    train(tiny_model_config(), tiny_train_config(tmp_path / "a", epochs=1, max_steps=5), progress=False)
    train(tiny_model_config(), tiny_train_config(tmp_path / "b", epochs=1, max_steps=1,
                                                 init_from=str(tmp_path / "a")), progress=False)
    source = load_checkpoint(tmp_path / "a" / "best.pt")["model"]
    assert state_dicts_equal(Glow.from_pretrained(tmp_path / "b" / "init").state_dict(), source)


def test_augmentation_inside_training_is_seeded(tmp_path):
    runs = [train(tiny_model_config(), tiny_train_config(tmp_path / name, epochs=1, max_steps=3, **aug),
                  progress=False).model.state_dict()
            for name, aug in (("a1", dict(augment_shift=1, augment_flip=True)),
                              ("a2", dict(augment_shift=1, augment_flip=True)), ("plain", {}))]
    assert state_dicts_equal(runs[0], runs[1]) and not state_dicts_equal(runs[0], runs[2])


def test_eval_draws_average_seeded_draws():
    from torchglow.tools.evaluate import evaluate_bpd
    from torchglow.noise import mix_seed

    model = Glow(tiny_model_config()).eval()
    x = torch.randint(0, 129, (10, 1, 8, 8), dtype=torch.uint8)
    by_hand = [model.bits_per_dim(x, generator=torch.Generator().manual_seed(mix_seed(3, d, 0))).mean().item()
               for d in range(3)]
    assert evaluate_bpd(model, x, batch_size=4, n_draws=3, seed=3) == pytest.approx(sum(by_hand) / 3, rel=1e-6)
    assert evaluate_bpd(model, x, batch_size=4, n_draws=1, seed=3) == pytest.approx(by_hand[0], rel=1e-6)


def test_summary_text_says_which_weights_and_counts_in_words(tmp_path):
    """One epoch and one step in the singular; the closing lines name the weights that were scored."""
    summary = {"run": "runs/r", "interrupted_by": None, "test_bpd": 3.5, "best_test_bpd": 3.4, "baseline_bpd": 4.0,
               "epochs": 1, "steps": 1, "wall_time_s": 6.0, "evaluated_with": "ema", "ema_decay": 0.999,
               "samples": None}
    text = text_module.summary_text(summary)
    assert "after 1 epoch, 1 step, 0.1 min; scored with the EMA of the weights (decay 0.999, with warm-up)" in text
    raw = text_module.summary_text({**summary, "epochs": 2, "steps": 3, "evaluated_with": "weights",
                                     "ema_decay": None})
    assert "after 2 epochs, 3 steps" in raw and "scored with the raw weights (no EMA)" in raw
    assert text_module.summary_text({**summary, "interrupted_by": "SIGINT"}) == ""  # finish printed the line
    assert [text_module.plural(n, "step") for n in (0, 1, 2)] == ["0 steps", "1 step", "2 steps"]
    assert text_module.plural(1497, "class", "classes") == "1,497 classes"


def test_a_run_starts_with_one_line_about_its_data(capsys, tmp_path):
    """A run of one step per epoch: the data line first, then the run line in the singular."""
    train(tiny_model_config(), tiny_train_config(tmp_path / "r", epochs=1, max_steps=1, batch_size=1024,
                                                 init_images=64, eval_batch_size=300),
          progress=False, defaults="defaults: as given")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == ("torchglow train: data digits: 1x8x8 images at 5 bits, 10 classes: 0, 1, 2, 3, 4, 5, 6, 7, 8, "
                        "9; 1,497 train / 300 test images; defaults: as given")
    assert lines[1].endswith("(1,497 training images, 1 step per epoch, 1 epoch)")
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["evaluated_with"] == "ema" and summary["ema_decay"] is not None
