"""A checkpoint in the released DeepSeek-V4 format (FP8 / MXFP4 / BF16 / FP32, sharded), served
through the real SGLang server on CPU, equals HF transformers on the dequantized fp32 weights."""

import json
import shutil

import pytest
import torch
from conftest import SERVER_ARGS
from safetensors.torch import load_file, save_file

PROMPT_LENS = (3, 129, 300)
DECODE = 8


def prompt(n: int) -> list[int]:
    return torch.randint(2, 1024, (n,), generator=torch.Generator().manual_seed(2000 + n)).tolist()


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
    for n, out in outs.items():
        ids, tokens = prompt(n), out["output_ids"]
        with torch.no_grad():
            logits = hf_model(input_ids=torch.tensor([ids + tokens]), use_cache=False).logits[0]
        ref = torch.log_softmax(logits.float(), dim=-1)
        meta = out["meta_info"]
        got = [lp for lp, _, _ in meta["input_token_logprobs"][1:]]
        got += [lp for lp, _, _ in meta["output_token_logprobs"]]
        want = [ref[i - 1, ids[i]].item() for i in range(1, n)]
        want += [ref[n - 1 + j, tokens[j]].item() for j in range(DECODE)]
        assert tokens == ref[n - 1 : n - 1 + DECODE].argmax(-1).tolist(), f"n={n}"
        diff = max(abs(a - b) for a, b in zip(got, want, strict=True))
        print(f"n={n}: max |d logprob| served vs HF = {diff:.2e}")
        assert diff <= 1e-3, f"n={n}: max |d logprob| = {diff:.2e}"


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
