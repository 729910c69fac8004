"""Serving defaults for a DSV4 model on CPU (no SGLang here: the plugin applies them; user flags
and ``OMP_NUM_THREADS`` win).

* Context length: the embedded model's training length (:data:`EMBEDDED_CONTEXT`); any other
  checkpoint gets at most :data:`CPU_CONTEXT` tokens instead of its config's
  ``max_position_embeddings`` (1M for the released models), because the CPU pool holds
  ``context x requests`` token slots (``mem.sizing.cpu_token_cap``).
* Torch threads: one for a small checkpoint (under :data:`SMALL_CHECKPOINT_BYTES` of weights).
  Its ops are too small to gain from splitting, and on a machine whose cores are shared,
  OpenMP's barriers wait for every thread of a parallel region to be scheduled: a 16-token
  completion took 35-43 s with two threads at load average 11 on the 2-core CI machine and
  1.3 s with one (docs/newcomer.md).
* Processes: with one thread per process the scheduler and detokenizer can be forked from the
  launcher instead of spawned, so they do not import SGLang and torch again (GNU OpenMP does
  not survive a fork once the parent ran a parallel region with several threads, so larger
  checkpoints keep SGLang's ``spawn``).
"""

import json
import logging
import os
from pathlib import Path

from sglang_dsv4.embedded import EMBEDDED_CONTEXT

logger = logging.getLogger(__name__)

__all__ = [
    "CPU_CONTEXT",
    "SMALL_CHECKPOINT_BYTES",
    "checkpoint_bytes",
    "cpu_context",
    "cpu_defaults",
    "cpu_threads",
]

CPU_CONTEXT = 8192
SMALL_CHECKPOINT_BYTES = 1 << 30


def checkpoint_bytes(model_path: str) -> int | None:
    """Bytes of safetensors weights in a local checkpoint directory (None: not local)."""
    path = Path(model_path)
    if not path.is_dir():
        return None
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def cpu_context(model_path: str, embedded: bool) -> tuple[int, str]:
    """(context length, why) for a CPU server started without ``--context-length``."""
    if embedded:
        return EMBEDDED_CONTEXT, "the embedded model's training length"
    limit = _max_positions(model_path)
    if limit is not None and limit <= CPU_CONTEXT:
        return limit, "the checkpoint's max_position_embeddings"
    allows = f"the checkpoint allows {limit}" if limit else "no local config.json"
    return CPU_CONTEXT, f"DSV4 CPU default ({allows}; --context-length to change)"


def cpu_defaults(args, embedded: bool) -> str | None:
    """CPU serving defaults a laptop can hold (user flags win), set on SGLang's ``ServerArgs``
    ``args``: no CPU graphs (our decode path is captured by CUDA graphs on GPU only), the
    embedded model's trained context (another checkpoint: at most :data:`CPU_CONTEXT`) instead
    of the config's 1M, and a few requests at once; the pool is then sized from context x
    requests (``mem.sizing.cpu_token_cap``), not from free RAM. Returns the note on the context
    length it chose (None: the user set one)."""
    from sglang_dsv4.mem.sizing import CPU_MAX_RUNNING_REQUESTS

    note = None
    if args.cuda_graph_backend_decode is None and args.cuda_graph_config is None:
        args.cuda_graph_backend_decode = "disabled"
    if args.context_length is None:
        args.context_length, why = cpu_context(args.model_path, embedded)
        note = f"context length {args.context_length} ({why})"
    if args.max_running_requests is None:
        args.max_running_requests = CPU_MAX_RUNNING_REQUESTS
    if args.tp_size > 1:
        from sglang_dsv4.arg_rules import cpu_tp_env

        logger.info("DSV4 --tp %d on CPU (gloo): %s", args.tp_size, cpu_tp_env(args.tp_size))
    if args.speculative_algorithm is not None:
        from sglang_dsv4.arg_rules import cpu_speculative_env

        env = cpu_speculative_env()
        logger.info("DSV4 speculative decoding on CPU: %s (sglang_dsv4.arg_rules)", env)
    return note


def cpu_threads(model_path: str, environ=os.environ) -> int | None:
    """Torch threads per server process on CPU: 1 for a small local checkpoint, ``None`` to
    keep torch's default (``OMP_NUM_THREADS`` set, a large or a remote checkpoint)."""
    if "OMP_NUM_THREADS" in environ:
        return 1 if environ["OMP_NUM_THREADS"].strip() == "1" else None
    size = checkpoint_bytes(model_path)
    return 1 if size is not None and size < SMALL_CHECKPOINT_BYTES else None


def _max_positions(model_path: str) -> int | None:
    config = Path(model_path) / "config.json"
    try:
        return json.loads(config.read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        return None
