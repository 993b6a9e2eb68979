"""The official architecture to the letter: edge-padded 3x3 convolutions and linear_zeros class layers.

The reference below is written from openai/glow's tfops.py and model.py (NHWC, the edge channel
concatenated after zero padding, ``conv2d`` + ``actnorm``, ``conv2d_zeros``, ``linear_zeros``,
``split2d_prior``, ``prior``), in plain torch ops on the model's ``state_dict``; it shares no code
with torchglow's layers.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from torchglow import Glow, GlowConfig, preset
from torchglow.layers import Coupling, FlowStep
from torchglow.networks import ConvActNorm, LinearZeros, ZeroConv2d, edge_image

from flow_checks import assert_invertible, assert_logdet_matches_jacobian, perturb

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE = Path(__file__).parent / "fixtures" / "pre_edge_pretrained"


# --------------------------------------------------------------------------- the official formulas
def official_edge_pad(height: int, width: int, filter_size: tuple[int, int]) -> np.ndarray:
    """tfops.py ``add_edge_padding``'s pad channel, (1, H + 2a, W + 2b, 1)."""
    a, b = (filter_size[0] - 1) // 2, (filter_size[1] - 1) // 2
    pad = np.zeros([1, height + 2 * a, width + 2 * b, 1], dtype="float64")
    pad[:, :a, :, 0] = 1.0
    pad[:, -a:, :, 0] = 1.0
    pad[:, :, :b, 0] = 1.0
    pad[:, :, -b:, 0] = 1.0
    return pad


def ref_conv(x, w, b=None):
    """tfops ``conv2d``'s convolution with ``edge_bias=True`` on NHWC ``x``; ``w`` is (out, in, k, k)
    with the edge channel's weights last, as the official ``[k, k, in, out]`` filter."""
    k = w.shape[-1]
    if k > 1:
        a = (k - 1) // 2
        x = F.pad(x, (0, 0, a, a, a, a))  # zeros around H and W of NHWC
        pad = torch.from_numpy(official_edge_pad(x.shape[1] - 2 * a, x.shape[2] - 2 * a, (k, k)))
        x = torch.cat([x, pad.expand(x.shape[0], -1, -1, -1)], 3)
    y = F.conv2d(x.permute(0, 3, 1, 2), w).permute(0, 2, 3, 1)
    return y if b is None else y + b


def ref_actnorm(x, s, p, reverse=False):
    """tfops ``actnorm``: centre then scale, ``logs`` stored divided by logscale_factor 3."""
    bias, logs = s[f"{p}.bias"].reshape(-1), 3 * s[f"{p}.logs"].reshape(-1)
    if reverse:
        return x * torch.exp(-logs) - bias
    return (x + bias) * torch.exp(logs), x.shape[1] * x.shape[2] * logs.sum()


def ref_conv_zeros(x, s, p):
    return ref_conv(x, s[f"{p}.conv.weight"], s[f"{p}.conv.bias"]) * torch.exp(3 * s[f"{p}.logs"].reshape(-1))


def ref_linear_zeros(x, s, p):
    return (x @ s[f"{p}.weight"].T + s[f"{p}.bias"]) * torch.exp(3 * s[f"{p}.logs"])


def ref_f(z1, s, p):
    """model.py ``f``: relu(conv2d 3x3) -> relu(conv2d 1x1) -> conv2d_zeros 3x3."""
    h = torch.relu(ref_actnorm(ref_conv(z1, s[f"{p}.0.conv.weight"]), s, f"{p}.0.actnorm")[0])
    h = torch.relu(ref_actnorm(ref_conv(h, s[f"{p}.2.conv.weight"]), s, f"{p}.2.actnorm")[0])
    return ref_conv_zeros(h, s, f"{p}.5")


