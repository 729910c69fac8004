"""FP4 routed experts kept as banks (the CUDA path of the served model), run on CPU: the Triton
dequantizing kernel under ``TRITON_INTERPRET=1`` (set before the kernels are imported), the
model forced onto the FP4 path. Logits equal those of the dense (dequantize-at-load) model."""

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from sglang_dsv4.ref.model import RefDSV4
from sglang_dsv4.weights.loader import iter_safetensors
from sglang_dsv4.weights.names import hf_to_released


def _interpreted_kernels():
    mod = importlib.import_module("sglang_dsv4.kernels.mxfp4_moe")
    if not torch.cuda.is_available():
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(mod._fp4_dequant_kernel, InterpretedFunction):
            importlib.reload(mod)  # imported earlier without the interpreter


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_fp4_bank_model_matches_dense(tiny_ckpt_pair, tiny_cfg, monkeypatch, fmt):
    from transformers import AutoConfig

    import sglang_dsv4.model.deepseek_v4 as served
    from sglang_dsv4.model.experts import FP4Experts

    _interpreted_kernels()
    _, rel_dir, hf_model = tiny_ckpt_pair
    config = AutoConfig.from_pretrained(rel_dir)
    if fmt == "nvfp4":
        config.nvfp4_on_load = "experts"
    monkeypatch.setattr(served, "LogitsProcessor", lambda config: None)  # needs a server
    monkeypatch.setattr(served, "fp4_expert_format", lambda cfg, nvfp4, device: fmt)
    model = served.DeepseekV4ForCausalLM(config)
    model.load_weights(iter_safetensors(rel_dir))
    banks = [b.ffn.experts for b in model.layers]
    assert all(isinstance(b, FP4Experts) and b.fmt == fmt for b in banks)
    assert not any(".experts.0.w1.weight" in n for n, _ in model.named_parameters())
    ids = torch.randint(2, 1024, (40,), generator=torch.Generator().manual_seed(3))
    got = model.ref(ids)
    want = RefDSV4(tiny_cfg, hf_to_released(hf_model.state_dict()))(ids)
    # the checkpoint's experts are MXFP4 values and NVFP4 re-expresses them exactly
    assert (got - want).abs().max() <= 1e-5
