"""Evaluation helpers: the per-pixel categorical baseline."""

import math

import pytest
import torch

from torchglow.evaluate import categorical_baseline_bpd


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
