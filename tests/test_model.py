import copy
import math
import re
import warnings

import pytest
import torch

from torchglow import PRESETS, Glow, health
from torchglow.layers import squeeze2d, unsqueeze2d
from torchglow.model import gaussian_log_prob

from conftest import VARIANTS, amplifying_model, class_labels, tiny_config, tiny_glow
from flow_checks import jacobian_logabsdet, perturb, unfolded_step, unfolded_step_inverse

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def reference_bits_per_dim(model, x_uint8, y, noise):
    """bits/dim without the model's own scoring path: the 5-bit bins by integer division,
    log p(x) = log N(ε; 0, I) + log|det dε/dx| with the brute-force Jacobian, all on a float64
    CPU copy of the model."""
    ref = copy.deepcopy(model).double().cpu()
    x = (x_uint8.cpu() // 8).double() / 32 - 0.5 + noise.double().cpu() / 32
    d = x[0].numel()
    out = []
    for i in range(x.shape[0]):
        yi = None if y is None else y[i : i + 1].cpu()

        def eps_of(v):
            return torch.cat([e.reshape(1, -1) for e in ref.encode(v, yi, standardized=True)[0]], 1)

        eps = eps_of(x[i : i + 1])
        log_p = (-0.5 * (eps**2).sum() - 0.5 * d * math.log(2 * math.pi)
                 + jacobian_logabsdet(eps_of, x[i : i + 1])[0])
        out.append(-(log_p - d * math.log(32)) / (d * math.log(2)))
    return torch.stack(out).detach()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"])
def test_model_as_a_distribution(variant, dtype, rtol, device):
    """The model in any dtype on any device, with a CPU generator: samples come in the model's
    dtype and device, decode(encode(x)) is exact in eval mode (latents z or standardised ε), and
    bits/dim of uint8 images equal a computation from the change of variables and the
    brute-force Jacobian."""
    model = tiny_glow(variant, dtype, dropout=0.3).to(device).eval()
    y = class_labels(model, 3)
    with torch.no_grad():
        x = model.sample(3, 0.8, y, generator=torch.Generator().manual_seed(0))
        assert (x.dtype, x.device.type, x.shape) == (dtype, device, (3, 1, 4, 4))
        for standardized in (False, True):
            latents, _ = model.encode(x, y, standardized=standardized)
            assert [tuple(z.shape[1:]) for z in latents] == model.latent_shapes
            assert (model.decode(latents, y, standardized) - x).abs().max() / x.abs().max() < rtol

        x_uint8 = torch.randint(0, 256, (3, 1, 4, 4), dtype=torch.uint8)
        bpd = model.bits_per_dim(x_uint8, y, generator=torch.Generator().manual_seed(1))
    assert (bpd.dtype, bpd.device.type) == (dtype, device)
    noise = torch.rand(x_uint8.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    expected = reference_bits_per_dim(model, x_uint8, y, noise)
    torch.testing.assert_close(bpd.cpu().double(), expected, rtol=rtol, atol=0)


def test_sample_draws_from_a_generator_on_any_device():
    """ε comes from the generator on its own device, so a seeded CPU generator gives the same
    samples to a model on the CPU and on the GPU (here: a float64 preset model, the issue's case)."""
    model = Glow.from_preset("digits", n_steps=2, hidden_channels=8).double()
    perturb(model, 0.05)
    x_uint8 = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    on_cpu = model.sample(4, generator=torch.Generator().manual_seed(0))
    bpd_cpu = model.bits_per_dim(x_uint8, generator=torch.Generator().manual_seed(0))
    assert on_cpu.dtype == bpd_cpu.dtype == torch.float64
    if torch.cuda.is_available():
        model.cuda()
        for gen_device in ("cpu", "cuda"):
            g = torch.Generator(device=gen_device).manual_seed(0)
            assert model.sample(4, generator=g).device.type == "cuda"
        on_gpu = model.sample(4, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(on_gpu.cpu(), on_cpu)
        torch.testing.assert_close(model.bits_per_dim(x_uint8, generator=torch.Generator().manual_seed(0)).cpu(),
                                   bpd_cpu)


def test_bijection_runs_without_dropout_in_training_mode():
    """Coupling dropout belongs to the training objective (forward/log_prob in training mode,
    deterministic in eval mode); encode, decode and sample are the bijection and stay exact and
    deterministic in both modes."""
    model = tiny_glow(dropout=0.5)
    assert model.training
    x = torch.rand(4, 1, 4, 4, dtype=torch.float64) - 0.5
    assert not torch.allclose(model.log_prob(x), model.log_prob(x))  # a mask per forward
    with torch.no_grad():
        latents, logdet = model.encode(x)
        assert (model.decode(latents) - x).abs().max() < 1e-10
        eval_latents, eval_logdet = copy.deepcopy(model).eval().encode(x)
    assert all(torch.equal(a, b) for a, b in zip(latents, eval_latents)) and torch.equal(logdet, eval_logdet)
    a, b = (model.sample(3, generator=torch.Generator().manual_seed(0)) for _ in range(2))
    assert torch.equal(a, b)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    torch.testing.assert_close(model.log_prob(x), model.log_prob(x), rtol=0, atol=0)


def test_sample_warns_with_the_count_of_non_finite_values(monkeypatch):
    monkeypatch.setattr(health, "_warned", set())
    model = amplifying_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.isfinite(model.sample(64, temperature=1.0, generator=torch.Generator().manual_seed(0))).all()
    with pytest.warns(health.NumericalHealthWarning) as record:
        x = model.sample(64, temperature=50, generator=torch.Generator().manual_seed(0))
    eps = torch.randn((64, 4, 2, 2), generator=torch.Generator().manual_seed(0))
    n_inf = int((eps.abs() * 50 > 3.4028e38 / math.exp(85)).sum())  # ~41% of N(0, 1) draws
    assert 0 < n_inf == int((~torch.isfinite(x)).sum())
    assert len(record) == 1 and f"{n_inf} of {x.numel()} values are inf/NaN" in str(record[0].message)


@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (2, 1, 8, 8), (1, 4, 4)])
def test_wrong_image_shape_is_a_clear_error(shape):
    model = tiny_glow("affine_lu", torch.float32)
    message = re.escape(f"expected images of shape (B, 1, 4, 4) (config.image_shape), got {shape}")
    for call in (model.log_prob, model.encode, model.initialize):
        with pytest.raises(ValueError, match=message):
            call(torch.zeros(shape))
    with pytest.raises(ValueError, match=re.escape("shapes [(2, 2, 2), (8, 1, 1)] (model.latent_shapes), got [(2, 2, 2), (2, 1, 1)]")):
        model.decode([torch.zeros(2, 2, 2, 2), torch.zeros(2, 2, 1, 1)])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logdet_matches_jacobian(variant):
    model = tiny_glow(variant)
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64) - 0.5
    y = class_labels(model, 2)

    def flat_latents(v):
        latents, _ = model.encode(v, None if y is None else y[:1])
        return torch.cat([z.reshape(1, -1) for z in latents], 1)

    _, logdet = model.encode(x, y)
    torch.testing.assert_close(logdet.detach(), jacobian_logabsdet(flat_latents, x), atol=1e-8, rtol=1e-9)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_log_prob_is_change_of_variables_to_standard_normal(variant):
    """log p(x) = log N(ε; 0, I) + log|det dε/dx| with ε the standardised latents of all levels:
    checks the split priors, the top prior and the flow's log-det together."""
    model = tiny_glow(variant)
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64) - 0.5
    y = class_labels(model, 2)

    for i in range(2):
        yi = None if y is None else y[i : i + 1]

        def eps_of(v):
            return torch.cat([e.reshape(1, -1) for e in model.encode(v, yi, standardized=True)[0]], 1)

        eps = eps_of(x[i : i + 1])
        d = eps.numel()
        expected = -0.5 * (eps**2).sum() - 0.5 * d * math.log(2 * math.pi) + jacobian_logabsdet(eps_of, x[i : i + 1])[0]
        torch.testing.assert_close(model.log_prob(x[i : i + 1], yi)[0].detach(), expected.detach(), atol=1e-8, rtol=1e-9)


