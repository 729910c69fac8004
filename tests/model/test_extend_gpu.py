"""On the GPU the extend path runs as batched kernels over the pools' rows (FP8 by default):
a chunked prefill (several chunk sizes) and an extend over a cached prefix give the same greedy
tokens, and logprobs within the FP8 / bf16 noise, as one full prefill of the same prompt.

The embedded trained model (``--model dsv4``, peaked next-token distributions, so greedy tokens
are stable under rounding) in bf16; Shakespeare text from the eval data as prompts."""

import pytest
import requests
from conftest import SERVER_ARGS

from sglang_dsv4.embedded import embedded_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.server]

DECODE = 16
PROMPT_LENS = (700, 2100)
# logprob tolerances: the runs differ only in GEMM shapes and summation order (bf16 / FP8 rows)
MAX_OUT_DLOGPROB = 0.1
MEAN_IN_DLOGPROB = 0.02


def _args(chunk: int) -> list[str]:
    drop = {"--dtype", "float32", "--skip-tokenizer-init", "--context-length", "4096"}
    base = [a for a in SERVER_ARGS if a not in drop]
    return ["--model", "dsv4", "--dtype", "bfloat16", *base, "--context-length", "8192",
            "--chunked-prefill-size", str(chunk), "--cuda-graph-max-bs", "4"]  # fmt: skip


def _prompt(n: int) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(embedded_checkpoint() / "tokenizer.json"))
    text = (embedded_checkpoint().parent.parent / "evals" / "data" / "test_plays.txt").read_text()
    ids = tok.encode(text).ids
    assert len(ids) >= n
    return ids[:n]


def _run(server, ids, start: int = 0) -> tuple[list[int], list[float], list[float], int]:
    """(greedy tokens, input logprobs from ``start`` (-1: none; a cache hit needs it), output
    logprobs, cached tokens)."""
    out = server.generate(ids, DECODE, logprob_start_len=start)
    meta = out["meta_info"]
    lp_in = [lp for lp, _, _ in meta["input_token_logprobs"][1:]]
    lp_out = [lp for lp, _, _ in meta["output_token_logprobs"]]
    return out["output_ids"], lp_in, lp_out, meta["cached_tokens"]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """One prefill per prompt (chunk size above the longest prompt), no cache hits."""
    from server import Server

    srv = Server(_args(8192), tmp_path_factory.mktemp("logs") / "full.log", timeout=600)
    results = {}
    for n in PROMPT_LENS:
        requests.post(srv.url + "/flush_cache", timeout=60).raise_for_status()
        results[n] = _run(srv, _prompt(n))
        assert results[n][3] == 0
    yield srv, results
    srv.stop()


def _close(got, want, what: str) -> None:
    tokens, lp_in, lp_out, _ = got
    w_tokens, w_in, w_out, _ = want
    assert tokens == w_tokens, f"{what}: greedy tokens differ"
    d_out = max(abs(a - b) for a, b in zip(lp_out, w_out, strict=True))
    assert d_out <= MAX_OUT_DLOGPROB, f"{what}: output logprobs moved by {d_out:.2e}"
    if lp_in:  # every prompt position (runs without a cache hit)
        d_in = sum(abs(a - b) for a, b in zip(lp_in, w_in, strict=True)) / len(lp_in)
        assert d_in <= MEAN_IN_DLOGPROB, f"{what}: input logprobs moved by {d_in:.2e} (mean)"


@pytest.mark.parametrize("chunk", [128, 384, 1024])
def test_chunked_prefill_equals_full_prefill(full, chunk, tmp_path):
    from server import Server

    _, want = full
    srv = Server(_args(chunk), tmp_path / "log", timeout=600)
    try:
        for n in PROMPT_LENS:
            requests.post(srv.url + "/flush_cache", timeout=60).raise_for_status()
            _close(_run(srv, _prompt(n)), want[n], f"chunk {chunk}, {n} tokens")
        assert f"#new-token: {chunk}" in srv.log  # the prompts really were split
    finally:
        srv.stop()


def test_extend_over_cached_prefix_equals_full_prefill(full):
    srv, want = full
    for n in PROMPT_LENS:
        ids = _prompt(n)
        requests.post(srv.url + "/flush_cache", timeout=60).raise_for_status()
        srv.generate(ids[: n - 300], 1, logprob_start_len=-1)  # caches the prefix's blocks
        got = _run(srv, ids, start=-1)
        assert got[3] == (n - 300) // 128 * 128, "the hit lands on the prefix's last block end"
        _close(got, want[n], f"{n} tokens over a {got[3]}-token cached prefix")
