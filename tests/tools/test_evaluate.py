"""Evaluation: bits/dim eager and through the fast path, and the per-pixel categorical baseline."""

import json
import math

import pytest
import torch

from torchglow.cli.errors import in_flags
from torchglow.tools.evaluate import MIN_EVAL_IMAGES, categorical_baseline_bpd, evaluate_bpd, few_images_caveat

from conftest import cli
from tool_checks import digits_like


pytestmark = pytest.mark.usefixtures("one_thread")


def test_fast_bpd_equals_eager(model, cond_model):
    """The fast forward (static buffers; a CUDA graph on CUDA) scores the eager bits/dim: 10 images in
    batches of 4 (the last one padded with 2 uncounted copies) over 2 noise draws, or one batch
    of the whole set when it is smaller than batch_size, with and without class labels."""
    images = digits_like(10, seed=2)
    for m, labels in ((model, None), (cond_model, torch.arange(10) % 3)):
        for batch_size in (4, 256):
            eager = evaluate_bpd(m, images, labels, batch_size=batch_size, n_draws=2, seed=5)
            fast = evaluate_bpd(m, images, labels, batch_size=batch_size, n_draws=2, seed=5, fast=True)
            assert fast == pytest.approx(eager, rel=1e-6)


def test_evaluate_bpd_in_the_models_dtype(model):
    """A float64 model is scored in float64: the images are preprocessed and noised in the model's
    dtype, as ``Glow.bits_per_dim`` does with the same generator."""
    import copy

    from torchglow.noise import mix_seed

    images = digits_like(6, seed=3)
    m64 = copy.deepcopy(model).double()
    got = evaluate_bpd(m64, images, batch_size=8, seed=1)
    want = m64.bits_per_dim(images, generator=torch.Generator().manual_seed(mix_seed(1, 0, 0))).mean()
    assert got == pytest.approx(float(want), rel=1e-12)


def test_evaluate_fast_command(model, tmp_path, capsys):
    """``torchglow evaluate --fast`` prints the eager command's bits/dim and says it ran fast."""
    model.save_pretrained(tmp_path / "pre")
    results = []
    for flags in ((), ("--fast",)):
        code, out, err = cli(capsys, "evaluate", tmp_path / "pre", "--dataset", "digits", "--device", "cpu",
                             "--batch-size", 128, *flags)
        assert code == 0, err
        results.append(json.loads(out))
    assert [r["fast"] for r in results] == [False, True]
    assert results[0]["images"] == 300  # 128 + 128 + 44, the last batch padded
    assert results[1]["bits_per_dim"] == pytest.approx(results[0]["bits_per_dim"], rel=1e-6)


def test_categorical_baseline_against_a_hand_count():
    # two pixels, n_bits=1 (levels x >> 7); training images (0, 255), (0, 0), (255, 255):
    # pixel 0 has level 0 twice and level 1 once, pixel 1 level 0 once and level 1 twice.
    train = torch.tensor([[0, 255], [0, 0], [255, 255]], dtype=torch.uint8).reshape(3, 1, 1, 2)
    test = torch.tensor([[0, 0], [200, 100]], dtype=torch.uint8).reshape(2, 1, 1, 2)
    # additive smoothing 0.5 over 2 levels: p = (count + 0.5) / (3 + 1)
    p0 = {0: 2.5 / 4, 1: 1.5 / 4}
    p1 = {0: 1.5 / 4, 1: 2.5 / 4}
    bits = [-math.log2(p0[0]) - math.log2(p1[0]),  # test image 1: levels (0, 0)
            -math.log2(p0[1]) - math.log2(p1[0])]  # test image 2: levels (1, 0)
    assert categorical_baseline_bpd(train, test, n_bits=1) == pytest.approx(sum(bits) / 4, rel=1e-12)
    # without smoothing a level never seen in training has probability 0: infinite bits
    assert categorical_baseline_bpd(train[:2], test, n_bits=1, alpha=0.0) == math.inf


def test_few_images_caveat():
    assert MIN_EVAL_IMAGES == 100 and few_images_caveat(100, "x") is None
    caveat = few_images_caveat(35, "cats (test)")
    assert caveat.startswith("the score rests on 35 image(s) of cats (test), fewer than 100") and "--" not in caveat
    assert in_flags(caveat).endswith("(a folder's whole set: --dataset FOLDER --split all)")  # as the CLI shows it