def test_initialize_normalises_and_is_kept_on_reload(tmp_path):
    model = Glow(tiny_config())
    assert not model.initialized
    x = torch.rand(64, 1, 4, 4) * 0.3 - 0.2
    model.initialize(x)
    assert model.initialized
    first = model.levels[0][0].actnorm
    h = first(squeeze2d(x))[0]
    torch.testing.assert_close(h.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(h.std(dim=(0, 2, 3), unbiased=False), torch.ones(4), atol=1e-3, rtol=0)
    model.save_pretrained(tmp_path)
    loaded = Glow.from_pretrained(tmp_path)
    assert loaded.initialized
    loaded.initialize(x * 5)  # must be a no-op
    torch.testing.assert_close(loaded.log_prob(x), model.log_prob(x))


@pytest.mark.parametrize("variant", ["affine_lu", "affine_plain", "additive_shuffle", "conditional"])
def test_save_load_round_trip(tmp_path, variant):
    model = tiny_glow(variant, torch.float32)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").exists() and (tmp_path / "model.safetensors").exists()
    loaded = Glow.from_pretrained(tmp_path)
    assert loaded.config == model.config
    x = torch.rand(3, 1, 4, 4) - 0.5
    y = class_labels(model, 3)
    assert torch.equal(loaded.log_prob(x, y), model.log_prob(x, y))
    g1, g2 = (torch.Generator().manual_seed(1) for _ in range(2))
    assert torch.equal(loaded.sample(3, 0.8, y, generator=g1), model.sample(3, 0.8, y, generator=g2))


def test_state_dict_keys_of_the_priors_are_the_saved_format():
    """Saved folders and checkpoints are keyed by module attribute names, not class names: the split
    priors' keys are the ones every released folder holds (renaming a class must not change them)."""
    keys = set(Glow(tiny_config(image_shape=(1, 8, 8), n_levels=3, num_classes=2)).state_dict())
    assert {k for k in keys if k.startswith(("splits.", "top."))} == {
        f"splits.{i}.conv.{name}" for i in (0, 1) for name in ("logs", "conv.weight", "conv.bias")
    } | {"top.learned.logs", "top.learned.conv.weight", "top.learned.conv.bias", "top.y_emb.weight", "top.y_emb.bias"}


def test_sample_at_temperature_zero_is_deterministic():
    model = tiny_glow("affine_lu", torch.float32)
    a, b = model.sample(2, temperature=0.0), model.sample(2, temperature=0.0)
    assert torch.equal(a, b) and torch.equal(a[0], a[1])


def test_sample_uses_temperature_on_every_level():
    model = tiny_glow("affine_lu", torch.float32)
    x = model.sample(8, temperature=0.5, generator=torch.Generator().manual_seed(0))
    eps, _ = model.encode(x, standardized=True)
    expected = [torch.randn((8, *s), generator=g) * 0.5 for g in [torch.Generator().manual_seed(0)] for s in model.latent_shapes]
    for e, ref in zip(eps, expected):
        torch.testing.assert_close(e, ref, atol=1e-4, rtol=1e-4)


def test_conditional_model_needs_labels_and_classifies():
    model = tiny_glow("conditional", torch.float32)
    x = torch.rand(2, 1, 4, 4) - 0.5
    with pytest.raises(ValueError, match="class-conditional"):
        model.log_prob(x)
    out = model(x, torch.tensor([0, 2]))
    assert out.y_logits.shape == (2, 3)
    # the label shifts the prior: the same x gets different densities under different labels
    assert not torch.allclose(model.log_prob(x, torch.tensor([0, 0])), model.log_prob(x, torch.tensor([1, 1])))


# Latent shapes worked out by hand: each level squeezes (C, H, W) -> (4C, H/2, W/2) and, but the
# last, hands half of the channels to its prior; the top latent keeps the rest.
PRESET_LATENTS = {
    "digits": [(2, 4, 4), (8, 2, 2)],
    "mnist": [(2, 16, 16), (4, 8, 8), (16, 4, 4)],
    "cifar10": [(6, 16, 16), (12, 8, 8), (48, 4, 4)],
    "imagenet32": [(6, 16, 16), (12, 8, 8), (48, 4, 4)],
    "imagenet64": [(6, 32, 32), (12, 16, 16), (24, 8, 8), (96, 4, 4)],
    "celeba64": [(6, 32, 32), (12, 16, 16), (24, 8, 8), (96, 4, 4)],
    "celeba256": [(6, 128, 128), (12, 64, 64), (24, 32, 32), (48, 16, 16), (96, 8, 8), (384, 4, 4)],
    "lsun64": [(6, 32, 32), (12, 16, 16), (48, 8, 8)],
    "lsun96": [(6, 48, 48), (12, 24, 24), (24, 12, 12), (48, 6, 6), (192, 3, 3)],
    "lsun128": [(6, 64, 64), (12, 32, 32), (24, 16, 16), (48, 8, 8), (192, 4, 4)],
}
SLOW_PRESETS = {"celeba64", "celeba256", "lsun96", "lsun128"}  # 4 and 10 s to build on one core (celeba256: 237M parameters)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_PRESETS else n
                                  for n in sorted(PRESET_LATENTS)])
