"""Prefix caching through the real server: SGLang's UnifiedRadixCache (full + swa components)
with page = block = 128; hits restore entries, window rows and c4 block-end state from the
cached pages (design: ``sglang_dsv4.mem``). Servers run with SGLang's strict idle memory check,
so any slot leak or double free stops the scheduler."""

import concurrent.futures

import pytest
import torch
from conftest import SERVER_ARGS

from sglang_dsv4.server_checks import used_tokens

DECODE = 16
STRICT = {"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"}


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(2, 1024, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(server, input_ids, n=DECODE) -> tuple[list[int], list[float], int]:
    out = server.generate(input_ids, n, logprob_start_len=-1)
    meta = out["meta_info"]
    return (
        out["output_ids"],
        [lp for lp, _, _ in meta["output_token_logprobs"]],
        meta["cached_tokens"],
    )


@pytest.fixture(scope="module")
def no_cache_server(tiny_checkpoint, tmp_path_factory):
    from server import Server

    log = tmp_path_factory.mktemp("logs") / "no_radix.log"
    args = ["--model-path", str(tiny_checkpoint), *SERVER_ARGS, "--disable-radix-cache"]
    srv = Server(args, log, env=STRICT)
    yield srv
    srv.stop()


@pytest.mark.server
@pytest.mark.parametrize("shared", [128, 129, 256, 300, 640, 650])
def test_shared_prefix_equals_no_cache(tiny_server, no_cache_server, shared):
    base = ids(700, seed=shared)
    first = base[:shared] + ids(40, seed=10_000 + shared)
    second = base[:shared] + ids(37, seed=20_000 + shared)
    run(tiny_server, first)
    tokens, lps, cached = run(tiny_server, second)
    assert cached == shared // 128 * 128, "hits land on the last block end inside the prefix"
    want_tokens, want_lps, _ = run(no_cache_server, second)
    assert tokens == want_tokens
    assert max(abs(a - b) for a, b in zip(lps, want_lps, strict=True)) <= 1e-6


@pytest.mark.server
def test_eight_requests_sharing_1000_tokens_hit_896(tiny_server):
    prefix = ids(1000, seed=7)
    run(tiny_server, prefix + ids(50, seed=100))
    suffixes = [ids(50, seed=101 + i) for i in range(7)]
    with concurrent.futures.ThreadPoolExecutor(7) as pool:
        cached = list(pool.map(lambda s: run(tiny_server, prefix + s)[2], suffixes))
    assert all(c >= 896 for c in cached), cached


@pytest.mark.server
def test_multi_turn_hits_previous_prompt_and_answer(tiny_server):
    turn1 = ids(300, seed=55)
    answer, _, _ = run(tiny_server, turn1, n=100)
    turn2 = turn1 + answer + ids(20, seed=56)
    _, _, cached = run(tiny_server, turn2)
    # the finished turn 1 (prompt + answer, 400 tokens) is cached up to its last full block
    assert cached == (300 + 100) // 128 * 128


@pytest.fixture(scope="module")
def wide_topk_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with ``index_topk`` above any visible entry count, so c4 layers attend
    every visible entry. Long decodes of a random model otherwise meet near-ties in the top-k
    (1e-7 apart) that a different chunking of the same math can flip; the exactness tests above
    keep the real top-k (16 of up to 162)."""
    import json

    path = tmp_path_factory.mktemp("wide_topk")
    for f in tiny_checkpoint.iterdir():
        (path / f.name).symlink_to(f)
    (path / "config.json").unlink()
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    config["index_topk"] = 4096
    (path / "config.json").write_text(json.dumps(config))
    return path


def _server(checkpoint, name: str, tmp_path_factory, total: int, *extra: str):
    from server import Server

    args = [a for a in SERVER_ARGS]
    args[args.index("--max-total-tokens") + 1] = str(total)
    args[args.index("--max-running-requests") + 1] = "32"
    log = tmp_path_factory.mktemp("logs") / f"{name}.log"
    return Server(["--model-path", str(checkpoint), *args, *extra], log, env=STRICT)


@pytest.fixture(scope="module")
def small_server(wide_topk_checkpoint, tmp_path_factory):
    """40 full pages (5120 slots) and 20 swa pages: room for about four 1200-token requests.
    Admission is made aggressive so that decode outgrows the pool and retracts."""
    tight = ["--schedule-conservativeness", "0.05", "--swa-full-tokens-ratio", "0.5"]
    srv = _server(wide_topk_checkpoint, "small", tmp_path_factory, 5120, *tight)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def solo_server(wide_topk_checkpoint, tmp_path_factory):
    srv = _server(wide_topk_checkpoint, "solo", tmp_path_factory, 32768, "--disable-radix-cache")
    yield srv
    srv.stop()


@pytest.mark.server
def test_pool_pressure_retracts_and_equals_solo(small_server, solo_server):
    prefix = ids(1040, seed=9)
    prompts = [prefix + ids(30, seed=200 + i) for i in range(32)]
    n_out = 100  # decode crosses a block end (1152), so running requests outgrow the pool

    def generate(p):  # 32 x 100 tokens on 2 cores: allow a slow machine
        return small_server.generate(p, n_out, logprob_start_len=-1, timeout=3000)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(generate, prompts))
    log = small_server.log
    assert "token usage: 1.00" in log, "the pool never ran full"
    assert "KV cache pool is full. Retract requests." in log, "nothing was retracted"
    assert all(len(r["output_ids"]) == n_out for r in results)
    # The reference: the same requests on a roomy pool without a prefix cache (batched: that
    # concurrency equals solo is tested in tests/model/test_deepseek_v4.py).
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        wants = list(pool.map(lambda p: run(solo_server, p, n=n_out), prompts))
    for r, (want_tokens, want_lps, _) in zip(results, wants, strict=True):
        lps = [lp for lp, _, _ in r["meta_info"]["output_token_logprobs"]]
        assert r["output_ids"] == want_tokens
        assert max(abs(a - b) for a, b in zip(lps, want_lps, strict=True)) <= 1e-5
    assert sum(used_tokens(small_server.url)) == 0  # after a flush: max(full, swa) slots


@pytest.mark.server
def test_evicted_prefix_recomputes_identically(small_server):
    old = ids(900, seed=31)
    first = run(small_server, old)
    for i in range(8):  # 8 x ~900 tokens > 5120 slots: the old prefix is evicted
        run(small_server, ids(900, seed=400 + i))
    again = run(small_server, old)
    assert again[0] == first[0]
    assert max(abs(a - b) for a, b in zip(again[1], first[1], strict=True)) <= 1e-5
    assert again[2] < 896  # it really was (at least partly) evicted
