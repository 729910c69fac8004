"""A checkpoint in the released DeepSeek-V4 format (FP8 / MXFP4 / BF16 / FP32, sharded), served
through the real SGLang server on CPU, equals HF transformers on the dequantized fp32 weights."""

import json
import shutil

import pytest
import torch
from conftest import SERVER_ARGS
from hf_parity import assert_served_equals_hf, seeded_prompt
from safetensors.torch import load_file, save_file

PROMPT_LENS = (3, 129, 300)
DECODE = 8


def prompt(n: int) -> list[int]:
    return seeded_prompt(n, seed=2000)


@pytest.mark.server
def test_released_checkpoint_serves_hf_logprobs(tiny_ckpt_pair, tmp_path):
    from server import Server

    _, rel_dir, hf_model = tiny_ckpt_pair  # hf_model holds the dequantized weights
    srv = Server(["--model-path", str(rel_dir), *SERVER_ARGS], tmp_path / "log")
    try:
        outs = {n: srv.generate(prompt(n), DECODE) for n in PROMPT_LENS}
        assert "DSV4: loaded 304 tensors" in srv.log and "'mxfp4': 144" in srv.log
    finally:
        srv.stop()
    assert_served_equals_hf(hf_model, {n: prompt(n) for n in PROMPT_LENS}, outs)


@pytest.mark.server
def test_wrong_dtype_stops_startup_naming_the_tensor(tiny_ckpt_pair, tmp_path):
    from server import launch_and_expect_failure

    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt_pair[1], bad)
    name = "layers.2.attn.wq_a.weight"
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    shard = bad / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = tensors[name].to(torch.bfloat16)  # a "dequantized" weight left behind
    save_file(tensors, shard)
    log = launch_and_expect_failure(["--model-path", str(bad), *SERVER_ARGS], tmp_path / "log")
    want = (
        "tensor `layers.2.attn.wq_a.weight`: expected (64, 256) torch.float8_e4m3fn "
        "(released format, fp8), found (64, 256) torch.bfloat16"
    )
    assert want in log, log[-3000:]
