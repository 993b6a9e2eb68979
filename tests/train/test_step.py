"""The training step (torchglow.train.step): counter-based noise, the optimiser against torch.optim, the
masked update of non-finite steps, the fp16 loss scale, and the fullgraph compile equal to eager."""

import contextlib
import json
import copy
import math

import pytest
import torch

from torchglow import Glow
from torchglow.config import TrainConfig
from torchglow import preprocess as pp
from torchglow.model import FlowOutput
from torchglow.noise import NOISE, counter_uniform, dequantization_noise, mix_seed, rows_of
from torchglow.train.step import GraphedStep, TrainStep, compile_step, graph_blocker, objective

from conftest import tiny_config
from step_checks import assert_resumes_in_place, state_of

pytestmark = pytest.mark.usefixtures("one_thread")


def make_step(model_overrides=None, ema=True, **train_overrides):
    torch.manual_seed(0)
    model = Glow(tiny_config(**(model_overrides or {})))
    x_uint8 = torch.randint(0, 256, (8, *model.config.image_shape), dtype=torch.uint8)
    model.initialize(pp.dequantize(pp.preprocess(x_uint8, model.config.n_bits), model.config.n_bits))
    cfg = TrainConfig(**{"batch_size": 8, "lr": 1e-3, "warmup_images": 0, "log_every": 4, **train_overrides})
    ema_model = copy.deepcopy(model).requires_grad_(False) if ema else None
    return TrainStep(model, cfg, beta2=0.99, ema=ema_model, ema_decay=0.9), x_uint8


def inf_gradient(model):
    """0 with an infinite gradient: d sqrt(u)/du at u = 0."""
    p = next(model.parameters())
    return torch.sqrt((p - p.detach()).sum())


def snapshot(step):
    return [t.clone() for t in (step.flat, step.ema_flat, step.exp_avg, step.exp_avg2)]


# ---------------------------------------------------------------- counter-based noise
def test_counter_uniform_is_a_pure_uniform_function():
    step = torch.tensor(5)
    index = torch.arange(200_000)
    u = counter_uniform(3, NOISE, step, index)
    assert torch.equal(u, counter_uniform(3, NOISE, step.clone(), index.clone()))
    assert u.min() >= 0 and u.max() < 1
    # moments of U(0, 1): mean 1/2, variance 1/12 (standard errors ~6e-4 and ~2e-4)
    assert abs(u.mean().item() - 0.5) < 3e-3 and abs(u.var().item() - 1 / 12) < 1e-3
    # 16 equal bins: chi-square with 15 degrees of freedom stays well below 40 (p < 1e-3)
    counts = torch.bincount((u * 16).long(), minlength=16).double()
    assert ((counts - len(u) / 16) ** 2 / (len(u) / 16)).sum() < 40
    # neighbouring indices, steps and seeds are uncorrelated
    others = [counter_uniform(3, NOISE, step, index + 1), counter_uniform(3, NOISE, step + 1, index),
              counter_uniform(4, NOISE, step, index), counter_uniform(3, NOISE + 1, step, index)]
    for v in others:
        assert abs(torch.corrcoef(torch.stack([u, v]))[0, 1].item()) < 0.01


def test_noise_of_a_process_is_its_rows_of_the_global_batch():
    step = torch.tensor(7)
    full = dequantization_noise(0, NOISE, step, rows_of(8, 0, 1, torch.device("cpu")), (3, 4, 4))
    parts = [dequantization_noise(0, NOISE, step, rows_of(8, r, 2, torch.device("cpu")), (3, 4, 4)) for r in (0, 1)]
    assert torch.equal(full[0::2], parts[0]) and torch.equal(full[1::2], parts[1])


def test_mix_seed():
    assert mix_seed(1, 2) == mix_seed(1, 2) and len({mix_seed(1, 2), mix_seed(2, 1), mix_seed(1, 3)}) == 3


