import pytest
import torch

from sglang_dsv4.mem.h2d import HostCopy, to_device


def test_cpu_target_returns_the_host_tensor():
    host = torch.arange(5)
    assert to_device(host, "cpu") is host
    assert to_device(host, torch.device("cpu")) is host


def test_host_copy_on_cpu_is_a_plain_snapshot():
    class Sub(torch.Tensor):
        pass

    dev = torch.arange(4).as_subclass(Sub)
    copy = HostCopy(dev)
    dev += 10  # later device work does not reach the copy
    got = copy.wait()
    assert type(got) is torch.Tensor and got.tolist() == [0, 1, 2, 3]


@pytest.mark.gpu
def test_host_copy_is_queued_without_a_sync():
    busy = torch.randn(4096, 4096, device="cuda")
    dev = torch.arange(1000, device="cuda")
    busy @ busy  # queued work the copy must not wait for on the host
    torch.cuda.set_sync_debug_mode("error")  # a synchronizing call raises
    try:
        copy = HostCopy(dev)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    got = copy.wait()
    assert got.is_pinned() and torch.equal(got, torch.arange(1000))


@pytest.mark.gpu
def test_cuda_copy_is_queued_without_a_sync():
    host = torch.arange(1000, dtype=torch.int32)
    busy = torch.randn(4096, 4096, device="cuda")
    busy @ busy  # queued work the copy must not wait for on the host
    torch.cuda.set_sync_debug_mode("error")  # a synchronizing call raises
    try:
        dev = to_device(host, "cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    del host  # the caching host allocator keeps the pinned block until the copy ran
    assert dev.device.type == "cuda"
    assert torch.equal(dev.cpu(), torch.arange(1000, dtype=torch.int32))