def test_presets_build_with_right_shapes(name):
    model = Glow.from_preset(name)
    assert model.latent_shapes == PRESET_LATENTS[name]
    assert (model.device, model.dtype) == (torch.device("cpu"), torch.float32)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_every_preset_has_its_latent_shapes():
    assert sorted(PRESET_LATENTS) == sorted(PRESETS)


def test_digits_preset_initialises_and_samples():
    model = Glow.from_preset("digits")
    model.initialize(torch.rand(16, 1, 8, 8) - 0.5)
    assert model.sample(2).shape == (2, 1, 8, 8)


def test_cifar10_preset_matches_official_size():
    n_zero = sum(p.numel() for p in Glow.from_preset("cifar10", padding="zero").parameters())
    assert 44.0e6 < n_zero < 44.5e6
    # the edge channel adds one input channel to each step's two 3x3 convolutions (512 and 2·C_b
    # outputs, C = 12, 24, 48 by level) and to the split priors' and the top prior's
    edge_weights = 32 * 9 * sum(512 + c for c in (12, 24, 48)) + 9 * (12 + 24) + 9 * 96
    assert sum(p.numel() for p in Glow.from_preset("cifar10").parameters()) == n_zero + edge_weights


def unfolded_encode(model, x, y):
    """(latents, log_prob) with every flow step layer after layer (``unfolded_step``)."""
    z, latents, logdet, log_pz = x, [], 0.0, 0.0
    for i, steps in enumerate(model.levels):
        z = squeeze2d(z)
        for step in steps:
            z, ld = unfolded_step(step, z)
            logdet = logdet + ld
        if i < len(model.splits):
            split = model.splits[i]
            z, z_out = z[:, : split.n_keep], z[:, split.n_keep :]
            log_pz = log_pz + gaussian_log_prob(z_out, *split.prior(z))
            latents.append(z_out)
    log_pz = log_pz + gaussian_log_prob(z, *model.top(x.shape[0], y, x.device, x.dtype))
    return latents + [z], log_pz + logdet


