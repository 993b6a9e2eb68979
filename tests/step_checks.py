"""Checks of a training step's state shared by the CPU tests (tests/train/test_step.py) and the CUDA
tests (tests/test_cuda.py)."""

import copy

import torch


def state_of(step):
    return [t.clone() for t in (step.flat, step.ema_flat, step.exp_avg, step.exp_avg2, step.skipped_flags,
                                *step.counters.values())]


def assert_resumes_in_place(step, call):
    """After ``call()`` (a graphed step) has run: a state loaded into the step (resume, or the
    trainer's restore of last.pt) is copied into the captured tensors, so the next two calls repeat
    the two after the save bit for bit, and end in the same state."""
    saved = (copy.deepcopy(step.model.state_dict()), copy.deepcopy(step.ema.state_dict()),
             copy.deepcopy(step.state_dict()))
    first = [{k: v.clone() for k, v in call().items()} for _ in range(2)]
    after_first = state_of(step)
    step.model.load_state_dict(saved[0])
    step.ema.load_state_dict(saved[1])
    step.load_state_dict(saved[2], "test")
    second = [{k: v.clone() for k, v in call().items()} for _ in range(2)]
    for a, b in zip(first, second):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    for p, q in zip(after_first, state_of(step)):
        assert torch.equal(p, q)
