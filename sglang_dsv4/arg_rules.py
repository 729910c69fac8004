"""DSV4 rules for SGLang's server arguments that need no SGLang (the plugin's ``ServerArgs``
hook applies them; keeping them here keeps :mod:`sglang_dsv4.plugin` to the hooks).

* :func:`is_local_dsv4` / :func:`serves_dsv4`: which model paths are DSV4 (a local checkpoint
  whose ``config.json`` says ``deepseek_v4``, or a public DSV4 repo);
* :func:`whole_block_chunk_size`: SGLang asserts ``chunked_prefill_size % page_size == 0`` and a
  DSV4 page is a block (128 tokens, lcm of the compression ratios), so a finer chunk is rounded
  up to whole blocks instead of failing (chunking is exact: only the split points move);
* :func:`cpu_speculative_env`: what a CPU server that speculates needs in its environment;
* :func:`check_parallel`: the parallel layouts the DSV4 model serves (``--tp N`` with the
  dims it splits divisible by N; not expert parallelism, DP attention, pipeline parallelism or
  speculative decoding under TP), a clear startup error otherwise (docs/multi_gpu.md);
* :func:`check_speculative`: the packages SGLang's speculative workers import on CUDA;
* :func:`check_startup`: both checks, what the plugin's ``ServerArgs`` hook calls;
* :func:`cpu_tp_env`: what a CPU server with ``--tp N`` needs in its environment.
"""

import importlib.util
import json
import os
from pathlib import Path

from sglang_dsv4.embedded import PUBLIC

__all__ = [
    "BLOCK",
    "check_parallel",
    "check_speculative",
    "check_startup",
    "cpu_speculative_env",
    "cpu_tp_env",
    "is_local_dsv4",
    "serves_dsv4",
    "whole_block_chunk_size",
]

BLOCK = 128  # tokens per DSV4 page (lcm of the compression ratios 4 and 128)

# SGLang's speculative workers run Triton kernels with no CPU twin (slot assignment, draft cache
# locations) and torch.compile a helper (select_top_k_tokens), which compiles for minutes on
# CPU: in the server processes (spawned after this, inheriting the environment), Triton's
# interpreter and no dynamo.
_CPU_SPECULATIVE_ENV = {"TRITON_INTERPRET": "1", "TORCHDYNAMO_DISABLE": "1"}

# The cores of each rank of a CPU server with --tp N (cpu_tp_env)
_BIND = "SGLANG_CPU_OMP_THREADS_BIND"


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


def check_parallel(args) -> None:
    """Raise ``ValueError`` naming the flag when the parallel layout of server arguments
    ``args`` (SGLang's ``ServerArgs`` fields) is one the DSV4 model cannot serve; a local
    checkpoint's dims are checked against ``--tp`` here, a public repo's when the model is
    built (the same :func:`sglang_dsv4.model.tp.check_split`)."""
    tp = args.tp_size
    refused = {
        "--ep-size > 1 (routed experts are split by columns over the TP ranks instead)": (
            args.ep_size != 1 or args.moe_a2a_backend not in (None, "none")
        ),
        "--enable-dp-attention (attention is tensor-parallel)": args.enable_dp_attention,
        "--pp-size > 1": args.pp_size != 1,
        "speculative decoding with --tp > 1": tp > 1 and args.speculative_algorithm is not None,
    }
    for what, bad in refused.items():
        if bad:
            raise ValueError(f"DSV4 does not support {what} yet (docs/multi_gpu.md)")
    if tp > 1 and is_local_dsv4(args.model_path):
        from sglang_dsv4.config import DSV4Config
        from sglang_dsv4.model.tp import check_split

        check_split(DSV4Config.from_json(args.model_path), tp)


def check_speculative(args, find_spec=importlib.util.find_spec, cuda=None) -> None:
    """Raise ``ValueError`` when a CUDA server is asked to speculate without DeepGEMM: SGLang
    0.5.17's EAGLE worker (``speculative/eagle_worker_v2.py``, ``_capture_cuda_graphs``) imports
    ``layers.attention.dsa_backend``, which imports ``deep_gemm``, whatever the model; sglang
    depends on ``sgl-deep-gemm``, but an install without it (an offline wheelhouse) would fail
    deep in graph capture, after the weights load (seen on the H100, 2026-12-07)."""
    if args.speculative_algorithm is None or args.device == "cpu":
        return
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if cuda and find_spec("deep_gemm") is None:
        raise ValueError(
            f"--speculative-algorithm {args.speculative_algorithm} on CUDA needs deep_gemm "
            "(pip install sgl-deep-gemm==0.1.5.post1, a dependency of sglang 0.5.17): SGLang's "
            "speculative worker imports it when it captures the draft's CUDA graphs"
        )


def check_startup(args) -> None:
    """The startup checks of a DSV4 server's arguments: parallel layout, speculative packages."""
    check_parallel(args)
    check_speculative(args)


def cpu_tp_env(tp: int, environ=os.environ) -> dict[str, str]:
    """For ``--tp tp`` on CPU, set where the user did not: the cores of each rank
    (``SGLANG_CPU_OMP_THREADS_BIND``; SGLang otherwise wants one NUMA node per rank) split
    evenly from this process's cores (a core is shared when there are fewer than ranks).
    Returns the values in effect."""
    cores = sorted(os.sched_getaffinity(0))
    n = max(1, len(cores) // tp)
    ranks = [cores[(r * n) % len(cores) :][:n] for r in range(tp)]
    environ.setdefault(_BIND, "|".join(_cpu_list(c) for c in ranks))
    return {_BIND: environ[_BIND]}


def _cpu_list(cores: list[int]) -> str:
    """SGLang's spelling of a rank's cores: ``0``, ``0-3`` (contiguous) or ``0,2,5``."""
    if len(cores) == 1:
        return str(cores[0])
    if cores == list(range(cores[0], cores[-1] + 1)):
        return f"{cores[0]}-{cores[-1]}"
    return ",".join(map(str, cores))
