"""count_ops: kernel-launching ops of one call, by its rule."""

import torch

from torchglow.bench import count_ops


def test_count_ops_counts_top_level_kernel_ops():
    """The rule of count_ops on hand-made calls: views and metadata ops count 0, an op counts once
    however many aten ops it calls inside, a no-op ``.to``/``.contiguous`` counts 0 and a copying one 1;
    autograd's backward ops count one each."""
    x = torch.randn(4, 3)
    w = torch.randn(3, 5, requires_grad=True)
    assert count_ops(lambda: x.view(3, 4).t()[1:].unsqueeze(0).expand(2, -1, -1))["ops"] == 0
    assert count_ops(lambda: x.to(torch.float32).contiguous())["ops"] == 0
    counts = count_ops(lambda: (x.t().contiguous(), x.to(torch.float64)))
    assert counts["ops"] == 2 and counts["ops_by_name"] == {"aten::contiguous": 1, "aten::to": 1}
    # linear = one top-level op (its addmm/matmul inside not again); mul, sum; backward: mm etc.
    forward = count_ops(lambda: (torch.nn.functional.linear(x, w.t()) * 2).sum())
    assert forward["ops"] == 3 and set(forward["ops_by_name"]) == {"aten::linear", "aten::mul", "aten::sum"}
    both = count_ops(lambda: torch.autograd.grad((x @ w * 2).sum(), w))
    assert both["ops"] > 3 and "aten::mm" in both["ops_by_name"]
