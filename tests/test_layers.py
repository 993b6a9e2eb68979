import math

import pytest
import torch
import torch.nn.functional as F

from torchglow.fold import fold_networks, fold_steps, inverse_weights
from torchglow.layers import ActNorm, Coupling, FlowStep, InvConv1x1, Permute, initializing, squeeze2d, unsqueeze2d
from torchglow.networks import ConvActNorm, ZeroConv2d

from flow_checks import (assert_invertible, assert_logdet_matches_jacobian, jacobian_logabsdet, perturb, unfolded_step,
                         unfolded_step_inverse)

LAYERS = {
    "actnorm": lambda c: ActNorm(c),
    "invconv": lambda c: InvConv1x1(c, lu=False),
    "invconv_lu": lambda c: InvConv1x1(c, lu=True),
    "reverse": lambda c: Permute(c, "reverse"),
    "shuffle": lambda c: Permute(c, "shuffle"),
    "coupling_affine": lambda c: Coupling(c, 8, affine=True),
    "coupling_additive": lambda c: Coupling(c, 8, affine=False),
    "flowstep_affine_lu": lambda c: FlowStep(c, 8, "affine", "invconv", lu=True),
    "flowstep_additive_shuffle": lambda c: FlowStep(c, 8, "additive", "shuffle"),
    "flowstep_affine_reverse_odd": lambda c: FlowStep(c + 1, 8, "affine", "reverse"),
}


def make(name, channels=4, dtype=torch.float64):
    layer = LAYERS[name](channels).to(dtype)
    perturb(layer)
    return layer


def channels_of(layer):
    return next(m for m in layer.modules() if isinstance(m, (ActNorm, InvConv1x1, Permute, Coupling)))


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"])
def test_inverse(name, dtype, rtol):
    layer = make(name, dtype=dtype)
    c = 5 if name.endswith("_odd") else 4
    assert_invertible(layer, torch.randn(3, c, 6, 6, dtype=dtype), rtol)


@pytest.mark.parametrize("name", list(LAYERS))
def test_logdet_matches_jacobian(name):
    layer = make(name)
    c = 5 if name.endswith("_odd") else 4
    assert_logdet_matches_jacobian(layer, torch.randn(2, c, 3, 3, dtype=torch.float64))


def test_squeeze_inverse_and_official_channel_order():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float64).reshape(2, 3, 4, 6)
    y = squeeze2d(x)
    assert y.shape == (2, 12, 2, 3)
    # official squeeze2d (NHWC): channel c*4 + 2i + j holds pixel (2h+i, 2w+j) of channel c
    for c in range(3):
        for i in range(2):
            for j in range(2):
                torch.testing.assert_close(y[:, c * 4 + 2 * i + j], x[:, c, i::2, j::2])
    assert torch.equal(unsqueeze2d(y), x)


def test_actnorm_data_dependent_init():
    layer = ActNorm(3)
    x = torch.randn(64, 3, 5, 5) * torch.tensor([0.5, 2.0, 7.0])[:, None, None] + torch.tensor([1.0, -3.0, 0.2])[:, None, None]
    assert not bool(layer.initialized)
    with initializing(layer):
        y, _ = layer(x)
    assert bool(layer.initialized)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    # outside the context and once initialised, data never changes the parameters again
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with initializing(layer):
        layer(x * 10)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_actnorm_state_dict_carries_initialized():
    layer = ActNorm(2)
    with initializing(layer):
        layer(torch.randn(8, 2, 3, 3) * 4)
    fresh = ActNorm(2)
    fresh.load_state_dict(layer.state_dict())
    assert bool(fresh.initialized)
    x = torch.randn(4, 2, 3, 3)
    with initializing(fresh):  # loaded: must not re-initialise
        torch.testing.assert_close(fresh(x)[0], layer(x)[0])


@pytest.mark.parametrize("lu", [True, False], ids=["lu", "plain"])
def test_invconv_starts_as_rotation_and_logdet(lu):
    layer = InvConv1x1(6, lu=lu)
    w = layer.weight_matrix().double()
    torch.testing.assert_close(w @ w.T, torch.eye(6, dtype=torch.float64), atol=1e-5, rtol=0)
    perturb(layer)
    expected = torch.linalg.slogdet(layer.weight_matrix().double())[1]
    torch.testing.assert_close(layer.logabsdet().double(), expected, atol=1e-5, rtol=0)


