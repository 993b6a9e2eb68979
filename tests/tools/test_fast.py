"""The fast inference paths (torchglow.tools.fast) and the graph wrapper under them (torchglow.graphs), on
the CPU: the static-buffer logic that a CUDA graph replays (tests/test_cuda.py replays it)."""

import copy

import pytest
import torch

from torchglow.tools.fast import fast_decode, fast_forward, fast_sampler
from torchglow.graphs import GraphedCall

from conftest import tiny_glow

pytestmark = pytest.mark.usefixtures("one_thread")


class Counting(GraphedCall):
    """A call that adds its input to a state tensor: the warm-up must leave no trace."""

    def __init__(self, state: torch.Tensor):
        self.state = state
        super().__init__(self.add, capture=False, warmup=2)

    def add(self, x, pair, flag):
        self.state.add_(1)
        return {"sum": x + pair[0] * pair[1] + self.state, "flag": flag}

    def _state(self):
        return [self.state]


def test_graphed_call_static_buffers_signatures_and_restored_state():
    state = torch.zeros(3)
    call = Counting(state)
    x, a, b = torch.arange(3.0), torch.ones(3), torch.full((3,), 2.0)
    out = call(x, [a, b], True)
    # the two warm-up calls were undone: the first real call sees the state once incremented
    torch.testing.assert_close(out["sum"], x + 2 + 1)
    assert out["flag"] is True and state.tolist() == [1, 1, 1]
    again = call(x + 1, [a, b], True)
    assert again is out  # the same static tensors, overwritten
    torch.testing.assert_close(out["sum"], x + 1 + 2 + 2)
    call(x, [a, b], False)  # another flag: another entry
    call(torch.zeros(3, dtype=torch.float64), [a, b], True)  # another dtype: another entry
    assert len(call.entries) == 3 and not call.captured  # nothing is captured on the CPU


def test_fast_decode_equals_the_eager_decode_and_follows_the_weights():
    """Bit for bit the eager decode; after an in-place weight change (an optimiser step) the cached
    1x1 inverses are refreshed before the call, so the fast decode follows the new weights."""
    model = tiny_glow("affine_lu", torch.float32).eval()
    latents = [torch.randn(3, *s) for s in model.latent_shapes]
    decode = fast_decode(model)
    with torch.no_grad():
        torch.testing.assert_close(decode(latents), model.decode(latents), rtol=0, atol=0)
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        expected = model.decode(latents)
    # the model's own decode refreshed the caches above; make them stale again
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.001)
        expected = copy.deepcopy(model).decode(latents)
    torch.testing.assert_close(decode(latents), expected, rtol=0, atol=0)
    standardized = decode(latents, standardized=True)
    assert not torch.equal(standardized, expected) and len(decode.graphed.entries) == 2


def test_fast_sampler_draws_the_eager_samples():
    model = tiny_glow("affine_lu", torch.float32, num_classes=3).eval()
    y = torch.tensor([0, 2])
    sample = fast_sampler(model, 2)
    want = model.sample(2, 0.7, y, torch.Generator().manual_seed(4))
    torch.testing.assert_close(sample(2, 0.7, y, torch.Generator().manual_seed(4)), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="replays batches of 2, got 3"):
        sample(3)


def test_fast_forward_equals_eager_and_with_compiled_flow_steps(aot_eager):
    """The forward through static buffers is the eager one bit for bit; with ``compile=True`` (its
    flow steps compiled, aot_eager here) equal to float rounding, and it did compile."""
    model = tiny_glow("affine_lu", torch.float32, num_classes=3).eval()
    x, y = torch.rand(4, *model.config.image_shape) - 0.5, torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        want = model(x, y)
    got = fast_forward(model)(x, y)
    torch.testing.assert_close(got.log_prob, want.log_prob, rtol=0, atol=0)
    torch.testing.assert_close(got.y_logits, want.y_logits, rtol=0, atol=0)
    compiled = fast_forward(copy.deepcopy(model), compile=True)(x, y)
    assert aot_eager  # the flow steps were compiled
    torch.testing.assert_close(compiled.log_prob, want.log_prob, rtol=1e-6, atol=1e-4)
