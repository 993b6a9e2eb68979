"""torchglow.tools.convert: y0ast/Glow-PyTorch checkpoints.

The state dicts are built here in y0ast's exact key layout and shapes (github.com/y0ast/Glow-PyTorch,
``model.py``/``modules.py``) with random values, and the converted model's likelihood is compared with
:func:`y0ast_log_prob`, a compact re-derivation of y0ast's forward pass from its math that shares no
code with torchglow's layers.
"""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from torchglow.cli import app as cli
from torchglow.train.checkpoint import load_model
from torchglow.tools.convert import ConversionError, y0ast_to_glow

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def y0ast_state(image=(3, 8, 8), K=2, L=2, hidden=8, coupling="affine", permutation="lu", learn_top=True,
                n_classes=None, scale=0.1, seed=1) -> dict[str, torch.Tensor]:
    """A random state dict with the keys and shapes y0ast's ``Glow(...).state_dict()`` has.

    ``permutation``: "lu" (LU-decomposed 1x1 conv), "plain" (1x1 conv weight) or "none" (reverse or
    shuffle, which save no tensors). The LU factors are full random matrices, so a converter that
    does not apply y0ast's masks would compute something else."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(shape, generator=g, dtype=F64) * scale

    state = {}
    c, h, w = image
    n = 0
    for i in range(L):
        c, h, w, n = c * 4, h // 2, w // 2, n + 1  # the squeeze layer holds no tensors
        for _ in range(K):
            p = f"flow.layers.{n}"
            state[f"{p}.actnorm.bias"], state[f"{p}.actnorm.logs"] = rnd(1, c, 1, 1), rnd(1, c, 1, 1)
            if permutation == "lu":
                state[f"{p}.invconv.p"] = torch.eye(c, dtype=F64)[torch.randperm(c, generator=g)]
                state[f"{p}.invconv.sign_s"] = torch.where(torch.rand(c, generator=g) < 0.5, -1.0, 1.0).to(F64)
                state[f"{p}.invconv.lower"] = rnd(c, c)
                state[f"{p}.invconv.log_s"] = rnd(c)
                state[f"{p}.invconv.upper"] = rnd(c, c)
            elif permutation == "plain":
                state[f"{p}.invconv.weight"] = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=F64))[0]
            out = c if coupling == "affine" else c // 2
            for j, (cin, k) in enumerate([(c // 2, 3), (hidden, 1)]):
                state[f"{p}.block.{2 * j}.conv.weight"] = rnd(hidden, cin, k, k)
                state[f"{p}.block.{2 * j}.actnorm.bias"] = rnd(1, hidden, 1, 1)
                state[f"{p}.block.{2 * j}.actnorm.logs"] = rnd(1, hidden, 1, 1)
            state[f"{p}.block.4.conv.weight"], state[f"{p}.block.4.conv.bias"] = rnd(out, hidden, 3, 3), rnd(out)
            state[f"{p}.block.4.logs"] = rnd(out, 1, 1)
            n += 1
        if i < L - 1:
            p = f"flow.layers.{n}.conv"
            state[f"{p}.conv.weight"], state[f"{p}.conv.bias"], state[f"{p}.logs"] = (
                rnd(c, c // 2, 3, 3), rnd(c), rnd(c, 1, 1))
            c, n = c // 2, n + 1
    if learn_top:
        state["learn_top_fn.conv.weight"], state["learn_top_fn.conv.bias"] = rnd(2 * c, 2 * c, 3, 3), rnd(2 * c)
        state["learn_top_fn.logs"] = rnd(2 * c, 1, 1)
    if n_classes:
        for name, (n_out, n_in) in (("project_ycond", (2 * c, n_classes)), ("project_class", (n_classes, c))):
            state[f"{name}.linear.weight"], state[f"{name}.linear.bias"] = rnd(n_out, n_in), rnd(n_out)
            state[f"{name}.logs"] = rnd(n_out)
    state["prior_h"] = torch.zeros(1, 2 * c, h, w, dtype=F64)
    return state


def y0ast_log_prob(state, x, y=None, K=2, L=2, coupling="affine"):
    """log p(x) in nats (and class logits) of y0ast's Glow with weights ``state``, from its math:
    per level a space-to-depth squeeze (``F.pixel_unshuffle``'s channel order), K steps of
    ActNorm ``(x + b)·e^logs``, a 1x1 conv (``W = P(L⊙M + I)(U⊙Mᵀ + diag(sign·e^log_s))``, plain, or the
    channel reversal) and a coupling on the channel halves (NN = conv3x3+ActNorm, ReLU,
    conv1x1+ActNorm, ReLU, zero conv scaled by ``e^{3·logs}``; affine: shift = h[0::2],
    scale = sigmoid(h[1::2] + 2)); between levels half the channels leave under N(h[0::2], e^{h[1::2]})
    from a zero conv on the other half; the top under N(mean, e^logs) from the halves of
    ``learn_top_fn(0) + project_ycond(onehot)``, with ``LinearZeros(x) = (xWᵀ + b)·e^{3·logs}``."""

    def actnorm(p, v):
        logs = state[f"{p}.logs"]
        return (v + state[f"{p}.bias"]) * logs.exp(), v.shape[2] * v.shape[3] * logs.sum()

    def zero_conv(p, v):
        return F.conv2d(v, state[f"{p}.conv.weight"], state[f"{p}.conv.bias"], padding=1) * (3 * state[f"{p}.logs"]).exp()

    def linear_zeros(p, v):
        return F.linear(v, state[f"{p}.linear.weight"], state[f"{p}.linear.bias"]) * (3 * state[f"{p}.logs"]).exp()

    def normal(v, mean, logs):
        return torch.distributions.Normal(mean, logs.exp()).log_prob(v).sum(dim=(1, 2, 3))

    z, total, n = x, torch.zeros(x.shape[0], dtype=F64), 0
    for i in range(L):
        z, n = F.pixel_unshuffle(z, 2), n + 1
        c, pixels = z.shape[1], z.shape[2] * z.shape[3]
        for _ in range(K):
            p = f"flow.layers.{n}"
            z, ld = actnorm(f"{p}.actnorm", z)
            total = total + ld
            if f"{p}.invconv.lower" in state:
                mask = torch.ones(c, c, dtype=F64).tril(-1)
                u = state[f"{p}.invconv.upper"] * mask.T + torch.diag(
                    state[f"{p}.invconv.sign_s"] * state[f"{p}.invconv.log_s"].exp())
                weight = state[f"{p}.invconv.p"] @ (state[f"{p}.invconv.lower"] * mask + torch.eye(c, dtype=F64)) @ u
                total = total + pixels * state[f"{p}.invconv.log_s"].sum()
            elif f"{p}.invconv.weight" in state:
                weight = state[f"{p}.invconv.weight"]
                total = total + pixels * torch.linalg.slogdet(weight)[1]
            else:
                weight = torch.eye(c, dtype=F64).flip(0)
            z = F.conv2d(z, weight[:, :, None, None])
            a, b = z.chunk(2, dim=1)
            hid = F.relu(actnorm(f"{p}.block.0.actnorm", F.conv2d(a, state[f"{p}.block.0.conv.weight"], padding=1))[0])
            hid = F.relu(actnorm(f"{p}.block.2.actnorm", F.conv2d(hid, state[f"{p}.block.2.conv.weight"]))[0])
            hid = zero_conv(f"{p}.block.4", hid)
            if coupling == "affine":
                scale = torch.sigmoid(hid[:, 1::2] + 2)
                b = (b + hid[:, 0::2]) * scale
                total = total + scale.log().sum(dim=(1, 2, 3))
            else:
                b = b + hid
            z, n = torch.cat([a, b], dim=1), n + 1
        if i < L - 1:
            a, b = z.chunk(2, dim=1)
            prior = zero_conv(f"flow.layers.{n}.conv", a)
            total = total + normal(b, prior[:, 0::2], prior[:, 1::2])
            z, n = a, n + 1
    top = state["prior_h"].expand(x.shape[0], -1, -1, -1)
    if "learn_top_fn.logs" in state:
        top = zero_conv("learn_top_fn", top)
    logits = None
    if y is not None:
        top = top + linear_zeros("project_ycond", F.one_hot(y, state["project_ycond.linear.weight"].shape[1]).to(F64))[:, :, None, None]
        logits = linear_zeros("project_class", z.mean(dim=(2, 3)))
    mean, logs = top.chunk(2, dim=1)
    return total + normal(z, mean, logs), logits


def hparams_for(K=2, L=2, hidden=8, coupling="affine", permutation="lu", learn_top=True, n_classes=None, **extra):
    """hparams.json as y0ast's train.py writes it (its architecture keys and some training keys)."""
    return dict(K=K, L=L, hidden_channels=hidden, actnorm_scale=1.0, flow_coupling=coupling,
                flow_permutation=permutation if permutation in ("invconv", "shuffle", "reverse") else
                "invconv" if permutation in ("lu", "plain") else "reverse",
                LU_decomposed=permutation == "lu", learn_top=learn_top, y_condition=bool(n_classes),
                y_weight=0.01, lr=5e-4, seed=0, batch_size=64, **extra)


def dequantised_images(n=4, shape=(3, 8, 8)):
    x = torch.randint(0, 256, (n, *shape)).to(F64) / 256 - 0.5
    return x + torch.rand(x.shape, dtype=F64) / 256


VARIANTS = [  # coupling, permutation, learn_top, n_classes
    ("affine", "lu", True, None), ("affine", "plain", False, 3), ("affine", "none", True, 3),
    ("additive", "lu", False, 3), ("additive", "plain", True, None), ("additive", "none", False, None),
]


@pytest.mark.parametrize("coupling,permutation,learn_top,n_classes", VARIANTS,
                         ids=["-".join(map(str, v)) for v in VARIANTS])
def test_converted_model_computes_y0ast_log_likelihood(coupling, permutation, learn_top, n_classes):
    arch = dict(coupling=coupling, permutation=permutation, learn_top=learn_top, n_classes=n_classes)
    state = y0ast_state(**arch)
    model = y0ast_to_glow(state, hparams_for(**arch) if permutation == "none" else None)
    x = dequantised_images()
    y = torch.randint(0, n_classes, (4,)) if n_classes else None
    expected, logits = y0ast_log_prob(state, x, y, coupling=coupling)
    with torch.no_grad():
        out = model(x, y)
    assert out.log_prob.dtype == F64
    torch.testing.assert_close(out.log_prob, expected, rtol=1e-12, atol=1e-9)
    if n_classes:
        torch.testing.assert_close(out.y_logits, logits, rtol=1e-12, atol=1e-12)
    assert model.initialized and not model.training
    c = model.config
    assert (c.image_shape, c.n_levels, c.n_steps, c.hidden_channels, c.coupling, c.learn_top, c.num_classes, c.n_bits) == (
        (3, 8, 8), 2, 2, 8, coupling, learn_top, n_classes, 8)
    assert (c.permutation, c.lu) == {"lu": ("invconv", True), "plain": ("invconv", False),
                                     "none": ("reverse", False)}[permutation]


def test_converted_model_inverts_exactly():
    state = y0ast_state(coupling="affine", permutation="lu", n_classes=3)
    model = y0ast_to_glow(state)
    x, y = dequantised_images(), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        latents, _ = model.encode(x, y)
        torch.testing.assert_close(model.decode(latents, y), x, rtol=0, atol=1e-12)


def run_convert(tmp_path, capsys, state, hparams=None, out="out", extra=()):
    ckpt = tmp_path / "glow_model_1.pt"
    if not ckpt.exists():
        torch.save({k: v.float() for k, v in state.items()}, ckpt)
    argv = ["convert", "--from", "y0ast", str(ckpt), "--out", str(tmp_path / out), *extra]
    if hparams is not None:
        (tmp_path / "hparams.json").write_text(json.dumps(hparams))
        argv += ["--hparams", str(tmp_path / "hparams.json")]
    code = cli.main(argv)
    return code, capsys.readouterr()


def test_cli_convert_writes_a_pretrained_folder_that_loads(tmp_path, capsys):
    arch = dict(coupling="affine", permutation="lu", learn_top=True, n_classes=3)
    state = y0ast_state(**arch)
    torch.save({f"module.{k}": v.float() for k, v in state.items()}, tmp_path / "glow_model_1.pt")  # DataParallel
    code, io = run_convert(tmp_path, capsys, state, hparams_for(**arch))
    assert code == 0, io.err
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["glow_model_1.pt", "hparams.json", "out"]
    model = load_model(out)
    assert model.initialized
    x, y = dequantised_images(), torch.tensor([2, 1, 0, 2])
    expected, _ = y0ast_log_prob({k: v.float().to(F64) for k, v in state.items()}, x, y)
    with torch.no_grad():
        got = model.double()(x, y).log_prob
    # the folder holds float32 weights: equal up to float32 rounding of the weights
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    card = (out / "README.md").read_text()
    assert "torchglow convert --from y0ast" in card and str(out) in card
    assert cli.main(["sample", str(out), "--n", "2", "--temperatures", "0.7", "--out", str(tmp_path / "s")]) == 0
    assert list((tmp_path / "s").glob("*.png"))


def test_cli_convert_image_size_of_a_cifar10_model(tmp_path, capsys):
    arch = dict(permutation="plain", learn_top=False, hidden=4, K=1)
    state = y0ast_state(image=(3, 32, 32), **arch)
    code, io = run_convert(tmp_path, capsys, state, hparams_for(dataset="cifar10", **arch))
    assert code == 0, io.err
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["image_shape"] == [3, 32, 32] and config["n_steps"] == 1 and config["lu"] is False
    assert "| data set | cifar10 |" in (tmp_path / "out" / "README.md").read_text()


def _drop(d, key):
    return {k: v for k, v in d.items() if k != key}


def _with(d, **kv):
    return {**d, **kv}


STATE, HPARAMS = y0ast_state(), hparams_for()
REVERSE_STATE = y0ast_state(permutation="none")
ERRORS = {  # id: (state, hparams, what the one-line message must say)
    "unknown key": (_with(STATE, **{"flow.layers.1.extra": torch.zeros(1)}), None, "unknown key 'flow.layers.1.extra'"),
    "missing key": (_drop(STATE, "flow.layers.2.block.4.logs"), None, "missing key 'flow.layers.2.block.4.logs'"),
    "missing first step": (_drop(STATE, "flow.layers.1.block.0.conv.weight"), None,
                           "missing key 'flow.layers.1.block.0.conv.weight'"),
    "wrong shape": (_with(STATE, **{"flow.layers.1.block.4.logs": torch.zeros(1, 12, 1, 1)}), None,
                    "key 'flow.layers.1.block.4.logs' has shape (1, 12, 1, 1), expected (12, 1, 1)"),
    "nonzero prior_h": (_with(STATE, prior_h=torch.ones_like(STATE["prior_h"])), None, "'prior_h' is not all zeros"),
    "hparams K": (STATE, _with(HPARAMS, K=3), "K is 3 but the checkpoint's tensors say 2"),
    "hparams coupling": (STATE, _with(HPARAMS, flow_coupling="additive"),
                         "flow_coupling is 'additive' but the checkpoint's tensors say 'affine'"),
    "hparams LU": (STATE, _with(HPARAMS, LU_decomposed=False), "LU_decomposed is False but"),
    "hparams y_condition": (STATE, _with(HPARAMS, y_condition=True), "y_condition is True but"),
    "hparams dataset": (STATE, _with(HPARAMS, dataset="cifar10"),
                        "dataset 'cifar10' has images (3, 32, 32) but the checkpoint's key 'prior_h' says (3, 8, 8)"),
    "hparams unknown dataset": (STATE, _with(HPARAMS, dataset="mnist"), "dataset 'mnist' is not one of y0ast's"),
    "hparams unknown key": (STATE, _with(HPARAMS, n_flows=4), "unknown key(s) n_flows"),
    "hparams missing key": (STATE, _drop(HPARAMS, "learn_top"), "missing key(s) learn_top"),
    "shuffle": (REVERSE_STATE, hparams_for(permutation="shuffle"),
                "flow_permutation 'shuffle' cannot be converted: y0ast draws each step's channel shuffle"),
    "reverse without hparams": (REVERSE_STATE, None, "'reverse' or 'shuffle', which its state dict cannot tell apart: "
                                                     "pass its hparams.json (--hparams)"),
    "invconv hparams for reverse tensors": (REVERSE_STATE, hparams_for(permutation="lu"),
                                            "flow_permutation is 'invconv' but the checkpoint's tensors say 'reverse'"),
}


@pytest.mark.parametrize("case", ERRORS, ids=list(ERRORS))
def test_cli_convert_error_is_one_line_exit_1_nothing_written(tmp_path, capsys, case):
    state, hparams, needle = ERRORS[case]
    code, io = run_convert(tmp_path, capsys, state, hparams)
    assert code == 1
    assert io.err.count("\n") == 1 and needle in io.err, io.err
    assert io.err.startswith("torchglow convert: error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["glow_model_1.pt"] + (["hparams.json"] if hparams else []))


@pytest.mark.parametrize("content,needle", [
    (b"not a checkpoint", "is not a readable PyTorch checkpoint"),
    ([1, 2, 3], "is not a y0ast Glow state dict"),
    ({"format": "torchglow-checkpoint-v1", "model": {}}, "is not a y0ast Glow state dict"),
    ({"other.weight": torch.zeros(1)}, "is not a y0ast Glow state dict: missing key 'flow.layers.1.actnorm.bias'"),
], ids=["bytes", "list", "torchglow checkpoint", "other model"])
def test_cli_convert_refuses_other_files(tmp_path, capsys, content, needle):
    ckpt = tmp_path / "glow_model_1.pt"
    if isinstance(content, bytes):
        ckpt.write_bytes(content)
    else:
        torch.save(content, ckpt)
    code, io = run_convert(tmp_path, capsys, None)
    assert code == 1 and io.err.count("\n") == 1 and str(ckpt) in io.err and needle in io.err, io.err
    assert [p.name for p in tmp_path.iterdir()] == ["glow_model_1.pt"]


def test_cli_convert_missing_files_and_busy_output(tmp_path, capsys):
    argv = ["convert", "--from", "y0ast", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 1 and "missing.pt does not exist" in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, io = run_convert(tmp_path, capsys, STATE)
    assert code == 1 and "already exists and is not empty" in io.err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    code, io = run_convert(tmp_path, capsys, STATE, out="out2", extra=["--hparams", str(tmp_path / "nope.json")])
    assert code == 1 and "cannot read hparams file" in io.err and "nope.json" in io.err
    assert not (tmp_path / "out2").exists()


def test_cli_convert_into_an_empty_existing_folder(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    code, io = run_convert(tmp_path, capsys, STATE)
    assert code == 0, io.err
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_linear_zeros_layers_are_copied_as_they_are_and_padding_stays_zero():
    state = y0ast_state(n_classes=3)
    model = y0ast_to_glow(state)
    assert (model.config.padding, model.config.class_layers) == ("zero", "linear_zeros")
    for ours, theirs in (("classifier", "project_class"), ("top.y_emb", "project_ycond")):
        layer = model.get_submodule(ours)
        for name, key in (("weight", "linear.weight"), ("bias", "linear.bias"), ("logs", "logs")):
            torch.testing.assert_close(getattr(layer, name), state[f"{theirs}.{key}"], rtol=0, atol=0)
    assert state["project_class.logs"].std() > 0.01  # logs differ per output: a per-row scale is exercised


def test_a_missing_key_is_a_conversion_error():
    with pytest.raises(ConversionError, match="missing key 'prior_h'"):
        y0ast_to_glow(_drop(STATE, "prior_h"))


def test_converted_folder_has_the_modes_of_the_umask(tmp_path, capsys):
    """mkdtemp makes 0700 folders and safetensors 0600 files; the converted folder gets what mkdir and
    open give under the umask (0755 and 0644 under 022)."""
    arch = dict(coupling="affine", permutation="lu", learn_top=False, n_classes=None)
    old = os.umask(0o022)
    try:
        code, io = run_convert(tmp_path, capsys, y0ast_state(**arch), hparams_for(**arch))
    finally:
        os.umask(old)
    assert code == 0, io.err
    out = tmp_path / "out"
    assert out.stat().st_mode & 0o777 == 0o755
    for name in ("README.md", "config.json", "model.safetensors"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name