# ---------------------------------------------------------------- the optimiser and EMA
@pytest.mark.parametrize("optimizer", ["adamax", "adam"])
def test_step_matches_torch_optim(optimizer):
    """Three steps against torch.optim's Adamax/Adam, decoupled weight decay by hand and a
    hand-written EMA, on the same inputs."""
    step, x_uint8 = make_step(optimizer=optimizer, weight_decay=0.1, grad_clip=0.5)
    ref = copy.deepcopy(step.model)
    ref_ema = copy.deepcopy(ref).requires_grad_(False)
    opt_cls = torch.optim.Adamax if optimizer == "adamax" else torch.optim.Adam
    opt = opt_cls(ref.parameters(), lr=1e-3, betas=(0.9, 0.99))
    for t in range(3):
        x = step._inputs(x_uint8)
        metrics = step(x_uint8)
        opt.zero_grad()
        loss, _ = objective(ref(x), None, ref.config)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        with torch.no_grad():
            for p in ref.parameters():
                p.mul_(1 - 1e-3 * 0.1)
        opt.step()
        with torch.no_grad():
            for e, p in zip(ref_ema.parameters(), ref.parameters()):
                e.add_((1 - min(0.9, (1 + t) / (10 + t))) * (p - e))  # the EMA's warm-up
        torch.testing.assert_close(metrics["loss"], loss.detach())
        torch.testing.assert_close(metrics["grad_norm"], norm)
    for a, b in zip(step.params, ref.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    for a, b in zip(step.ema.parameters(), ref_ema.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    c = step.read_counters()
    assert (c["steps"], c["images"], c["skipped"], c["bpd_count"]) == (3, 24, 0, 3)


def test_eager_step_makes_no_host_sync():
    """No operator of a step (with augmentation, clipping, weight decay and EMA) reads a device
    value on the host: ``aten::item``/``_local_scalar_dense`` is what a sync costs on a GPU."""
    step, x_uint8 = make_step(augment_shift=1, augment_flip=True, grad_clip=1.0, weight_decay=0.1)
    step(x_uint8)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(x_uint8)
    names = {event.name for event in prof.events()}
    assert "aten::convolution" in names  # the profile saw the step
    assert not names & {"aten::item", "aten::_local_scalar_dense"}


def test_warmup_lr():
    step, x_uint8 = make_step(warmup_images=32)
    lrs = [step(x_uint8)["lr"].item() for _ in range(5)]
    assert lrs == pytest.approx([1e-3 * 8 / 32, 1e-3 * 16 / 32, 1e-3 * 24 / 32, 1e-3, 1e-3])


@pytest.mark.parametrize("poison", ["nan_loss", "inf_grad"])
def test_non_finite_step_changes_nothing_but_counters(monkeypatch, poison):
    step, x_uint8 = make_step()
    step(x_uint8)
    before = snapshot(step)
    forward = Glow.forward

    def poisoned(self, x, y=None):
        out = forward(self, x, y)
        if poison == "nan_loss":
            return out._replace(log_prob=out.log_prob * float("nan"))
        # finite loss, infinite gradient: sqrt'(0) = inf
        return out._replace(log_prob=out.log_prob + inf_gradient(self))

    monkeypatch.setattr(Glow, "forward", poisoned)
    metrics = step(x_uint8)
    assert not metrics["finite"]
    for a, b in zip(snapshot(step), before):
        assert torch.equal(a, b)
    c = step.read_counters()
    assert (c["steps"], c["images"], c["skipped"], c["bad_run"], c["worst_run"]) == (2, 8, 1, 1, 1)
    assert c["skipped_offsets"] == [1]
    monkeypatch.setattr(Glow, "forward", forward)
    assert step(x_uint8)["finite"] and step.read_counters()["bad_run"] == 0


def test_fp16_loss_scale_halves_on_overflow_and_skips_the_update(monkeypatch):
    step, x_uint8 = make_step(precision="fp16")
    assert step.counters["loss_scale"].item() == 2.0**16
    before = snapshot(step)
    forward = Glow.forward
    monkeypatch.setattr(Glow, "forward", lambda self, x, y=None: forward(self, x, y)._replace(
        log_prob=forward(self, x, y).log_prob + inf_gradient(self)))
    assert not step(x_uint8)["finite"]
    for a, b in zip(snapshot(step), before):
        assert torch.equal(a, b)
    c = step.read_counters()
    # an overflow is the scaler's business, not a bad step
    assert c["loss_scale"] == 2.0**15 and c["skipped"] == 0 and c["images"] == 0


def test_class_conditional_objective_by_hand():
    """loss = mean bits/dim + weight_y · CE(logits, y) / ln 2, bits/dim = -(log p - D·log 32)/(D·ln 2)."""
    config = tiny_config(num_classes=3, weight_y=0.5)
    log_prob = torch.tensor([-10.0, -20.0])
    logits = torch.tensor([[0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0]])
    y = torch.tensor([0, 0])
    d = 16
    bpd = [(10.0 + d * math.log(32)) / (d * math.log(2)), (20.0 + d * math.log(32)) / (d * math.log(2))]
    ce_bits = (math.log(3) + math.log(4 / 2)) / 2 / math.log(2)  # -log p(y=0): log 3, then log(4/2)
    out = FlowOutput(log_prob, torch.zeros(2), torch.zeros(2), logits)
    loss, got_bpd = objective(out, y, config)
    torch.testing.assert_close(got_bpd, torch.tensor(bpd))
    assert loss.item() == pytest.approx(sum(bpd) / 2 + 0.5 * ce_bits, rel=1e-6)


def reference_shift_flip(image, dy, dx, flip):
    """Edge-replicating translation by (dy, dx) as pad + crop, then a left-right mirror."""
    h, w = image.shape[-2:]
    padded = torch.nn.functional.pad(image[None], (1, 1, 1, 1), mode="replicate")[0]
    shifted = padded[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
    return shifted.flip(-1) if flip else shifted


def test_augmentation_draws_seeded_shifts_and_flips():
    """Each image is one of the 3 x 3 x 2 shifted/mirrored copies; the draw is a function of
    (seed, step), and the noise is the plain step's."""
    step, x_uint8 = make_step(augment_shift=1, augment_flip=True)
    plain, _ = make_step()
    x = step._inputs(x_uint8)
    assert torch.equal(x, step._inputs(x_uint8))
    noise = plain._inputs(x_uint8) - pp.preprocess(x_uint8, 5)
    augmented = x - noise
    choices = [(dy, dx, f) for dy in (-1, 0, 1) for dx in (-1, 0, 1) for f in (False, True)]
    drawn = []
    for image, target in zip(pp.preprocess(x_uint8, 5), augmented):
        matches = [c for c in choices if torch.allclose(reference_shift_flip(image, *c), target, atol=1e-6)]
        assert matches
        drawn.append(matches[0])
    assert len(set(drawn)) > 1
    step.counters["steps"] += 1
    assert not torch.equal(x, step._inputs(x_uint8))


# ---------------------------------------------------------------- compiled
def test_fullgraph_compile_of_the_whole_step_equals_eager():
    """torch.compile(step, fullgraph=True) -- forward, backward, clipping, masked Adamax, weight
    decay, EMA and the counters in one graph (a graph break would raise) -- takes the same steps
    as eager execution: aot_eager runs the traced graph with eager kernels, so equal to float
    rounding (atol 1e-6). Inductor's fused kernels: the bench and gpu_check."""
    if not hasattr(torch._dynamo.config, "trace_autograd_ops"):
        pytest.skip("torch < 2.11: dynamo cannot trace autograd.grad")
    torch._dynamo.reset()
    overrides = dict(n_levels=1, n_steps=2)
    eager, x_uint8 = make_step(overrides, weight_decay=0.1, grad_clip=1.0, warmup_images=16)
    compiled, _ = make_step(overrides, weight_decay=0.1, grad_clip=1.0, warmup_images=16)
    fast = compile_step(compiled, "whole", backend="aot_eager")
    for _ in range(3):
        a, b = eager(x_uint8), fast(x_uint8)
        torch.testing.assert_close(b["loss"], a["loss"], atol=1e-6, rtol=0)
    for p, q in zip((eager.flat, eager.ema_flat), (compiled.flat, compiled.ema_flat)):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=0)
    got, want = compiled.read_counters(), eager.read_counters()
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == (value if isinstance(value, list) else pytest.approx(value)), key


@pytest.mark.parametrize("memory", ["none", "checkpoint", "invertible"])
def test_regional_compile_equals_eager(memory):
    """Regional compilation (each flow step compiled, reused by the steps of a level; the input
    preparation and the update one graph each) works in every memory mode, the invertible
    backward's autograd Function calling the compiled steps: equal to eager (backend aot_eager;
    inductor's kernels: test_train's --fast test, the bench and gpu_check)."""
    torch._dynamo.reset()
    eager, x_uint8 = make_step(dict(n_levels=1, n_steps=2), memory=memory)
    compiled, _ = make_step(dict(n_levels=1, n_steps=2), memory=memory)
    for s in (eager, compiled):
        s.model.set_memory(memory)
    fast = compile_step(compiled, "regional", backend="aot_eager")
    for _ in range(2):
        a, b = eager(x_uint8), fast(x_uint8)
        torch.testing.assert_close(b["loss"], a["loss"], atol=1e-5, rtol=1e-5)
    for p, q in zip(eager.params, compiled.params):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- the graphed step (static buffers)
def assert_same_state(a, b):
    for p, q in zip(state_of(a), state_of(b)):
        torch.testing.assert_close(q, p, rtol=0, atol=0, equal_nan=True)  # NaN: the skipped step's grad_norm


def test_graphed_step_equals_the_plain_step_bit_for_bit(monkeypatch):
    """GraphedStep's static-buffer logic (warm-up then the state restored in place, batch copied
    into static buffers, outputs as static tensors), run without a CUDA graph: the same bits as the
    plain step over steps that include a non-finite (skipped) one and a partial batch with its own
    buffers; the state keeps its addresses (a captured graph writes to them)."""
    plain, x_uint8 = make_step(grad_clip=1.0, weight_decay=0.1, warmup_images=16)
    graphed_step, _ = make_step(grad_clip=1.0, weight_decay=0.1, warmup_images=16)
    graphed = GraphedStep(graphed_step, capture=False)
    addresses = [t.data_ptr() for t in graphed._state()]
    forward = Glow.forward
    batches = [x_uint8, x_uint8.flip(0), "nan", x_uint8[:5], x_uint8, x_uint8[:5]]
    for i, x in enumerate(batches):
        if isinstance(x, str):  # a step whose loss is NaN
            monkeypatch.setattr(Glow, "forward", lambda self, x, y=None: forward(self, x, y)._replace(
                log_prob=forward(self, x, y).log_prob * float("nan")))
            x = x_uint8
        a, b = plain(x), graphed(x.clone())
        monkeypatch.setattr(Glow, "forward", forward)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, equal_nan=True, msg=f"step {i}, {k}")
        assert_same_state(plain, graphed_step)
    assert len(graphed.entries) == 2  # one per batch shape
    assert [t.data_ptr() for t in graphed._state()] == addresses
    c = graphed_step.read_counters()
    assert c == plain.read_counters()
    assert (c["steps"], c["skipped"], c["images"]) == (6, 1, 8 + 8 + 5 + 8 + 5)


def test_graphed_step_resumes_in_place():
    step, x_uint8 = make_step(warmup_images=16)
    graphed = GraphedStep(step, capture=False)
    for _ in range(2):
        graphed(x_uint8)
    assert_resumes_in_place(step, lambda: graphed(x_uint8))


def test_graph_blockers_and_the_graph_mode_on_cpu(capsys):
    for memory, word in (("invertible", "sync"), ("checkpoint", "RNG")):
        step, _ = make_step(memory=memory)
        assert word in graph_blocker(step)
    step, _ = make_step(dict(dropout=0.1))
    assert "dropout" in graph_blocker(step)
    step, _ = make_step()
    assert graph_blocker(step) is None
    assert compile_step(step, "graph") is step  # the CPU: nothing to capture, the eager step itself
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="compile mode"):
        compile_step(step, "fused")