def ref_step(z, s, p, affine, reverse=False):
    """model.py ``revnet2d_step``: actnorm, 1x1 conv (our W: y_j = Σ_i W[j, i] x_i), coupling."""
    w = s[f"{p}.permute.weight"]
    n = z.shape[3] // 2
    if not reverse:
        z, logdet = ref_actnorm(z, s, f"{p}.actnorm")
        z = z @ w.T
        logdet = logdet + z.shape[1] * z.shape[2] * torch.linalg.slogdet(w)[1]
        z1, z2 = z[..., :n], z[..., n:]
        h = ref_f(z1, s, f"{p}.coupling.nn")
        if affine:
            scale = torch.sigmoid(h[..., 1::2] + 2.0)
            z2 = (z2 + h[..., 0::2]) * scale
            logdet = logdet + torch.log(scale).sum(dim=(1, 2, 3))
        else:
            z2 = z2 + h
        return torch.cat([z1, z2], 3), logdet
    z1, z2 = z[..., :n], z[..., n:]
    h = ref_f(z1, s, f"{p}.coupling.nn")
    z2 = z2 / torch.sigmoid(h[..., 1::2] + 2.0) - h[..., 0::2] if affine else z2 - h
    z = torch.cat([z1, z2], 3) @ torch.linalg.inv(w).T
    return ref_actnorm(z, s, f"{p}.actnorm", reverse=True)


def ref_squeeze(x):
    """tfops ``squeeze2d`` (NHWC)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, h // 2, w // 2, 4 * c)


def ref_unsqueeze(x):
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, c // 4, 2, 2).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, 2 * h, 2 * w, c // 4)


def ref_logp(z, mean, logs):
    return (-0.5 * (math.log(2 * math.pi) + 2.0 * logs + (z - mean) ** 2 / torch.exp(2.0 * logs))).sum(dim=(1, 2, 3))


def ref_top(s, shape, y_onehot):
    """model.py ``prior``: conv2d_zeros on zeros, plus linear_zeros of the one-hot."""
    h, w, c = shape
    p = ref_conv_zeros(torch.zeros(y_onehot.shape[0], h, w, 2 * c, dtype=torch.float64), s, "top.learned")
    p = p + ref_linear_zeros(y_onehot, s, "top.y_emb")[:, None, None, :]
    return p[..., :c], p[..., c:]


def ref_encode(s, config, x, y):
    """model.py ``_f_loss`` without the data terms: latents (NHWC), log p(x), classifier logits."""
    z, objective, latents = ref_squeeze(x.permute(0, 2, 3, 1)), 0.0, []
    affine = config.coupling == "affine"
    for i in range(config.n_levels):
        for k in range(config.n_steps):
            z, logdet = ref_step(z, s, f"levels.{i}.{k}", affine)
            objective = objective + logdet
        if i < config.n_levels - 1:
            n = z.shape[3] // 2
            z1, z2 = z[..., :n], z[..., n:]
            h = ref_conv_zeros(z1, s, f"splits.{i}.conv")
            objective = objective + ref_logp(z2, h[..., 0::2], h[..., 1::2])
            latents.append(z2)
            z = ref_squeeze(z1)
    y_onehot = F.one_hot(y, config.num_classes).double()
    mean, logs = ref_top(s, z.shape[1:], y_onehot)
    latents.append(z)
    logits = ref_linear_zeros(z.mean(dim=(1, 2)), s, "classifier")
    return latents, objective + ref_logp(z, mean, logs), logits


def ref_decode(s, config, latents):
    affine = config.coupling == "affine"
    z = latents[-1]
    for i in reversed(range(config.n_levels)):
        if i < config.n_levels - 1:
            z = torch.cat([ref_unsqueeze(z), latents[i]], 3)
        for k in reversed(range(config.n_steps)):
            z = ref_step(z, s, f"levels.{i}.{k}", affine, reverse=True)
    return ref_unsqueeze(z).permute(0, 3, 1, 2)


# --------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("size", [(1, 1), (3, 3), (4, 4), (4, 6), (16, 8)])
def test_edge_image_is_the_official_pad_channel(size):
    h, w = size
    edge = edge_image(h, w, 1, torch.device("cpu"), torch.float64)
    official = torch.from_numpy(official_edge_pad(h, w, (3, 3))).permute(0, 3, 1, 2)
    torch.testing.assert_close(edge, official, rtol=0, atol=0)
    assert edge[0, 0, 1:-1, 1:-1].eq(0).all() and edge.sum() == (h + 2) * (w + 2) - h * w  # 0 inside, 1 on the border


def test_edge_channel_only_in_3x3_convolutions():
    """add_edge_padding returns a 1x1 convolution's input unchanged: no extra channel there."""
    assert ConvActNorm(4, 8, 3, edge=True).conv.weight.shape == (8, 5, 3, 3)
    assert ConvActNorm(8, 8, 1, edge=True).conv.weight.shape == (8, 8, 1, 1)
    assert ZeroConv2d(8, 6, edge=True).conv.weight.shape == (6, 9, 3, 3)
    coupling = Coupling(6, 8, padding="edge")
    assert [m.conv.weight.shape[1] for m in coupling.nn if hasattr(m, "conv")] == [4, 8, 9]


