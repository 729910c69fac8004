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
import os
from pathlib import Path

from sglang_dsv4.embedded import EMBEDDED_CONTEXT

__all__ = [
    "CPU_CONTEXT",
    "SMALL_CHECKPOINT_BYTES",
    "checkpoint_bytes",
    "cpu_context",
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