def unfolded_decode(model, latents):
    z = latents[-1]
    for i in reversed(range(len(model.levels))):
        if i < len(model.splits):
            z = torch.cat([z, latents[i]], 1)
        for step in reversed(model.levels[i]):
            z = unfolded_step_inverse(step, z)
        z = unsqueeze2d(z)
    return z


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_folded_flow_equals_the_unfolded_one_on_every_preset_shape(name):
    """ActNorm + 1x1 convolution folded (and batched per level) against the layers one after the
    other, in float64: log-likelihood, latents and decodings to 1e-12. (Perturbed by 0.01: larger
    random perturbations make the 6-level celeba256 flow amplify rounding by 1e10 either way.)"""
    model = Glow.from_preset(name, n_steps=2, hidden_channels=4).double()
    perturb(model, 0.01)
    model.eval()
    x = torch.rand(1, *model.config.image_shape, dtype=torch.float64) - 0.5
    y = torch.zeros(1, dtype=torch.long) if model.config.num_classes else None
    with torch.no_grad():
        latents, log_prob = unfolded_encode(model, x, y)
        got, _ = model.encode(x, y)
        for a, b in zip(got, latents):
            assert_relatively_close(a, b)
        assert_relatively_close(model.log_prob(x, y), log_prob)
        assert_relatively_close(model.decode(latents, y), unfolded_decode(model, latents))


