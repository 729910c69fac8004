"""The side-by-side benchmark's cells, run order, medians and pool capacity.

A *cell* is one (input length, batch size) shape of ``sglang.bench_one_batch_server``'s
``run_one_case`` (random token ids, ``output_len`` tokens out, prefix cache flushed before each
case). :func:`measure` runs an untimed warm pass over every cell first (JIT compilation of new
shapes, first CUDA-graph replays), then the timed repeats round-robin over the cells, so that a
deadline cuts repeats evenly instead of dropping whole cells. The time a run takes is known from
the warm pass; a run that would end past the deadline is skipped and says so.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "METRICS",
    "Cell",
    "capacity",
    "capacity_log_lines",
    "context_length",
    "does_not_fit",
    "logged_kv_dtype",
    "measure",
    "parse_cells",
    "summarize",
]

# the three numbers per run: bench_one_batch_server's output_throughput (batch * output_len /
# (latency - last_ttft)), last_ttft (the whole batch prefilled) and input_throughput
METRICS = ("decode_tok_s", "ttft_s", "prefill_tok_s")


@dataclass(frozen=True, order=True)
class Cell:
    input_len: int
    batch_size: int

    @property
    def key(self) -> str:
        return f"{self.input_len}x{self.batch_size}"


def _length(text: str) -> int:
    m = re.fullmatch(r"(\d+)([kK]?)", text.strip())
    if not m:
        raise ValueError(f"bad length {text!r}: an integer, or with a K suffix (4K = 4096)")
    return int(m.group(1)) * (1024 if m.group(2) else 1)


def parse_cells(text: str) -> list[Cell]:
    """``"4096x1,4096x32,32Kx1"`` -> cells (input length x batch size), in the given order."""
    cells = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        parts = item.lower().split("x")
        if len(parts) != 2:
            raise ValueError(f"bad cell {item!r}: expected INPUTxBATCH, e.g. 4096x32")
        cell = Cell(_length(parts[0]), _length(parts[1]))
        if cell.input_len < 1 or cell.batch_size < 1:
            raise ValueError(f"bad cell {item!r}: input length and batch size must be >= 1")
        if cell in cells:
            raise ValueError(f"cell {item!r} given twice")
        cells.append(cell)
    if not cells:
        raise ValueError("no cells given")
    return cells


def context_length(cells: list[Cell], output_len: int, minimum: int = 8192) -> int:
    """The server context for these cells: the longest prompt + output + 1, in whole 1024-token
    units (256-token pages for SGLang's native path), at least ``minimum``. Our decode graphs size
    their entry lists by the context, so it is kept no larger than the cells need."""
    need = max(c.input_len for c in cells) + output_len + 1
    return max(minimum, -(-need // 1024) * 1024)


def capacity(server_info: dict) -> dict:
    """Pool capacity and the settings it depends on, from ``GET /server_info``."""
    state = (server_info.get("internal_states") or [{}])[0]
    usage = state.get("memory_usage", {})
    keys = (
        "mem_fraction_static",
        "page_size",
        "kv_cache_dtype",
        "swa_full_tokens_ratio",
        "context_length",
        "chunked_prefill_size",
        "max_running_requests",
        "attention_backend",
    )
    out = {k: server_info.get(k) for k in keys}
    out |= {
        "max_total_num_tokens": server_info.get("max_total_num_tokens"),
        "token_capacity": usage.get("token_capacity"),
        "token_capacity_swa": usage.get("token_capacity_swa"),
        "kvcache_gb": usage.get("kvcache"),
        "weight_gb": usage.get("weight"),
        "startup_available_gb": usage.get("startup_available"),
        "cuda_graph_gb": sum((usage.get("graph") or {}).values()),
        "max_running_requests_effective": state.get("effective_max_running_requests_per_dp"),
    }
    return out


_CAPACITY_LOG = re.compile(
    r"max_total_num_tokens=|KV Cache is allocated|#tokens|token_capacity|sglang-dsv4 active"
    r"|swa_full_tokens_ratio to|page_size to|Memory pool end|pool size|full tokens"
    r"|DeepSeekV4TokenToKVPool|kv.cache.dtype|sglang-dsv4 pools",
    re.IGNORECASE,
)


def capacity_log_lines(log: str, limit: int = 20) -> list[str]:
    """The startup-log lines that state what the pools were sized to (both servers print
    ``max_total_num_tokens=...``; the rest differs by implementation), without the huge
    ``server_args=`` dump."""
    lines = [ln.strip() for ln in log.splitlines() if _CAPACITY_LOG.search(ln)]
    return [ln[:400] for ln in lines if "server_args=ServerArgs" not in ln][:limit]


def logged_kv_dtype(lines: list[str]) -> str | None:
    """The pool dtype a server logged (``KV Cache is allocated. dtype: torch.float8_e4m3fn``):
    our plugin's pools do not follow ``--kv-cache-dtype``, so /server_info's value can differ.
    Ours first: SGLang's line reports our pool's compute dtype (bfloat16) over FP8 rows."""
    for ln in lines:
        m = re.search(r"sglang-dsv4 pools: (\w+) rows", ln)
        if m:
            return f"{m.group(1)} rows"
    for ln in lines:
        m = re.search(r"dtype: torch\.(\w+)", ln)
        if m:
            return m.group(1)
    return None


def does_not_fit(cell: Cell, output_len: int, cap: dict) -> str | None:
    """Why the server cannot run this cell as one batch (None when it can): more requests than
    it runs at once, or more tokens than the pool holds. bench_one_batch_server skips such cells
    silently; here they are reported."""
    running = cap.get("max_running_requests_effective")
    if running and cell.batch_size > running:
        return f"batch {cell.batch_size} > max running requests {running}"
    tokens = cell.batch_size * (cell.input_len + output_len)
    pool = cap.get("token_capacity") or cap.get("max_total_num_tokens")
    if pool and tokens > pool:
        return f"{tokens} tokens > pool capacity {pool}"
    return None


def summarize(runs: list[dict]) -> dict:
    """Median (and min / max) of each metric over the timed runs that succeeded."""
    ok = [r for r in runs if "error" not in r]
    out = {"n": len(ok)}
    for m in METRICS:
        values = [r[m] for r in ok]
        out[m] = statistics.median(values) if values else None
        out[f"{m}_min"] = min(values) if values else None
        out[f"{m}_max"] = max(values) if values else None
    return out


def measure(
    cells: list[Cell],
    repeats: int,
    run_case: Callable[[Cell], dict],
    deadline: float | None = None,
    warm: bool = True,
    margin_s: float = 5.0,
    on_update: Callable[[dict], None] | None = None,
    clock: Callable[[], float] = time.time,
) -> dict:
    """Warm pass, then ``repeats`` timed passes over ``cells``; returns ``{cell.key: record}``
    with the warm run, the timed runs, their summary and any skips. ``run_case(cell)`` returns
    one run's metrics (raising on failure: recorded as the run's error, the next run goes on).
    A run is skipped when ``clock() + (its last duration) + margin_s`` passes ``deadline``.
    ``on_update(records)`` is called after every run (the caller writes its JSON there, so a
    call killed at its time limit still leaves what it measured)."""
    records = {
        c.key: {"input_len": c.input_len, "batch_size": c.batch_size, "runs": [], "skipped": []}
        for c in cells
    }
    last_s = {}
    passes = (["warm"] if warm else []) + [f"run {i + 1}" for i in range(repeats)]
    for label in passes:
        for cell in cells:
            rec = records[cell.key]
            if deadline is not None and clock() + last_s.get(cell, 0.0) + margin_s > deadline:
                rec["skipped"].append(f"{label}: deadline ({last_s.get(cell, 0.0):.0f} s run)")
                continue
            t0 = clock()
            try:
                row = run_case(cell)
            except Exception as e:  # one failed run must not hide the other cells' numbers
                row = {"error": f"{type(e).__name__}: {e}"[:2000]}
            last_s[cell] = row["wall_s"] = clock() - t0
            if label == "warm":
                rec["warm"] = row
            else:
                rec["runs"].append(row)
            rec["summary"] = summarize(rec["runs"])
            if on_update is not None:
                on_update(records)
    for rec in records.values():
        rec.setdefault("summary", summarize(rec["runs"]))
    return records
