"""Building the served ``DeepseekV4ForCausalLM`` outside a server, for model-level tests."""

import contextlib
import functools

import pytest
import torch


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_served(
    ckpt, *, kept: bool = True, device="cpu", dtype=torch.float32, nvfp4=None, kernels=None
):
    """The served model of checkpoint dir ``ckpt`` built on ``device`` in ``dtype``, weights
    loaded; ``kept`` forces the keep-quantized decision (the CUDA path,
    :func:`sglang_dsv4.model.linears.keeps_quantized`) on or off; ``nvfp4`` sets
    ``nvfp4_on_load``; ``kernels`` forces the ops' choice (:func:`sglang_dsv4.ops.build_ops`:
    True = the Triton ops, interpreted on CPU). No LogitsProcessor (that needs a server): use
    ``model.ref``."""
    from transformers import AutoConfig

    import sglang_dsv4.model.deepseek_v4 as served
    from sglang_dsv4.ops import build_ops
    from sglang_dsv4.weights.loader import iter_safetensors

    config = AutoConfig.from_pretrained(ckpt)
    if nvfp4 is not None:
        config.nvfp4_on_load = nvfp4
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(served, "LogitsProcessor", lambda config: None)
        mp.setattr(served, "keeps_quantized", lambda device: kept)
        if kernels is not None:
            mp.setattr(served, "build_ops", functools.partial(build_ops, kernels=kernels))
        with torch.device(device), default_dtype(dtype):
            model = served.DeepseekV4ForCausalLM(config)
    model.load_weights(iter_safetensors(ckpt))
    return model
