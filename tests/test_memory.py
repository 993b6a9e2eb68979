"""Memory-saving backward modes (torchglow.memory): same gradients as standard backprop, less
saved activation memory, and the plain path wherever the ActNorm initialisation or no-grad runs.

Tolerances (relative, Euclidean norm of each parameter's gradient difference over its gradient's
norm): float64 1e-10 (measured ~1e-15 for "invertible", 0 for "checkpoint"); float32 1e-4
(measured <= 4e-7 on these models). "invertible" gradients use reconstructed inputs, so their error
is the flow's own float reconstruction error propagated; "checkpoint" recomputes the same ops.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

from torchglow import ConfigError, Glow, memory, preset
from torchglow.layers import initializing

from conftest import tiny_config
from flow_checks import perturb

MODES = ("checkpoint", "invertible")
VARIANTS = {
    "affine_lu": {},
    "affine_plain": dict(lu=False),
    "additive_shuffle": dict(coupling="additive", permutation="shuffle"),
    "conditional": dict(num_classes=3),
}
RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def make(variant="affine_lu", dtype=torch.float64, **overrides):
    model = Glow(tiny_config(**{**VARIANTS[variant], **overrides})).to(dtype)
    perturb(model)
    return model


def labels(model, n):
    return torch.arange(n) % model.config.num_classes if model.config.num_classes else None


def loss_of(out, y):
    loss = -out.log_prob.mean()
    if out.y_logits is not None:
        loss = loss + F.cross_entropy(out.y_logits, y)
    return loss


def gradients(model, x, y, mode, input_grad=True):
    """(parameter grads by name, input grad, log_prob) of the loss in memory ``mode``."""
    model.set_memory(mode)
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(input_grad)
    out = model(x, y)
    loss_of(out, y).backward()
    model.set_memory("none")
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, x.grad, out.log_prob.detach()


def assert_grads_close(got, ref, rtol):
    assert got.keys() == ref.keys()
    total = torch.cat([g.reshape(-1) for g in ref.values()]).norm()
    for name, r in ref.items():
        err = (got[name] - r).norm()
        assert err <= rtol * (r.norm() + 1e-3 * total), f"{name}: |Δg| = {err:.3g}, |g| = {r.norm():.3g}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_gradients_match_standard_backprop(mode, variant, dtype):
    model = make(variant, dtype)
    x = torch.rand(4, 1, 4, 4, dtype=dtype) - 0.5
    y = labels(model, 4)
    ref, ref_x, ref_logp = gradients(model, x, y, "none")
    got, got_x, logp = gradients(model, x, y, mode)
    assert len(ref) == len(list(model.parameters()))  # every parameter gets a gradient
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=0)  # the forward is unchanged
    assert_grads_close(got, ref, RTOL[dtype])
    assert (got_x - ref_x).norm() <= RTOL[dtype] * ref_x.norm()


@pytest.mark.parametrize("mode", MODES)
def test_gradients_without_input_grad(mode):
    model = make("conditional")
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64) - 0.5
    y = labels(model, 3)
    ref, _, _ = gradients(model, x, y, "none", input_grad=False)
    got, got_x, _ = gradients(model, x, y, mode, input_grad=False)
    assert got_x is None
    assert_grads_close(got, ref, RTOL[torch.float64])


@pytest.mark.parametrize("mode", MODES)
def test_realistic_float32_model_after_data_init(mode):
    """The `digits` preset (K=12, width 64) initialised from data, in float32."""
    model = Glow(preset("digits", dropout=0.0))
    x = (torch.randint(0, 32, (64, 1, 8, 8)) + torch.rand(64, 1, 8, 8)) / 32 - 0.5
    model.initialize(x)
    with torch.no_grad():  # move the zero-initialised coupling outputs off the identity
        for step in model.flow_steps():
            step.coupling.nn[-1].conv.weight.normal_(0, 0.02)
    ref, ref_x, _ = gradients(model, x[:16], None, "none")
    got, got_x, _ = gradients(model, x[:16], None, mode)
    assert_grads_close(got, ref, RTOL[torch.float32])
    assert (got_x - ref_x).norm() <= RTOL[torch.float32] * ref_x.norm()


@pytest.mark.parametrize("mode", MODES)
def test_frozen_parameters_get_no_gradient(mode):
    model = make()
    frozen = [p for name, p in model.named_parameters() if name.startswith("levels.0.1.")]
    for p in frozen:
        p.requires_grad_(False)
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64) - 0.5
    ref, _, _ = gradients(model, x, None, "none")
    got, _, _ = gradients(model, x, None, mode)
    assert all(p.grad is None for p in frozen)
    assert_grads_close(got, ref, RTOL[torch.float64])


def test_invertible_gradients_reach_accumulate_grad_hooks():
    """Parameter gradients are outputs of the Function's backward, not side effects, so the
    per-parameter hooks that DDP and optimisers-in-backward use fire once for each parameter."""
    model = make()
    model.set_memory("invertible")
    fired = {}
    handles = [p.register_post_accumulate_grad_hook(lambda p: fired.__setitem__(id(p), fired.get(id(p), 0) + 1))
               for p in model.parameters()]
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64) - 0.5
    model.log_prob(x).mean().backward()
    for h in handles:
        h.remove()
    assert fired == {id(p): 1 for p in model.parameters()}


def saved_bytes(model, x):
    """Bytes of all tensors that autograd saves for backward during the forward of the loss."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = -model.log_prob(x).mean()
    loss.backward()  # and the graph is usable
    return total


