import pytest
import torch

from torchglow import ConfigError, Glow
from torchglow.devices import random_tensor, resolve_device

from conftest import assert_one_error_line, cli, tiny_config

NO_GPU = not torch.cuda.is_available()


def test_auto_is_the_gpu_when_there_is_one():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "meta", ""])
def test_unknown_device_names(name):
    with pytest.raises(ConfigError) as e:
        resolve_device(name)
    assert str(e.value) == f"`device` {name}: unknown device; use auto, cpu, cuda or cuda:N"


@pytest.mark.skipif(not NO_GPU, reason="needs a machine without a GPU")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_gpu(name):
    with pytest.raises(ConfigError, match=f"`device` {name}: no CUDA GPU is available here"):
        resolve_device(name)


def test_cuda_index_beyond_the_gpus():
    if NO_GPU:
        pytest.skip("needs a GPU")
    n = torch.cuda.device_count()
    assert resolve_device(f"cuda:{n - 1}") == torch.device("cuda", n - 1)
    with pytest.raises(ConfigError, match=f"has {n} GPU"):
        resolve_device(f"cuda:{n}")


def test_random_tensor_draws_on_the_generator_device_then_moves():
    """The numbers are the generator's own draw (in the requested dtype), whatever the target
    device (the meta device stands in for a GPU on machines without one)."""
    g = torch.Generator().manual_seed(0)
    t = random_tensor(torch.randn, (2, 3), g, torch.device("meta"), torch.float64)
    assert (t.device.type, t.dtype, t.shape) == ("meta", torch.float64, (2, 3))
    on_cpu = random_tensor(torch.rand, (2, 3), torch.Generator().manual_seed(0), torch.device("cpu"), torch.float64)
    torch.testing.assert_close(on_cpu, torch.rand((2, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    assert random_tensor(torch.randn, (4,), None, torch.device("cpu"), torch.float32).dtype == torch.float32
    if not NO_GPU:
        on_gpu = random_tensor(torch.rand, (2, 3), torch.Generator().manual_seed(0), torch.device("cuda"), torch.float64)
        torch.testing.assert_close(on_gpu.cpu(), on_cpu)
        g = torch.Generator(device="cuda").manual_seed(0)
        assert random_tensor(torch.rand, (2, 3), g, torch.device("cpu"), torch.float64).device.type == "cpu"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    path = tmp_path_factory.mktemp("pretrained")
    Glow(tiny_config()).save_pretrained(path)
    return path


def commands(run):
    return {
        "sample": ["sample", run],
        "evaluate": ["evaluate", run, "--dataset", "digits"],
        "reconstruct": ["reconstruct", run],
        "bench": ["bench", "--preset", "digits", "--n-steps", "1", "--repeats", "1"],
    }


@pytest.mark.parametrize("command", ["sample", "evaluate", "reconstruct", "bench"])
@pytest.mark.parametrize("name,words", [("cuda", "no CUDA GPU"), ("gpu", "unknown device")])
def test_bad_device_is_one_line_and_exit_2(capsys, pretrained, command, name, words):
    if name == "cuda" and not NO_GPU:
        pytest.skip("this machine has a GPU")
    rc, out, err = cli(capsys, *commands(pretrained)[command], "--device", name)
    line = assert_one_error_line(rc, err, f"torchglow {command}: error: --device {name}: {words}")
    assert rc == 2 and out == "" and err == line + "\n"


@pytest.mark.skipif(not NO_GPU, reason="needs a machine without a GPU")
def test_train_on_cuda_without_a_gpu_is_one_line(capsys, tmp_path):
    rc, _, err = cli(capsys, "train", "--device", "cuda", "--out", tmp_path / "run", "--n-steps", "1")
    assert_one_error_line(rc, err, "--device cuda", "no CUDA GPU")
