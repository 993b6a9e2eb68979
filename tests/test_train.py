import dataclasses
import json
import math
import os
import signal
import socket

import pytest
import torch
import torch.multiprocessing as mp

from torchglow import Glow, preset
from torchglow.checkpoint import CheckpointError, load_checkpoint
from torchglow import ConfigError
from torchglow.config import TrainConfig, train_preset
from torchglow.train import TrainingError, train


def tiny_model_config(**overrides):
    return preset("digits", **{"n_steps": 2, "hidden_channels": 16, **overrides})


def tiny_train_config(out, **overrides):
    fields = dict(dataset="digits", out=str(out), epochs=2, batch_size=32, eval_batch_size=300,
                  warmup_images=500, init_images=64, log_every=5, device="cpu", num_workers=0,
                  sample_temperatures=(0.0, 1.0))
    fields.update(overrides)
    return TrainConfig(**fields)


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


def test_non_finite_steps_are_skipped(tmp_path, monkeypatch):
    forward = Glow.forward
    calls = {"n": 0}
    poisoned = {3, 7}

    def flaky_forward(self, x, y=None):
        out = forward(self, x, y)
        calls["n"] += 1 if self.training and torch.is_grad_enabled() else 0
        if self.training and torch.is_grad_enabled() and calls["n"] in poisoned:
            return out._replace(log_prob=out.log_prob * float("nan"))
        return out

    monkeypatch.setattr(Glow, "forward", flaky_forward)
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
    with pytest.raises(ConfigError, match=r"already holds a run: continue it with --resume .*another --out.*--overwrite"):
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
    from torchglow import cli
    from torchglow.step import TrainStep

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
    assert f"resume with: torchglow train --resume {run}" in capsys.readouterr().out
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
    from torchglow.evaluate import evaluate_bpd
    from torchglow.step import mix_seed

    model = Glow(tiny_model_config()).eval()
    x = torch.randint(0, 129, (10, 1, 8, 8), dtype=torch.uint8)
    by_hand = [model.bits_per_dim(x, generator=torch.Generator().manual_seed(mix_seed(3, d, 0))).mean().item()
               for d in range(3)]
    assert evaluate_bpd(model, x, batch_size=4, n_draws=3, seed=3) == pytest.approx(sum(by_hand) / 3, rel=1e-6)
    assert evaluate_bpd(model, x, batch_size=4, n_draws=1, seed=3) == pytest.approx(by_hand[0], rel=1e-6)
