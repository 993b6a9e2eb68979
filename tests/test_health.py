"""Numerical health: the 1x1 convolutions' condition numbers and the coupling scales are measured,
and breakdowns (collapsed scales, overflowing samples) are reported rather than silently produced."""

import math
import warnings

import pytest
import torch

from torchglow import Glow, preset, to_uint8
from torchglow.health import (NumericalHealthWarning, check_samples, coupling_scales, health_record,
                              health_warnings, invconv_condition_numbers, min_coupling_scale, sample_checked)
from torchglow.layers import Coupling, InvConv1x1
from torchglow.tools.sampling import sample_grid

from flow_checks import perturb

pytestmark = pytest.mark.usefixtures("one_thread")


def sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


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
    assert min_coupling_scale(model, x) == pytest.approx(sigmoid(2.0), rel=1e-6)  # zero-init last layer
    collapse_scales(model, -5.0)
    assert min_coupling_scale(model, x) == pytest.approx(sigmoid(-3.0), rel=1e-5)
    collapse_scales(model, -200.0)  # below float32's range, still reported (float64)
    scale = min_coupling_scale(model, x)
    assert scale == pytest.approx(sigmoid(-198.0), rel=1e-5) and len(coupling_scales(model, x)) == 4
    assert any("coupling scale" in w for w in health_warnings(health_record(model, x)))
    model.set_memory("invertible")  # the check uses the plain forward and restores the mode
    assert min_coupling_scale(model, x) == scale and model.memory_mode == "invertible"
    assert min_coupling_scale(Glow(preset("digits", coupling="additive")), x) is None


def test_collapsed_scales_make_sampling_non_finite_and_it_is_reported(tmp_path):
    """The inverse divides by the coupling scales: collapsed scales overflow float32. Glow.sample
    returns the inf/NaN as is; check_samples/sample_checked warn once, to_uint8 maps them to valid
    pixels, sample_grid counts them in its JSON summary."""
    model = Glow(preset("digits", n_steps=2, hidden_channels=8))
    x = torch.rand(8, 1, 8, 8) - 0.5
    model.initialize(x)
    collapse_scales(model, -60.0)  # each inverse multiplies by ~e^58
    samples, stats = sample_checked(model, 4, 1.0, generator=torch.Generator().manual_seed(0))
    assert stats["nonfinite"] == int((~torch.isfinite(samples)).sum()) > 0
    with pytest.warns(NumericalHealthWarning, match="inf/NaN"):
        check_samples(samples, context="test collapsed")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_samples(samples, context="test collapsed")  # once per context
    images = to_uint8(samples, model.config.n_bits)
    assert not (images % 8).any()  # 5-bit levels, stored as level * 8
    assert samples.isnan().any() and not images[samples.isnan()].any()  # NaN shows black
    summary = sample_grid(model, tmp_path, temperatures=[0.0, 1.0], n_per_row=4)
    assert summary["per_temperature"]["1"]["nonfinite"] > 0


def test_high_temperature_overflow_is_reported():
    model = Glow(preset("digits", n_steps=2, hidden_channels=8))
    model.initialize(torch.rand(8, 1, 8, 8) - 0.5)
    perturb(model, 0.02)
    fine, stats_1 = sample_checked(model, 4, 1.0, generator=torch.Generator().manual_seed(0))
    assert stats_1["nonfinite"] == 0 and torch.isfinite(fine).all()
    hot, stats_hot = sample_checked(model, 4, 1e38, generator=torch.Generator().manual_seed(0))
    assert stats_hot["nonfinite"] == int((~torch.isfinite(hot)).sum()) > 0


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
