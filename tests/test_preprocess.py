import math

import pytest
import torch

from torchglow.preprocess import bits_per_dim_from_log_prob, dequantize, preprocess, to_uint8


def test_preprocess_reduces_bits_and_centres():
    x = torch.tensor([0, 7, 8, 255], dtype=torch.uint8)
    torch.testing.assert_close(preprocess(x, 5), torch.tensor([0, 0, 1, 31]) / 32 - 0.5)
    torch.testing.assert_close(preprocess(x, 8), x.float() / 256 - 0.5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_preprocess_in_any_float_dtype_is_exact(dtype):
    """Every value is an integer in -128..127 over a power of two: at most 8 significant bits,
    exact even in bf16."""
    x = torch.arange(256, dtype=torch.uint8)
    for n_bits in (5, 8):
        out = preprocess(x, n_bits, dtype)
        assert out.dtype == dtype
        assert torch.equal(out.double(), (x.long() // 2 ** (8 - n_bits)).double() / 2**n_bits - 0.5)


def test_dequantize_stays_in_the_bin_and_to_uint8_inverts():
    x = torch.randint(0, 256, (1000,), dtype=torch.uint8)
    for n_bits in (1, 5, 8):
        z = dequantize(preprocess(x, n_bits), n_bits, torch.Generator().manual_seed(0))
        assert z.min() >= -0.5 and z.max() < 0.5
        assert torch.equal(to_uint8(z, n_bits), x >> (8 - n_bits) << (8 - n_bits))


def test_to_uint8_clamps_and_handles_nonfinite():
    out = to_uint8(torch.tensor([-3.0, 3.0, float("nan"), float("inf")]), 8)
    assert out.tolist() == [0, 255, 0, 255]


def test_uniform_density_is_n_bits_per_dim():
    # a uniform density on [-0.5, 0.5)^D (log p = 0) is worth exactly n_bits bits/dim
    for n_bits in (3, 8):
        bpd = bits_per_dim_from_log_prob(torch.zeros(2), n_dims=12, n_bits=n_bits)
        torch.testing.assert_close(bpd, torch.full((2,), float(n_bits)))
    assert math.isclose(float(bits_per_dim_from_log_prob(torch.tensor(12 * math.log(2.0)), 12, 8)), 7.0)
