"""Tests that need a CUDA GPU (skipped without one). Each helper's tests sit under their own heading."""

import copy

import pytest
import torch

from torchglow import Glow
from torchglow import preprocess as pp
from torchglow.config import GlowConfig, TrainConfig
from torchglow.step import GraphedStep, TrainStep, compile_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ---------------------------------------------------------------- the training step as one CUDA graph
@pytest.fixture
def deterministic_kernels():
    """cuDNN's deterministic algorithms: the plain and the graphed step then run the same kernels
    with the same reduction order (a graph replays exactly the kernels it captured)."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def cuda_step(precision="fp32", **train_overrides):
    """A small class-conditional model on the GPU, ActNorm initialised, its TrainStep (channels_last
    activations, as compile_step sets on CUDA) and a batch of 8."""
    torch.manual_seed(0)
    config = GlowConfig(image_shape=(3, 8, 8), n_levels=2, n_steps=2, hidden_channels=16, n_bits=5, num_classes=3)
    model = Glow(config).cuda()
    if precision != "fp32":
        model.set_autocast(torch.bfloat16 if precision == "bf16" else torch.float16)
    g = torch.Generator().manual_seed(0)
    x_uint8 = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8, generator=g).cuda()
    y = torch.randint(0, 3, (8,), generator=g).cuda()
    model.initialize(pp.dequantize(pp.preprocess(x_uint8, 5), 5), y)
    cfg = TrainConfig(batch_size=8, lr=1e-3, warmup_images=16, grad_clip=1.0, weight_decay=0.1, log_every=4,
                      precision=precision, **train_overrides)
    step = TrainStep(model, cfg, beta2=0.99, ema=copy.deepcopy(model).requires_grad_(False), ema_decay=0.99)
    step.channels_last = True
    return step, x_uint8, y


def cuda_state(step):
    return [t.clone() for t in (step.flat, step.ema_flat, step.exp_avg, step.exp_avg2, step.skipped_flags,
                                *step.counters.values())]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_graphed_step_equals_the_plain_step(deterministic_kernels, precision):
    """compile_step(..., "graph") on CUDA is a GraphedStep that captures; over steps with a partial
    batch (its own graph) its outputs and state are the plain step's, bit for bit."""
    plain, x_uint8, y = cuda_step(precision)
    step, _, _ = cuda_step(precision)
    graphed = compile_step(step, "graph")
    assert isinstance(graphed, GraphedStep) and graphed.capture
    for i, (x, labels) in enumerate([(x_uint8, y), (x_uint8.flip(0), y.flip(0)), (x_uint8[:5], y[:5]),
                                     (x_uint8, y), (x_uint8[:5], y[:5])]):
        a, b = plain(x, labels), graphed(x, labels)
        for k in a:
            assert torch.equal(a[k], b[k]), (i, k, (a[k].float() - b[k].float()).abs().max().item())
    for p, q in zip(cuda_state(plain), cuda_state(step)):
        assert torch.equal(p, q)
    assert len(graphed.entries) == 2 and graphed.captured, graphed.failure
    assert plain.read_counters() == step.read_counters()


def test_graphed_step_resumes_in_place(deterministic_kernels):
    """A state loaded into a captured step (resume, or the trainer's restore of last.pt) is copied
    into the captured tensors: the replayed steps repeat the original ones bit for bit."""
    step, x_uint8, y = cuda_step("bf16")
    graphed = compile_step(step, "graph")
    for _ in range(2):
        graphed(x_uint8, y)
    assert graphed.captured, graphed.failure
    saved = (copy.deepcopy(step.model.state_dict()), copy.deepcopy(step.ema.state_dict()),
             copy.deepcopy(step.state_dict()))
    first = [{k: v.clone() for k, v in graphed(x_uint8, y).items()} for _ in range(2)]
    after = cuda_state(step)
    step.model.load_state_dict(saved[0])
    step.ema.load_state_dict(saved[1])
    step.load_state_dict(saved[2], "test")
    second = [{k: v.clone() for k, v in graphed(x_uint8, y).items()} for _ in range(2)]
    for a, b in zip(first, second):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    for p, q in zip(after, cuda_state(step)):
        assert torch.equal(p, q)


def test_graphed_step_skips_a_non_finite_step(deterministic_kernels):
    """An infinite loss scale, set in place, makes the gradient non-finite: the captured step's
    mask leaves weights, moments and EMA unchanged and counts the skip, as the plain step does."""
    step, x_uint8, y = cuda_step()
    graphed = compile_step(step, "graph")
    graphed(x_uint8, y)
    assert graphed.captured, graphed.failure
    before = cuda_state(step)[:4]
    step.counters["loss_scale"].fill_(float("inf"))
    out = graphed(x_uint8, y)
    assert not out["finite"].item()
    for p, q in zip(before, cuda_state(step)[:4]):
        assert torch.equal(p, q)
    step.counters["loss_scale"].fill_(1.0)
    assert graphed(x_uint8, y)["finite"].item()
    c = step.read_counters()
    assert (c["steps"], c["skipped"], c["skipped_offsets"]) == (3, 1, [1])


def test_regional_compile_inside_the_graph():
    """compile_step(..., "regional") on CUDA: inductor's flow-step kernels inside one CUDA graph,
    equal to the plain step up to float rounding (inductor fuses differently)."""
    torch._dynamo.reset()
    plain, x_uint8, y = cuda_step("bf16")
    step, _, _ = cuda_step("bf16")
    graphed = compile_step(step, "regional")
    assert isinstance(graphed, GraphedStep)
    graphed(x_uint8, y)
    plain(x_uint8, y)
    assert graphed.captured, graphed.failure
    for _ in range(2):
        a, b = plain(x_uint8, y), graphed(x_uint8, y)
        torch.testing.assert_close(b["loss"], a["loss"], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(step.flat, plain.flat, atol=1e-3, rtol=1e-2)


def test_graphed_step_is_one_graph_launch():
    """bench.count_ops on the captured step: one cudaGraphLaunch, no kernel launched one by one."""
    from torchglow import bench

    step, x_uint8, y = cuda_step("bf16")
    graphed = compile_step(step, "graph")
    graphed(x_uint8, y)
    counts = bench.count_ops(lambda: graphed(x_uint8, y))
    assert counts["graph_launches"] == 1
    assert counts["kernel_launch_calls"] <= 2  # at most the copies of the batch into the static buffers
