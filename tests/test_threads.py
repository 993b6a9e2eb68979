import torch

from torchglow import threads


def test_auto_leaves_the_busy_cores_alone():
    assert threads.auto_threads(cores=2, load=0.2) == 2
    assert threads.auto_threads(cores=2, load=1.0) == 1
    assert threads.auto_threads(cores=2, load=6.0) == 1  # never fewer than one
    assert threads.auto_threads(cores=16, load=4.4) == 12
    assert threads.auto_threads(cores=16, load=3.5) == 12  # rounds half to even: 12.5 -> 12


def test_set_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert threads.set_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(2)
        assert threads.set_threads(None) == 2  # the environment's (here: torch's) choice is kept
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
        assert threads.set_threads(None) == threads.available_cores() == torch.get_num_threads()  # idle
        monkeypatch.setattr(threads.os, "getloadavg", lambda: (50.0, 0.0, 0.0))
        assert threads.set_threads(None) == 1 == torch.get_num_threads()  # busy
    finally:
        torch.set_num_threads(before)
