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


def served_tensors(model) -> dict[str, torch.Tensor]:
    """The served model's parameters and buffers under released names: expert banks as
    per-expert views (``layers.0.ffn.experts.3.w1.weight``), other tensors as named."""
    out = dict(model.named_parameters()) | dict(model.named_buffers())
    for block in model.layers:
        p = f"layers.{block.spec.index}.ffn."
        views = block.ffn.released(p)
        if views:
            banks = (p + "experts.", p + "shared.")
            out = {n: t for n, t in out.items() if not n.startswith(banks)}
            out |= views
    return out


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