def test_invertible_saved_memory_does_not_grow_with_steps():
    x = torch.rand(8, 1, 8, 8) - 0.5
    saved = {}
    for k in (2, 8):
        model = Glow(tiny_config(image_shape=(1, 8, 8), n_steps=k, hidden_channels=16))
        perturb(model, 0.01)
        for mode in ("none", "invertible"):
            model.set_memory(mode)
            saved[mode, k] = saved_bytes(model, x)
    assert saved["invertible", 8] == saved["invertible", 2]
    assert saved["none", 8] > 3 * saved["none", 2]
    assert saved["invertible", 2] < saved["none", 2] / 2


@pytest.mark.parametrize("mode", MODES)
def test_initialize_runs_the_plain_path(mode):
    x = torch.rand(16, 1, 4, 4) - 0.5
    torch.manual_seed(1)
    ref = Glow(tiny_config())
    ref.initialize(x)
    torch.manual_seed(1)
    model = Glow(tiny_config())
    model.set_memory(mode)
    model.initialize(x)
    assert model.initialized and model.memory_mode == mode
    for (name, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("mode", MODES)
def test_initializing_with_grad_enabled(mode):
    """A training step that initialises on its first forward (grad enabled) uses the plain path
    while the ActNorms are pending, and the memory mode afterwards."""
    x = torch.rand(8, 1, 4, 4, dtype=torch.float64) - 0.5
    models = []
    for m in ("none", mode):
        torch.manual_seed(1)
        model = Glow(tiny_config()).double()
        model.set_memory(m)
        with initializing(model):
            (-model.log_prob(x).mean()).backward()
        assert model.initialized
        models.append(model)
    ref, got = ({n: p.grad for n, p in m.named_parameters()} for m in models)
    assert_grads_close(got, ref, RTOL[torch.float64])
    ref, _, _ = gradients(models[0], x, None, "none")
    got, _, _ = gradients(models[1], x, None, mode)
    assert_grads_close(got, ref, RTOL[torch.float64])


@pytest.mark.parametrize("mode", MODES)
def test_no_grad_evaluation(mode):
    model = make("conditional")
    x = torch.rand(4, 1, 4, 4, dtype=torch.float64) - 0.5
    y = labels(model, 4)
    with torch.no_grad():
        ref = model(x, y)
        model.set_memory(mode)
        out = model(x, y)
    assert not out.log_prob.requires_grad
    for a, b in zip(ref, out):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_invertible_under_coupling_autocast():
    """bfloat16 coupling networks are recomputed in bfloat16: the reconstruction stays accurate
    (the coupling inverse recomputes the same network output from the unchanged half)."""
    model = make("affine_lu", torch.float32)
    model.set_autocast(torch.bfloat16)
    x = torch.rand(4, 1, 4, 4) - 0.5
    ref, ref_x, _ = gradients(model, x, None, "none")
    got, got_x, _ = gradients(model, x, None, "invertible")
    assert_grads_close(got, ref, 1e-3)


def test_invertible_warns_when_reconstruction_is_off(monkeypatch):
    model = make()
    step = model.levels[0][0]
    inverse = step.inverse
    monkeypatch.setattr(step, "inverse", lambda y, *folded: inverse(y, *folded) + 1e-3)
    model.set_memory("invertible")
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64) - 0.5
    with pytest.warns(memory.ReconstructionWarning, match="relative error"):
        model.log_prob(x).mean().backward()
    monkeypatch.setattr(step, "inverse", inverse)
    model.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.log_prob(x).mean().backward()


def test_mode_is_validated():
    model = Glow(tiny_config())
    with pytest.raises(ValueError, match="'none', 'checkpoint', 'invertible'"):
        model.set_memory("reversible")
    assert model.memory_mode == "none"
    model.memory_mode = "bogus"  # set directly: refused at the next forward
    with pytest.raises(ValueError, match="bogus"):
        model.log_prob(torch.rand(2, 1, 4, 4) - 0.5)


def test_checkpoint_with_dropout_replays_the_masks():
    """Gradient checkpointing restores the RNG state for the recomputation, so a model with dropout
    gets the gradients of standard backprop with the same masks; the invertible backward would
    draw new masks and is refused."""
    model = make(dropout=0.3)
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64) * 0.3
    torch.manual_seed(5)
    ref, ref_x, ref_lp = gradients(model, x, None, "none")
    torch.manual_seed(5)
    got, got_x, got_lp = gradients(model, x, None, "checkpoint")
    torch.testing.assert_close(got_lp, ref_lp, rtol=0, atol=0)
    assert_grads_close(got, ref, RTOL[torch.float64])
    torch.testing.assert_close(got_x, ref_x)
    with pytest.raises(ConfigError, match="dropout"):
        model.set_memory("invertible")
