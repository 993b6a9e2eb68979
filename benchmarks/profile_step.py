"""Where the eager training step spends its time, and how many kernels it launches.

    python benchmarks/profile_step.py [--precision bf16] [--steps 3] [--n-steps 8] [--hidden-channels 128] [--batch-size 16]
    python benchmarks/profile_step.py --count [--n-steps 32 --hidden-channels 512 --batch-size 2] [--json FILE]

The cifar10 preset (reduced by the options) on the CPU, one thread. Without ``--count`` it prints
the operators of a few training steps by self CPU time. With ``--count`` it counts the
kernel-launching operators of ONE training step (the :class:`torchglow.train.step.TrainStep` of
``torchglow train``: forward, backward, update, EMA), ONE sampling call (``model.sample(batch)``
in eval mode) and ONE evaluation call (the bits/dim forward under ``no_grad``), each after two
warm-up calls, and prints a per-operator table.

The counting rule: ``torch.profiler`` records every ``aten::`` operator call, nested
(``conv2d`` calls ``convolution`` calls ``_convolution`` calls ``mkldnn_convolution``; ``sum``
calls ``fill_`` to clear its output). An operator call counts as one kernel launch when it is the
outermost call that does work: it is neither a view or metadata operator (:data:`METADATA`: views,
shape queries, uninitialised allocations; they move no data) nor a composite that only forwards
to other operators (:data:`COMPOSITE`: ``conv2d``, ``clone`` = ``empty_like`` + ``copy_``, ``to``,
``matmul``, ``linear``, ...), and no operator above it counts (the helpers that an operator calls
are part of its one launch: ``sum``'s ``fill_``, the copy inside ``convolution_backward``). On a
GPU each counted call is (at least) one kernel launch; on the CPU one pass over its operands.
"""

import argparse
import collections
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchglow import bench  # noqa: E402

# Operators that only make views, read or change metadata, or allocate uninitialised memory.
METADATA = frozenset(
    "aten::" + name for name in (
        "view", "_unsafe_view", "reshape", "_reshape_alias", "expand", "expand_as", "as_strided", "slice",
        "select", "unsqueeze", "squeeze", "t", "transpose", "permute", "detach", "alias", "lift_fresh",
        "empty", "empty_like", "empty_strided", "resolve_conj", "resolve_neg", "unbind", "split",
        "split_with_sizes", "chunk", "narrow", "unflatten", "flatten", "view_as", "diagonal", "movedim",
        "is_nonzero", "item", "_local_scalar_dense", "size", "stride",
        "numel", "dim", "is_same_size", "result_type", "_has_compatible_shallow_copy_type", "set_",
        "resize_", "_reshape_copy_noop", "_nested_tensor_from_mask_left_aligned", "new_empty",
        "new_empty_strided", "_unsafe_split", "unsafe_split", "unsafe_chunk", "matrix_H", "mT", "adjoint",
        "conj", "_conj", "_neg_view", "align_as", "refine_names", "rename", "_version", "output_nr",
        "requires_grad_", "retain_grad", "_make_subclass", "_nnpack_available", "numpy_T", "as_strided_",
        "_unsafe_index_put_noop",
    )
)


# Composites: they call other operators and launch nothing themselves.
COMPOSITE = frozenset(
    "aten::" + name for name in (
        "conv2d", "convolution", "_convolution", "conv_transpose2d", "linear", "matmul", "einsum", "tensordot",
        "bilinear", "clone", "to", "_to_copy", "type_as", "contiguous", "stack", "hstack", "vstack", "dropout",
        "feature_dropout", "cross_entropy_loss", "nll_loss_nd", "masked_fill", "repeat_interleave",
    )
)


def count_kernels(prof, all_calls: bool = False) -> collections.Counter:
    """Per-operator count of the kernel-launching operator calls of a profile (the module
    docstring's rule); with ``all_calls`` every non-metadata call at any depth instead, composites
    and the helpers inside other operators included (an upper bound, the issues' first count)."""
    if all_calls:
        return collections.Counter(e.name for e in prof.events()
                                   if e.name.startswith("aten::") and e.name not in METADATA)
    counted: collections.Counter = collections.Counter()

    def visit(event) -> None:
        name = event.name
        if name.startswith("aten::") and name not in METADATA and name not in COMPOSITE:
            counted[name] += 1
            return  # what it calls is part of this launch
        for child in event.cpu_children:
            visit(child)

    for event in prof.events():
        if event.cpu_parent is None:
            visit(event)
    return counted


def _profiled(fn, all_calls: bool) -> collections.Counter:
    for _ in range(2):
        fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return count_kernels(prof, all_calls)


def count_phases(overrides: dict, batch_size: int, precision: str,
                 all_calls: bool = False) -> dict[str, collections.Counter]:
    """The kernel counts of one training step, one sampling call and one evaluation call (the
    eager callables of :func:`torchglow.bench.phase_calls`)."""
    config = bench.BenchConfig("cifar10", batch_size, "cpu", precision=precision, overrides=overrides)
    return {phase: _profiled(bench.phase_calls(config, phase)[0]["eager"], all_calls)
            for phase in ("train", "sample", "eval")}


def print_counts(counts: dict[str, collections.Counter], rows: int) -> None:
    names = sorted(set().union(*counts.values()), key=lambda n: -counts["train"][n])
    print(f"| operator | {' | '.join(counts)} |")
    print(f"| --- | {' | '.join('---:' for _ in counts)} |")
    print(f"| **total** | {' | '.join(f'**{sum(c.values()):,}**' for c in counts.values())} |")
    for name in names[:rows]:
        print(f"| `{name[6:]}` | {' | '.join(f'{c[name]:,}' for c in counts.values())} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--steps", type=int, default=3, help="training steps profiled (without --count)")
    parser.add_argument("--n-steps", type=int, default=8)
    parser.add_argument("--hidden-channels", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--count", action="store_true", help="count kernel-launching operators per call")
    parser.add_argument("--rows", type=int, default=25, help="operators shown in the --count table")
    parser.add_argument("--all-calls", action="store_true",
                        help="with --count: every non-metadata call at any depth (composites and helpers too)")
    parser.add_argument("--json", type=Path, help="with --count: also write the per-operator counts here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    overrides = dict(n_steps=args.n_steps, hidden_channels=args.hidden_channels)
    if args.count:
        counts = count_phases(overrides, args.batch_size, args.precision, args.all_calls)
        print_counts(counts, args.rows)
        if args.json:
            args.json.write_text(json.dumps({k: dict(v.most_common()) for k, v in counts.items()}, indent=1) + "\n")
        return
    config = bench.BenchConfig("cifar10", args.batch_size, "cpu", precision=args.precision, overrides=overrides)
    step = bench.train_step(config, bench.build(config))
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