def test_ema_warm_up_follows_the_steps():
    """d_t = min(decay, (1 + t)/(10 + t)): after 20 steps the EMA is mostly the trained weights;
    after 10,000 steps the decay is the configured 0.999."""
    step, x_uint8 = make_step(lr=1e-2)
    step.ema_decay = 0.999
    init = step.flat.clone()
    for _ in range(20):
        step(x_uint8)
    moved, lag = (step.flat - init).norm(), (step.flat - step.ema_flat).norm()
    assert lag < 0.35 * moved  # without the warm-up the EMA would still be 98% initialisation
    t = torch.tensor([0.0, 19.0, 8990.0, 10_000.0])
    torch.testing.assert_close(step.ema_decay_now(t), torch.tensor([0.1, 20 / 29, 8991 / 9000, 0.999]))


def test_a_failed_capture_runs_the_shape_uncaptured(monkeypatch, capsys):
    """Should CUDA refuse the capture, one line says why and the step runs uncaptured, with the
    plain step's results."""
    plain, x_uint8 = make_step()
    step, _ = make_step()
    graphed = GraphedStep(step, capture=False)

    def refuse(entry):
        graphed.failure = "RuntimeError: operation not permitted when stream is capturing"
        return None

    monkeypatch.setattr(graphed, "_capture", refuse)
    graphed.capture = True  # the capture path, with the warm-up on the CPU's "streams" replaced below
    monkeypatch.setattr(torch.cuda, "Stream", lambda: type("S", (), {"wait_stream": lambda self, s: None})())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: type("S", (), {"wait_stream": lambda self, s: None})())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    for _ in range(2):
        a, b = plain(x_uint8), graphed(x_uint8)
        assert torch.equal(a["loss"], b["loss"])
    assert_same_state(plain, step)
    assert not graphed.captured and "not permitted" in graphed.failure