def test_edge_convolutions_equal_the_official_concatenation():
    torch.manual_seed(1)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    zero = ZeroConv2d(4, 3, edge=True).double()
    conv = ConvActNorm(4, 3, 3, edge=True).double()
    perturb(zero, 0.3)
    perturb(conv, 0.3)
    s = zero.state_dict()
    nhwc = x.permute(0, 2, 3, 1)
    expected = (ref_conv(nhwc, s["conv.weight"], s["conv.bias"]) * torch.exp(3 * s["logs"].reshape(-1)))
    torch.testing.assert_close(zero(x), expected.permute(0, 3, 1, 2), rtol=0, atol=1e-13)
    s = conv.state_dict()
    expected = ref_actnorm(ref_conv(nhwc, s["conv.weight"]), s, "actnorm")[0]
    torch.testing.assert_close(conv(x), expected.permute(0, 3, 1, 2), rtol=0, atol=1e-13)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "additive"])
def test_edge_coupling_and_step_are_exact_flows(affine):
    torch.manual_seed(2)
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    for layer in (Coupling(6, 8, affine=affine, padding="edge"),
                  FlowStep(6, 8, "affine" if affine else "additive", lu=False, padding="edge")):
        layer = layer.double()
        perturb(layer, 0.2)
        assert_invertible(layer, x, rtol=1e-12)
        assert_logdet_matches_jacobian(layer, x)


def tiny_edge_model(coupling: str) -> Glow:
    torch.manual_seed(3)
    config = GlowConfig(image_shape=(3, 8, 8), n_levels=2, n_steps=2, hidden_channels=8, coupling=coupling,
                        lu=False, num_classes=3, padding="edge", class_layers="linear_zeros")
    model = Glow(config).double()
    perturb(model, 0.05)
    return model.eval()


@pytest.mark.parametrize("coupling", ["affine", "additive"])
def test_edge_model_equals_an_independent_rederivation(coupling):
    model = tiny_edge_model(coupling)
    s = {k: v.detach() for k, v in model.state_dict().items()}
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64) - 0.5
    y = torch.tensor([0, 2])
    ref_latents, ref_log_prob, ref_logits = ref_encode(s, model.config, x, y)
    with torch.no_grad():
        out = model(x, y)
        latents, _ = model.encode(x, y)
        x_dec = model.decode([z.permute(0, 3, 1, 2) for z in ref_latents], y)
    torch.testing.assert_close(out.log_prob, ref_log_prob, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.y_logits, ref_logits, rtol=0, atol=1e-12)
    for ours, ref in zip(latents, ref_latents):
        torch.testing.assert_close(ours, ref.permute(0, 3, 1, 2), rtol=0, atol=1e-12)
    torch.testing.assert_close(x_dec, ref_decode(s, model.config, ref_latents), rtol=0, atol=1e-12)
    torch.testing.assert_close(x_dec, x, rtol=0, atol=1e-12)


