import pytest
import torch

from sglang_dsv4.mem.h2d import to_device


def test_cpu_target_returns_the_host_tensor():
    host = torch.arange(5)
    assert to_device(host, "cpu") is host
    assert to_device(host, torch.device("cpu")) is host


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