def assert_relatively_close(a, b, rel=1e-12):
    """max |a - b| <= rel · max |b| (relative to the tensor's scale, not element by element)."""
    err = ((a - b).abs().max() / b.abs().max()).item()
    assert err <= rel, f"relative difference {err:.3g} > {rel:g}"


def test_refresh_inverses_in_place_and_decode_equal_to_fresh_inverses():
    """``refresh_inverses`` writes every step's inverse weights into the same storage after the
    weights change; a decode from those caches equals one with inverses computed afresh (the
    grad-enabled path computes them from the parameters)."""
    model = tiny_glow("affine_lu", torch.float64).eval()
    latents = [torch.randn(2, *s, dtype=torch.float64) for s in model.latent_shapes]
    model.refresh_inverses()
    pointers = [(s.inverse_weight.data_ptr(), s.inverse_bias.data_ptr()) for s in model.flow_steps()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # an optimiser step: in place
    model.refresh_inverses()
    assert [(s.inverse_weight.data_ptr(), s.inverse_bias.data_ptr()) for s in model.flow_steps()] == pointers
    with torch.no_grad():
        cached = model.decode(latents)
    fresh = model.decode(latents)  # grad enabled and the parameters require it: no cache
    assert fresh.requires_grad
    assert_relatively_close(cached, fresh.detach())


def test_the_float64_one_by_one_path_of_cuda_on_the_cpu(monkeypatch):
    """On CUDA the folded 1x1 convolutions run in float64 (``linear_dtype``) around float32
    activations; forced here on the CPU: the same log-likelihood, gradients and exact decoding as
    the float32 path, the cached inverses in float64."""
    from torchglow import fold

    model = tiny_glow("affine_lu", torch.float32).eval()
    x = torch.rand(3, *model.config.image_shape) - 0.5

    def score_and_invert():
        model.zero_grad()
        log_prob = model.log_prob(x)
        log_prob.sum().backward()
        with torch.no_grad():
            latents, _ = model.encode(x)
            x_rec = model.decode(latents)
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
        return log_prob.detach(), grads, x_rec

    expected = score_and_invert()
    monkeypatch.setattr(fold, "linear_dtype", lambda t: torch.float64)
    for steps in model.levels:  # forced: the caches follow the parameters' device, which did not change here
        fold.refresh_inverses(steps)
    log_prob, grads, x_rec = score_and_invert()
    assert log_prob.dtype == x_rec.dtype == torch.float32
    assert next(model.flow_steps()).inverse_weight.dtype == torch.float64
    torch.testing.assert_close(log_prob, expected[0], rtol=1e-5, atol=1e-4)
    assert (grads - expected[1]).norm() <= 1e-4 * expected[1].norm()
    assert (x_rec - x).abs().max() / x.abs().max() < 1e-5