def test_the_trainer_with_the_graphed_step_resumes_exactly(tmp_path, monkeypatch):
    """``torchglow.train.loop`` with the graphed step (its static-buffer logic; on CUDA compile_step
    returns it captured), logging every 5 steps, stopped after 7 steps and resumed: the weights,
    EMA and logged bits/dim of an uninterrupted plain run, bit for bit."""
    import dataclasses

    from torchglow.train import start as start_module
    from torchglow.train import train
    from torchglow.train.checkpoint import load_checkpoint
    from conftest import tiny_model_config, tiny_train_config

    config = tiny_model_config(dropout=0.0)
    plain = train(config, tiny_train_config(tmp_path / "plain", max_steps=14), progress=False)
    monkeypatch.setattr(start_module, "compile_step", lambda step, mode: GraphedStep(step, capture=False))
    half = tiny_train_config(tmp_path / "graphed", max_steps=7, fast=True)
    train(config, half, progress=False)
    graphed = train(config, dataclasses.replace(half, max_steps=14), resume=True, progress=False)
    assert graphed.summary["steps"] == plain.summary["steps"] == 14
    a, b = (load_checkpoint(tmp_path / name / "last.pt") for name in ("plain", "graphed"))
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    logged = [{r["step"]: r["train_bpd"] for r in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text()
                                                       .splitlines()) if "train_bpd" in r}
              for name in ("plain", "graphed")]
    # the windows that both runs logged whole (the resume at step 7 starts a new one: 8-10)
    assert [logged[0][s] for s in (5, 14)] == [logged[1][s] for s in (5, 14)]


def test_decode_after_flat_updates_uses_current_inverses():
    """The optimiser updates the flat parameter vector, whose views (the parameters) keep version
    counters of their own: the cached 1x1 inverses must still follow (a decode filled them, a step
    changed the weights, the next decode equals one with inverses computed afresh). Before, the
    stale caches made decode(encode(x)) of a trained model inexact and the trainer's sample grids
    decode with the initial inverses."""
    import copy

    from conftest import tiny_glow
    from torchglow.config import TrainConfig

    model = tiny_glow("affine_lu", torch.float32)
    x_uint8 = torch.randint(0, 256, (4, *model.config.image_shape), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(0))
    step = TrainStep(model, TrainConfig(batch_size=4, lr=1e-2, warmup_images=0), beta2=0.999)
    latents = [torch.randn(4, *s) for s in model.latent_shapes]
    with torch.no_grad():
        before = model.decode(latents)  # fills the caches
    step(x_uint8)
    with torch.no_grad():
        after = model.decode(latents)
        fresh = copy.deepcopy(model).decode(latents)
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, fresh, rtol=0, atol=0)
