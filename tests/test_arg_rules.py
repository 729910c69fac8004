"""DSV4 server-argument rules (``sglang_dsv4/arg_rules.py``), without SGLang."""

import json
from types import SimpleNamespace

import pytest

from sglang_dsv4.arg_rules import (
    BLOCK,
    check_parallel,
    check_speculative,
    check_startup,
    cpu_speculative_env,
    cpu_tp_env,
    is_local_dsv4,
    serves_dsv4,
    whole_block_chunk_size,
)
from sglang_dsv4.embedded import PUBLIC, embedded_checkpoint


@pytest.mark.parametrize(
    "config, expected",
    [
        ({"model_type": "deepseek_v4"}, True),
        ({"model_type": "deepseek_v3"}, False),
        ("{not json", False),
        (None, False),  # no config.json
    ],
)
def test_is_local_dsv4_reads_the_model_type(tmp_path, config, expected):
    if config is not None:
        text = config if isinstance(config, str) else json.dumps(config)
        (tmp_path / "config.json").write_text(text)
    assert is_local_dsv4(tmp_path) is expected
    assert is_local_dsv4(str(tmp_path)) is expected


def test_serves_dsv4_for_the_embedded_model_and_public_repos(tmp_path):
    assert serves_dsv4(str(embedded_checkpoint()))
    assert all(serves_dsv4(repo) for repo in PUBLIC.values())
    assert not serves_dsv4("Qwen/Qwen3-8B") and not serves_dsv4(str(tmp_path))


@pytest.mark.parametrize(
    "size, expected",
    [(None, None), (-1, None), (0, None), (BLOCK, None), (4 * BLOCK, None), (64, 128),
     (129, 256), (8191, 8192)],
)  # fmt: skip
def test_whole_block_chunk_size_rounds_up_to_blocks(size, expected):
    assert whole_block_chunk_size(size) == expected


def test_cpu_speculative_env_keeps_user_values():
    env = {"TRITON_INTERPRET": "0"}
    assert cpu_speculative_env(env) == {"TRITON_INTERPRET": "0", "TORCHDYNAMO_DISABLE": "1"}
    assert env == {"TRITON_INTERPRET": "0", "TORCHDYNAMO_DISABLE": "1"}
    assert cpu_speculative_env({}) == {"TRITON_INTERPRET": "1", "TORCHDYNAMO_DISABLE": "1"}


def _args(model_path, **kw):
    """The ServerArgs fields :func:`check_parallel` reads, SGLang's defaults unless given."""
    base = dict(
        tp_size=1,
        ep_size=1,
        moe_a2a_backend="none",
        enable_dp_attention=False,
        pp_size=1,
        speculative_algorithm=None,
        model_path=str(model_path),
        device=None,
    )
    return SimpleNamespace(**{**base, **kw})


def test_check_parallel_accepts_tp_that_divides_the_model():
    tiny = embedded_checkpoint()  # 4 heads, 2 output groups, expert width 128
    check_parallel(_args(tiny))
    check_parallel(_args(tiny, tp_size=2))
    check_parallel(_args(PUBLIC["dsv4-flash"], tp_size=8))  # remote: checked when built


@pytest.mark.parametrize(
    "flags, named",
    [
        ({"tp_size": 4}, "o_groups = 2 is not divisible"),
        ({"tp_size": 3}, "num_attention_heads = 4 is not divisible"),
        ({"tp_size": 2, "ep_size": 2}, "--ep-size"),
        ({"tp_size": 2, "moe_a2a_backend": "deepep"}, "--ep-size"),
        ({"tp_size": 2, "enable_dp_attention": True}, "--enable-dp-attention"),
        ({"pp_size": 2}, "--pp-size"),
        ({"tp_size": 2, "speculative_algorithm": "EAGLE"}, "speculative decoding with --tp"),
    ],
)
def test_check_parallel_refuses_with_the_reason(flags, named):
    with pytest.raises(ValueError, match=named):
        check_parallel(_args(embedded_checkpoint(), **flags))


def test_check_parallel_leaves_speculation_at_one_rank():
    check_parallel(_args(embedded_checkpoint(), speculative_algorithm="EAGLE"))


def test_cpu_tp_env_splits_the_cores_and_keeps_user_values():
    cores = sorted(__import__("os").sched_getaffinity(0))
    env = {}
    bind = cpu_tp_env(2, env)["SGLANG_CPU_OMP_THREADS_BIND"]
    ranks = bind.split("|")
    assert len(ranks) == 2 and env["SGLANG_CPU_OMP_THREADS_BIND"] == bind
    if len(cores) >= 2:  # each rank its own cores
        assert ranks[0] != ranks[1]
    assert cpu_tp_env(2, {"SGLANG_CPU_OMP_THREADS_BIND": "0-3|4-7"}) == {
        "SGLANG_CPU_OMP_THREADS_BIND": "0-3|4-7"
    }


def test_check_speculative_needs_deep_gemm_on_cuda():
    spec = _args(embedded_checkpoint(), speculative_algorithm="EAGLE")
    missing = {"deep_gemm": None}.get  # find_spec that finds nothing
    with pytest.raises(ValueError, match="sgl-deep-gemm"):
        check_speculative(spec, find_spec=missing, cuda=True)
    check_speculative(spec, find_spec=lambda name: object(), cuda=True)  # installed
    check_speculative(spec, find_spec=missing, cuda=False)  # no CUDA: the CPU path
    check_speculative(_args(embedded_checkpoint(), speculative_algorithm="EAGLE", device="cpu"),
                      find_spec=missing, cuda=True)  # fmt: skip
    check_speculative(_args(embedded_checkpoint()), find_spec=missing, cuda=True)  # no spec


def test_check_startup_runs_the_parallel_rules():
    with pytest.raises(ValueError, match="--pp-size"):
        check_startup(_args(embedded_checkpoint(), pp_size=2))
