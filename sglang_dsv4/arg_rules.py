"""DSV4 rules for SGLang's server arguments that need no SGLang (the plugin's ``ServerArgs``
hook applies them; keeping them here keeps :mod:`sglang_dsv4.plugin` to the hooks).

* :func:`is_local_dsv4` / :func:`serves_dsv4`: which model paths are DSV4 (a local checkpoint
  whose ``config.json`` says ``deepseek_v4``, or a public DSV4 repo);
* :func:`whole_block_chunk_size`: SGLang asserts ``chunked_prefill_size % page_size == 0`` and a
  DSV4 page is a block (128 tokens, lcm of the compression ratios), so a finer chunk is rounded
  up to whole blocks instead of failing (chunking is exact: only the split points move);
* :func:`cpu_speculative_env`: what a CPU server that speculates needs in its environment.
"""

import json
import os
from pathlib import Path

from sglang_dsv4.embedded import PUBLIC

__all__ = ["BLOCK", "cpu_speculative_env", "is_local_dsv4", "serves_dsv4", "whole_block_chunk_size"]

BLOCK = 128  # tokens per DSV4 page (lcm of the compression ratios 4 and 128)

# SGLang's speculative workers run Triton kernels with no CPU twin (slot assignment, draft cache
# locations) and torch.compile a helper (select_top_k_tokens), which compiles for minutes on
# CPU: in the server processes (spawned after this, inheriting the environment), Triton's
# interpreter and no dynamo.
_CPU_SPECULATIVE_ENV = {"TRITON_INTERPRET": "1", "TORCHDYNAMO_DISABLE": "1"}


def is_local_dsv4(path) -> bool:
    """``path`` is a directory whose ``config.json`` has ``model_type`` ``deepseek_v4``."""
    config = Path(str(path)) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "deepseek_v4"
    except (OSError, ValueError):
        return False


def serves_dsv4(model_path) -> bool:
    """A resolved model path serves DSV4: a local DSV4 checkpoint or a public DSV4 repo."""
    return model_path in PUBLIC.values() or is_local_dsv4(model_path)


def whole_block_chunk_size(size: int | None) -> int | None:
    """``size`` rounded up to whole blocks; ``None`` when it needs no change (unset, <= 0 for
    no chunking, or already whole blocks)."""
    if size is None or size <= 0 or size % BLOCK == 0:
        return None
    return -(-size // BLOCK) * BLOCK


def cpu_speculative_env(environ=os.environ) -> dict[str, str]:
    """Set the environment a CPU server that speculates needs where the user did not; returns
    the values in effect."""
    for key, value in _CPU_SPECULATIVE_ENV.items():
        environ.setdefault(key, value)
    return {key: environ[key] for key in _CPU_SPECULATIVE_ENV}
