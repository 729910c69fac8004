import pytest


@pytest.mark.server
def test_running_server_uses_our_classes(tiny_server):
    """The backend logs, from inside the scheduler, the classes that really serve."""
    line = next((ln for ln in tiny_server.log.splitlines() if "sglang-dsv4 active:" in ln), None)
    assert line is not None, tiny_server.log[-3000:]
    assert "model=sglang_dsv4.model.deepseek_v4.DeepseekV4ForCausalLM" in line
    assert "backend=DSV4AttnBackend" in line and "pool=DSV4KVPool" in line
    assert "allocator=sglang_dsv4.mem.allocator.DSV4PagedAllocator" in line


def test_plugin_is_declared_as_entry_point():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="sglang.srt.plugins") if e.name == "dsv4"]
    assert ep.value == "sglang_dsv4.plugin:register"