def test_edge_model_log_prob_is_exact_against_the_jacobian():
    """log p(x) = log p(z) + log|det dz/dx| with the Jacobian of the whole flow by autograd."""
    model = tiny_edge_model("affine")
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64) - 0.5
    y = torch.tensor([1])

    def flat_latents(v):
        return torch.cat([z.reshape(-1) for z in model.encode(v.reshape(1, 3, 8, 8), y)[0]])

    jac = torch.autograd.functional.jacobian(flat_latents, x.reshape(-1))
    _, logdet = model.encode(x, y)
    torch.testing.assert_close(logdet, torch.linalg.slogdet(jac)[1].reshape(1), rtol=0, atol=1e-10)


def test_learned_top_prior_differs_at_the_border():
    """conv2d_zeros on zeros sees only the edge channel: the border positions get their own mean and
    log-std, the interior ones (3x3 neighbourhood inside the image) one value per channel."""
    torch.manual_seed(4)
    edge, zero = (Glow(preset("digits", n_steps=1, hidden_channels=8, padding=p)) for p in ("edge", "zero"))
    perturb(edge.top, 0.3)
    perturb(zero.top, 0.3)
    c, h, w = edge.latent_shapes[-1]  # (8, 2, 2) for digits: every position is on the border
    assert (h, w) == (2, 2)
    mean, logs = edge.top(1, None, torch.device("cpu"))
    corners = torch.stack([mean[0, :, 0, 0], mean[0, :, 0, -1], mean[0, :, -1, 0], mean[0, :, -1, -1]])
    assert (corners[1:] - corners[0]).abs().amax() > 1e-3  # each corner sees the edge at other places
    mean0, logs0 = zero.top(1, None, torch.device("cpu"))
    assert (mean0 - mean0[:, :, :1, :1]).abs().amax() == 0 and (logs0 - logs0[:, :, :1, :1]).abs().amax() == 0

    big = Glow(GlowConfig(image_shape=(3, 16, 16), n_levels=1, n_steps=1, hidden_channels=8, padding="edge"))
    perturb(big.top, 0.3)
    mean, logs = big.top(1, None, torch.device("cpu"))  # top latent (12, 8, 8)
    for p in (mean, logs):
        inside = p[0, :, 1:-1, 1:-1]
        assert (inside - inside[:, :1, :1]).abs().amax() < 1e-6  # no edge in reach: one value per channel
        assert (p[0, :, 0, 1:-1] - inside[:, :1, 0]).abs().amax() > 1e-3  # the top row differs


def test_linear_zeros_is_the_official_layer():
    layer = LinearZeros(3, 4).double()
    assert all(p.eq(0).all() for p in layer.parameters())
    perturb(layer, 0.5)
    x = torch.randn(5, 3, dtype=torch.float64)
    s = layer.state_dict()
    expected = (x @ s["weight"].T + s["bias"]) * torch.exp(3 * s["logs"])
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-14)


def test_presets_use_the_official_architecture():
    for name in ("cifar10", "imagenet32", "imagenet64", "celeba64", "celeba256", "lsun64", "lsun96", "lsun128"):
        assert (preset(name).padding, preset(name).class_layers) == ("edge", "linear_zeros"), name
    for name in ("digits", "mnist"):
        assert (preset(name).padding, preset(name).class_layers) == ("zero", "linear"), name


def test_config_without_the_new_fields_means_the_old_model():
    """A config dict saved before padding/class_layers existed is the zero-padded, plain-linear model,
    and so is a config built in code without them."""
    old = {k: v for k, v in GlowConfig().to_dict().items() if k not in ("padding", "class_layers")}
    assert GlowConfig.from_dict(old) == GlowConfig()
    assert (GlowConfig().padding, GlowConfig().class_layers) == ("zero", "linear")


