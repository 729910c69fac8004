import os

import pytest
import torch

# Triton picks interpreter or compiler when a @triton.jit decorator runs (also triton.language's
# own jit helpers, at triton's import): on a machine without CUDA every kernel test runs under the
# interpreter, so set it before anything imports triton. Server subprocesses drop it again.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The CuTe DSL reads its target once, at its import, and defaults to sm_100a without a GPU;
    # in a whole-suite run something imports cutlass before the kernel module can set it.
    os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")

from hf_tiny import build_hf_model, tiny_config_dict

EDGE_LENGTHS = (1, 3, 4, 5, 127, 128, 129, 650)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _sync_sites(monkeypatch):
    """``DSV4_SYNC_ERROR=1``: the sync-counting GPU tests' ``set_sync_debug_mode("warn")`` raises
    instead, so the failing test's traceback names the synchronizing call (a count says only
    how many there were)."""
    if os.environ.get("DSV4_SYNC_ERROR") == "1" and torch.cuda.is_available():
        original = torch.cuda.set_sync_debug_mode
        monkeypatch.setattr(
            torch.cuda, "set_sync_debug_mode", lambda m: original("error" if m == "warn" else m)
        )


@pytest.fixture(scope="session")
def tiny_dict() -> dict:
    return tiny_config_dict()


@pytest.fixture(scope="session")
def hf_model(tiny_dict):
    """The fp32 tiny HF DeepseekV4ForCausalLM: layers [SWA, SWA, CSA, HCA, CSA, HCA], layer 0
    hash-routed, 16 indexer heads, top-k 16 (< the 162 entries of a 650-token prompt)."""
    return build_hf_model(tiny_dict)


@pytest.fixture(scope="session")
def tiny_cfg(tiny_dict):
    from sglang_dsv4.config import DSV4Config

    return DSV4Config.from_dict(tiny_dict)


@pytest.fixture(scope="session")
def tiny_weights(hf_model):
    from sglang_dsv4.checkpoint import hf_to_released

    return hf_to_released(hf_model.state_dict())


@pytest.fixture(scope="session")
def tiny_checkpoint(hf_model, tmp_path_factory):
    """The tiny HF model saved as a checkpoint directory (HF tensor names, released config)."""
    import json

    path = tmp_path_factory.mktemp("tiny_ckpt")
    hf_model.save_pretrained(path, safe_serialization=True)
    (path / "config.json").write_text(json.dumps(tiny_config_dict(), indent=2))
    return path


SERVER_ARGS = [
    # idle schedulers otherwise busy-poll: several live test servers starve a 2-core machine
    "--sleep-on-idle",
    "--skip-tokenizer-init",
    "--dtype",
    "float32",
    "--max-total-tokens",
    "32768",
    "--max-running-requests",
    "16",
    "--context-length",
    "4096",
]


@pytest.fixture(scope="session")
def tiny_server(tiny_checkpoint, tmp_path_factory):
    """A real SGLang server on the tiny fp32 checkpoint (our plugin via its entry point)."""
    from server import Server

    log = tmp_path_factory.mktemp("logs") / "tiny_server.log"
    srv = Server(["--model-path", str(tiny_checkpoint), *SERVER_ARGS], log)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def tiny_ckpt_pair(hf_model, tiny_dict, tmp_path_factory):
    """(hf dir, released dir, HF model): the tiny model rounded onto the released format's grid
    (a copy of ``hf_model``) and written in both formats by scripts/make_checkpoint.py's code,
    sharded at 1 MiB (released: ~9 shards)."""
    import copy

    from sglang_dsv4.weights.make import make_checkpoints

    model = copy.deepcopy(hf_model)
    out = tmp_path_factory.mktemp("tiny_pair")
    hf_dir, rel_dir = make_checkpoints(tiny_dict, out, model=model, shard_bytes=1 << 20)
    return hf_dir, rel_dir, model