STEPS = [name for name in LAYERS if name.startswith("flowstep")] + ["flowstep_affine_plain"]
LAYERS["flowstep_affine_plain"] = lambda c: FlowStep(c, 8, "affine", "invconv", lu=False)


@pytest.mark.parametrize("name", STEPS)
def test_folded_step_equals_the_layers_one_after_another(name):
    """ActNorm and the permutation folded into one 1x1 convolution: forward, log-det and inverse
    equal the unfolded formulas to 1e-12 in float64."""
    step = make(name)
    x = torch.randn(3, 5 if name.endswith("_odd") else 4, 6, 6, dtype=torch.float64)
    y, logdet = step(x)
    y_ref, logdet_ref = unfolded_step(step, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logdet, logdet_ref, rtol=1e-12, atol=1e-12)
    for grad in (False, True):  # a fresh inverse when a gradient is wanted, the cached one otherwise
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(step.inverse(y), unfolded_step_inverse(step, y), rtol=1e-12, atol=1e-12)


def test_a_level_folds_its_steps_in_one_batched_product():
    steps = [make("flowstep_affine_lu") for _ in range(3)]
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    for step, (w, b, ld) in zip(steps, fold_steps(steps, x)):
        w1, b1, ld1 = fold_steps([step], x)[0]
        torch.testing.assert_close((w, b, ld), (w1, b1, ld1), rtol=1e-14, atol=1e-14)
    for step, (w, b) in zip(steps, inverse_weights(steps)):
        eye = torch.eye(4, dtype=torch.float64)
        torch.testing.assert_close(w[:, :, 0, 0] @ fold_steps([step], x)[0][0][:, :, 0, 0], eye, rtol=0, atol=1e-12)


@pytest.mark.parametrize("padding", ["zero", "edge"])
def test_a_level_scales_its_coupling_networks_in_one_batched_computation(padding):
    """The K networks' scaled weights computed at once are the ones each layer computes alone, so
    the coupling equals its network run layer by layer, bit for bit."""
    steps = []
    for _ in range(3):
        step = FlowStep(4, 8, "affine", "invconv", padding=padding).double()
        perturb(step)
        steps.append(step)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    for step, net in zip(steps, fold_networks(steps)):
        first, _, hidden, _, _, last = step.coupling.nn
        expected = []
        for layer, logs, bias in ((first, first.actnorm.logs, first.actnorm.bias),
                                  (hidden, hidden.actnorm.logs, hidden.actnorm.bias), (last, last.logs, last.conv.bias)):
            scale = torch.exp(logs * 3).reshape(-1)
            expected += [layer.conv.weight * scale[:, None, None, None], bias.reshape(-1) * scale]
        for got, want in zip(net, expected):
            assert torch.equal(got, want)
        assert torch.equal(step.coupling(x, net)[0], step.coupling(x, None)[0])


def test_inverse_cache_is_refreshed_in_place_when_the_weights_change():
    """Without grad the inverse reads the cached buffers; an in-place update (an optimiser step)
    makes them stale, and the refresh writes the new inverse into the same storage."""
    step = make("flowstep_affine_lu", dtype=torch.float32).eval()
    x = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        step.inverse(step(x)[0])
        pointers = step.inverse_weight.data_ptr(), step.inverse_bias.data_ptr()
        step.actnorm.logs.add_(0.2)
        step.permute.log_s.add_(0.3)  # in-place updates, as an optimiser's
        y, _ = step(x)
        torch.testing.assert_close(step.inverse(y), x, rtol=0, atol=1e-5)  # refreshed by itself
        step.permute.lower.add_(0.1)
        step.refresh_inverse()
        assert (step.inverse_weight.data_ptr(), step.inverse_bias.data_ptr()) == pointers
        cached = step.inverse_weight.clone()
    fresh = fold_steps([step], x)[0][0].detach()  # the forward weight, with grad: no cache involved
    product = cached[:, :, 0, 0].double() @ fresh[:, :, 0, 0].double()
    torch.testing.assert_close(product, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-5)
    assert "inverse_weight" not in step.state_dict()


def test_one_by_one_convolutions_stay_float32_under_bf16_autocast():
    step = make("flowstep_affine_lu", dtype=torch.float32)
    conv = make("invconv_lu", dtype=torch.float32)
    x = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        expected = conv(x)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = conv(x)[0]
            w, b, _ = fold_steps([step], x)[0]
            y, _ = step(x)
            x_rec = step.inverse(y)
    assert got.dtype == w.dtype == b.dtype == torch.float32
    assert torch.equal(got, expected)
    assert (x_rec - x).abs().max() < 1e-5  # the coupling network ran in bf16 both ways


