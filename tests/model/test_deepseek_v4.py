"""The served model equals HF transformers: through the real SGLang server, on CPU, in fp32."""

import concurrent.futures
import json
import shutil

import pytest
import requests
import torch
from conftest import SERVER_ARGS

from sglang_dsv4.server_checks import used_tokens

PROMPT_LENS = (1, 3, 4, 127, 128, 129, 300, 650)
DECODE = 32


def prompt(n: int) -> list[int]:
    return torch.randint(2, 1024, (n,), generator=torch.Generator().manual_seed(1000 + n)).tolist()


def hf_logprobs(hf_model, seq: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = hf_model(input_ids=torch.tensor([seq]), use_cache=False).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)  # [S, V]


def served_logprobs(out: dict) -> tuple[list[int], list[float], list[float]]:
    meta = out["meta_info"]
    inputs = [lp for lp, _, _ in meta["input_token_logprobs"][1:]]
    outputs = [lp for lp, _, _ in meta["output_token_logprobs"]]
    return out["output_ids"], inputs, outputs


@pytest.fixture(scope="module")
def solo(tiny_server):
    tiny_server_flush(tiny_server)
    return {n: tiny_server.generate(prompt(n), DECODE) for n in PROMPT_LENS}


def tiny_server_flush(server) -> None:
    requests.post(server.url + "/flush_cache", timeout=60).raise_for_status()


@pytest.mark.server
@pytest.mark.parametrize("n", PROMPT_LENS)
def test_prompt_logprobs_and_greedy_decode_match_hf(hf_model, solo, n):
    tokens, lp_in, lp_out = served_logprobs(solo[n])
    assert len(tokens) == DECODE
    ids = prompt(n)
    ref = hf_logprobs(hf_model, ids + tokens)
    want_in = [ref[i - 1, ids[i]].item() for i in range(1, n)]
    want_out = [ref[n - 1 + j, tokens[j]].item() for j in range(DECODE)]
    greedy = ref[n - 1 : n - 1 + DECODE].argmax(-1).tolist()
    assert tokens == greedy, "served greedy tokens differ from HF's argmax"
    diff = max(abs(a - b) for a, b in zip(lp_in + lp_out, want_in + want_out, strict=True))
    assert diff <= 1e-3, f"max |d logprob| = {diff:.2e}"


@pytest.mark.server
def test_chunked_prefill_is_identical(tiny_checkpoint, solo, tmp_path):
    """``--chunked-prefill-size 64`` gives the same tokens and logprobs. SGLang needs chunks of
    whole pages and a DSV4 page is a 128-token block, so the plugin rounds 64 up to 128 (and
    says so); splits inside a block are covered by the compressor chunking tests."""
    from server import Server

    args = ["--model-path", str(tiny_checkpoint), *SERVER_ARGS, "--chunked-prefill-size", "64"]
    srv = Server(args, tmp_path / "log")
    try:
        for n in (129, 300, 650):
            tokens, lp_in, lp_out = served_logprobs(srv.generate(prompt(n), DECODE))
            want_tokens, want_in, want_out = served_logprobs(solo[n])
            assert tokens == want_tokens
            diff = max(abs(a - b) for a, b in zip(lp_in + lp_out, want_in + want_out, strict=True))
            assert diff <= 1e-5, f"n={n}: chunked prefill moved logprobs by {diff:.2e}"
        assert "--chunked-prefill-size 64 rounded up to 128" in srv.log
        assert "#new-token: 128" in srv.log  # the prompts really were split
    finally:
        srv.stop()


@pytest.mark.server
def test_concurrent_requests_equal_solo(tiny_server, solo):
    tiny_server_flush(tiny_server)  # no prefix hits: this is about batching
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = {n: pool.submit(tiny_server.generate, prompt(n), DECODE) for n in PROMPT_LENS}
        results = {n: f.result() for n, f in futures.items()}
    for n in PROMPT_LENS:
        tokens, lp_in, lp_out = served_logprobs(results[n])
        want_tokens, want_in, want_out = served_logprobs(solo[n])
        assert tokens == want_tokens, f"n={n}"
        diff = max(abs(a - b) for a, b in zip(lp_in + lp_out, want_in + want_out, strict=True))
        assert diff <= 1e-5, f"n={n}: batching moved logprobs by {diff:.2e}"


@pytest.mark.server
def test_prefix_hit_at_block_boundary_is_identical(tiny_server, solo):
    """A repeat of the 650-token prompt reuses 640 cached tokens (5 blocks) and must give the
    same tokens and logprobs: entries, window and c4 block-end state come from the cache.
    (Input logprobs from position 0 would bypass the cache, so only output logprobs here.)"""
    tiny_server.generate(prompt(650), DECODE, logprob_start_len=-1)
    out = tiny_server.generate(prompt(650), DECODE, logprob_start_len=-1)
    assert out["meta_info"]["cached_tokens"] >= 640
    tokens, _, lp_out = served_logprobs(out)
    want_tokens, _, want_out = served_logprobs(solo[650])
    assert tokens == want_tokens
    assert max(abs(a - b) for a, b in zip(lp_out, want_out, strict=True)) <= 1e-5


@pytest.mark.server
def test_pool_is_empty_after_flush(tiny_server, solo):
    used = used_tokens(tiny_server.url)  # after a cache flush
    assert used == [0] * len(used), used


@pytest.mark.server
def test_overlong_prompt_gets_400_and_server_keeps_serving(tiny_server):
    r = requests.post(
        tiny_server.url + "/generate",
        json={"input_ids": prompt(4100), "sampling_params": {"max_new_tokens": 4}},
        timeout=120,
    )
    assert r.status_code == 400, r.text
    assert "context" in r.text.lower() or "longer" in r.text.lower(), r.text
    assert len(tiny_server.generate(prompt(5), 4)["output_ids"]) == 4


@pytest.mark.server
def test_invalid_config_fails_startup_naming_the_field(tiny_checkpoint, tmp_path):
    from server import launch_and_expect_failure

    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    config = json.loads((bad / "config.json").read_text())
    config["o_groups"] = 3
    (bad / "config.json").write_text(json.dumps(config))
    log = launch_and_expect_failure(["--model-path", str(bad), *SERVER_ARGS], tmp_path / "log")
    assert "o_groups" in log and "divisor of num_attention_heads" in log, log[-3000:]