def test_pretrained_folder_written_before_the_fields_scores_as_before():
    """tests/fixtures/pre_edge_pretrained was written by the code before this change (commit in
    expected.json) with its float64 scores; it loads as the same model and scores the same."""
    expected = json.loads((FIXTURE / "expected.json").read_text())
    assert "padding" not in json.loads((FIXTURE / "config.json").read_text())
    model = Glow.from_pretrained(FIXTURE).double().eval()
    assert (model.config.padding, model.config.class_layers) == ("zero", "linear")
    x = ((torch.arange(2 * 3 * 8 * 8, dtype=torch.float64) * 37 % 256) / 256 - 0.5).reshape(2, 3, 8, 8)
    with torch.no_grad():
        out = model(x, torch.tensor([0, 2]))
    torch.testing.assert_close(out.log_prob, torch.tensor(expected["log_prob"], dtype=torch.float64),
                               rtol=0, atol=1e-10)
    torch.testing.assert_close(out.y_logits, torch.tensor(expected["y_logits"], dtype=torch.float64),
                               rtol=0, atol=1e-12)


def test_checkpoint_written_before_the_fields_loads_as_before(tmp_path):
    """A training checkpoint whose model_config has no padding/class_layers (as every checkpoint
    written before them) loads the fixture's weights into the same model."""
    from torchglow.train.checkpoint import FORMAT, load_model

    model = Glow.from_pretrained(FIXTURE)
    old = {k: v for k, v in model.config.to_dict().items() if k not in ("padding", "class_layers")}
    torch.save({"format": FORMAT, "model_config": old, "model": model.state_dict()}, tmp_path / "last.pt")
    loaded = load_model(tmp_path / "last.pt").double()
    expected = json.loads((FIXTURE / "expected.json").read_text())
    x = ((torch.arange(2 * 3 * 8 * 8, dtype=torch.float64) * 37 % 256) / 256 - 0.5).reshape(2, 3, 8, 8)
    with torch.no_grad():
        log_prob = loaded.log_prob(x, torch.tensor([0, 2]))
    torch.testing.assert_close(log_prob, torch.tensor(expected["log_prob"], dtype=torch.float64), rtol=0, atol=1e-10)


def test_edge_split_prior_is_split2d_prior():
    """The split prior of an edge model: mean h[0::2], log-std h[1::2] of conv2d_zeros on the kept half."""
    model = tiny_edge_model("affine")
    z_keep = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    mean, logs = model.splits[0].prior(z_keep)
    h = ref_conv_zeros(z_keep.permute(0, 2, 3, 1), model.state_dict(), "splits.0.conv").permute(0, 3, 1, 2)
    torch.testing.assert_close(mean, h[:, 0::2], rtol=0, atol=1e-13)
    torch.testing.assert_close(logs, h[:, 1::2], rtol=0, atol=1e-13)


@pytest.mark.slow  # two compilations (aot_eager): ~5 s each on one core
@pytest.mark.parametrize("mode,memory", [("whole", "none"), ("regional", "invertible")])
def test_compiled_edge_step_equals_eager(mode, memory):
    """The fast path with the edge channel: the compiled training step (backend aot_eager, eager
    kernels) takes the eager step's steps; regional compilation also under the invertible backward."""
    import copy

    from torchglow import preprocess as pp
    from torchglow.config import TrainConfig
    from torchglow.train.step import TrainStep, compile_step

    if mode == "whole" and not hasattr(torch._dynamo.config, "trace_autograd_ops"):
        pytest.skip("torch < 2.11: dynamo cannot trace autograd.grad")
    torch._dynamo.reset()
    steps = []
    for _ in range(2):
        torch.manual_seed(0)
        model = Glow(GlowConfig(image_shape=(1, 8, 8), n_levels=1, n_steps=2, hidden_channels=8, padding="edge"))
        x_uint8 = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
        model.initialize(pp.dequantize(pp.preprocess(x_uint8, 8), 8))
        model.set_memory(memory)
        cfg = TrainConfig(batch_size=8, lr=1e-3, warmup_images=0, memory=memory)
        steps.append(TrainStep(model, cfg, beta2=0.99, ema=copy.deepcopy(model).requires_grad_(False), ema_decay=0.9))
    eager, compiled = steps
    fast = compile_step(compiled, mode, backend="aot_eager")
    for _ in range(2):
        torch.testing.assert_close(fast(x_uint8)["loss"], eager(x_uint8)["loss"], atol=1e-5, rtol=1e-5)
    for p, q in zip(eager.params, compiled.params):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4)