@pytest.mark.parametrize("name", ["invconv", "invconv_lu", "shuffle"])
def test_save_load_restores_the_layer(name):
    """A fresh layer (another random rotation or permutation) becomes the saved one: forward,
    log-det and inverse, everything from the state_dict."""
    saved, fresh = make(name, dtype=torch.float32), LAYERS[name](4)
    x = torch.randn(2, 4, 3, 3)
    assert not torch.allclose(fresh(x)[0], saved(x)[0])
    fresh.load_state_dict(saved.state_dict())
    with torch.no_grad():
        for a, b in zip(fresh(x), saved(x)):
            assert torch.equal(a, b)
        assert torch.equal(fresh.inverse(x), saved.inverse(x))


@pytest.mark.parametrize("affine", [False, True], ids=["additive", "affine"])
def test_coupling_starts_as_identity_up_to_the_initial_scale(affine):
    """The zero-initialised last layer gives h = 0: additive is the identity; affine scales x_b
    by sigmoid(0 + 2) = 0.8808, a log-det of (C/2)·H·W·log(0.8808) per sample."""
    layer = Coupling(4, 8, affine=affine)
    x = torch.randn(2, 4, 3, 3)
    y, logdet = layer(x)
    scale = 1 / (1 + math.exp(-2.0)) if affine else 1.0
    torch.testing.assert_close(y, torch.cat([x[:, :2], x[:, 2:] * scale], 1))
    torch.testing.assert_close(logdet, torch.full((2,), 2 * 9 * math.log(scale)))


def test_zero_conv_folds_its_scale_into_the_weights():
    """(conv(x, W) + b)·exp(3·logs) computed as conv(x, W·s) + b·s, and zero at initialisation."""
    layer = ZeroConv2d(3, 5).double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    assert torch.equal(layer(x), torch.zeros(2, 5, 4, 4, dtype=torch.float64))
    perturb(layer)
    unfused = layer.conv(x) * torch.exp(3 * layer.logs)
    torch.testing.assert_close(layer(x), unfused, rtol=1e-12, atol=1e-12)


def test_conv_actnorm_folds_the_actnorm_into_the_convolution():
    layer = ConvActNorm(3, 6, 3).double()
    x = torch.randn(8, 3, 5, 5, dtype=torch.float64)
    with initializing(layer):  # the data-dependent init sees the raw convolution output
        h = layer(x)
    torch.testing.assert_close(h.mean(dim=(0, 2, 3)), torch.zeros(6, dtype=torch.float64), atol=1e-9, rtol=0)
    perturb(layer)
    unfused = layer.actnorm(F.conv2d(x, layer.conv.weight, padding=1))[0]
    torch.testing.assert_close(layer(x), unfused, rtol=1e-12, atol=1e-12)


def test_coupling_bf16_network_keeps_float32_logdet():
    layer = Coupling(4, 8, affine=True)
    perturb(layer)
    layer.autocast_dtype = torch.bfloat16
    x = torch.randn(2, 4, 3, 3)
    y, logdet = layer(x)
    assert y.dtype == torch.float32 and logdet.dtype == torch.float32
    torch.testing.assert_close(layer.inverse(y), x, atol=1e-5, rtol=0)


def test_coupling_dropout_acts_in_training_only():
    """With dropout the coupling is exact in eval mode; in training mode each drawn mask gives a
    different, still invertible flow whose log-det matches its Jacobian."""
    layer = Coupling(4, 8, affine=True, dropout=0.5).double()
    perturb(layer)
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    layer.eval()
    assert_invertible(layer, x, 1e-10)
    assert_logdet_matches_jacobian(layer, x[:2, :, :3, :3])

    layer.train()
    y1, _ = layer(x)
    y2, _ = layer(x)
    assert not torch.allclose(y1, y2)

    def with_mask(v):
        torch.manual_seed(7)
        return layer(v)

    x1 = x[:1, :, :3, :3]
    _, logdet = with_mask(x1)
    torch.testing.assert_close(logdet, jacobian_logabsdet(lambda v: with_mask(v)[0], x1), atol=1e-8, rtol=1e-9)
