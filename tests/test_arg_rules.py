"""DSV4 server-argument rules (``sglang_dsv4/arg_rules.py``), without SGLang."""

import json

import pytest

from sglang_dsv4.arg_rules import (
    BLOCK,
    cpu_speculative_env,
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
