"""Host microseconds of the attention backend's per-step work (one command, CPU or GPU).

    python scripts/bench_plan_host.py [--device cpu|cuda] [--reps N] [--profile CASE]
        [--contexts 4096,32768,131072] [--decode-bs 1,32,128] [--extend 2x4096,1x8192+24576]

What SGLang's model runner calls on our backend per step, timed on the host, per context length
``C`` (the server's ``--context-length``: request slot width, the captured graphs' pages; decode
requests sit at position ``C - 2``, their longest):

* ``decode-replay C bsN``: ``init_forward_metadata_out_graph(fb_view)`` before a CUDA-graph
  replay (SGLang's ``DecodeCudaGraphRunner.replay_prepare``; the graph of that size captured
  first);
* ``decode-capture C bsN``: the same call at capture (plans the graph's kernels: once per graph
  size at start-up, not per step);
* ``decode-eager C bsN``: ``init_forward_metadata(fb)`` of an eager decode step (plan + the
  step's metadata: the torch twin's ~45 ops on CPU, one kernel launch on the GPU);
* ``extend BxN`` / ``BxN+P``: ``init_forward_metadata(fb)`` of an extend batch of ``B`` fresh
  prompts of ``N`` tokens / chunks of ``N`` after ``P`` cached tokens (``plan_batch`` + every
  wrapper's ``plan()``; the first context only), the request slots on the host as the plugin
  gives them (``SlottedLens``: the served plan, no device read);
* ``alloc-decode C bsN``: our allocator's ``alloc_decode`` (``DSV4SWAAllocator``, what SGLang's
  ``alloc_for_decode`` calls every decode step: our free-page check, then SGLang's hybrid-SWA
  allocation: full and swa slots, the full -> swa map), every request mid-page (no new page,
  127 of 128 steps), on the device (the Triton path on CUDA, the torch path on CPU).

The backend is built as SGLang builds it (``DSV4AttnBackend(model_runner)``) over real DSV4 pools
of the tiny config (``configs/tiny-6l.json``: SWA, SWA, CSA, HCA, CSA, HCA; host work does not
depend on head dims), fp32 rows on CPU, FP8 rows + kernels on CUDA. Each call's wall time is
taken on its own (median of ``--reps``); on CUDA the device is synchronized outside the timed
region, and the host syncs a call makes are counted (``torch.cuda.set_sync_debug_mode``).
Per call also: the torch ops it dispatches, of them the host ops (no GPU tensor in or out: index
tensors built on the host; on a CPU run every op is one), and the host -> device copies
(``mem.h2d.to_device`` calls: one queued copy each on the GPU) with their bytes.
On CUDA, ``graph-replay N nodes`` times ``CUDAGraph.replay()`` of a graph of ``N`` tiny kernels
(the launch of a captured decode step, unprofiled). ``--profile CASE`` prints cProfile's top
functions of that case. Output: a table, and ``bench_plan_host.json`` in ``--out`` (default
``$OUT`` or ``.``).
"""

import argparse
import cProfile
import functools
import itertools
import os
import pstats
import statistics
import sys
import time
import warnings
from types import SimpleNamespace

import torch
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from sglang_dsv4.attention.backend import DSV4AttnBackend
from sglang_dsv4.attention.plan_facts import SlottedLens
from sglang_dsv4.config import load_config
from sglang_dsv4.mem import h2d
from sglang_dsv4.mem.pools import DSV4KVPool
from sglang_dsv4.mem.schema import CacheSchema, EntryFormat
from sglang_dsv4.perf.timing import capture, write_json

CONTEXTS = "8192"  # tokens per request slot (req_to_token width, the graphs' page count)
DECODE_BS = "1,32,128"
EXTEND_CASES = "2x4096,16x4096"


class Host:
    """A backend over DSV4 pools sized for ``n_req`` requests of ``context`` tokens."""

    def __init__(self, cfg, n_req: int, device: str, context: int):
        block = cfg.block_size
        fmt = EntryFormat.FP32 if device == "cpu" else EntryFormat.FP8
        schema = CacheSchema.from_config(cfg, fmt)
        n_full, n_swa = n_req * context, n_req * 4 * block
        row_dtype = torch.float32 if device == "cpu" else torch.bfloat16
        self.pool = DSV4KVPool(schema, n_full, n_swa, n_req, row_dtype, device)
        # full slot f -> swa slot block + f mod n_swa (never page 0): a request's recent tokens
        # are resident, as under SGLang's swa eviction
        full = torch.arange(n_full + block)
        swa = torch.where(full >= block, block + (full - block) % n_swa, 0)
        self.pool.register_mapping(torch.cat([swa, torch.tensor([-1])]).to(device))
        # request r owns full slots block + r * context .. (page 0 is SGLang's dummy page)
        rtt = block + torch.arange(n_req).unsqueeze(1) * context + torch.arange(context)
        rtt = rtt.clamp(max=n_full + block - 1)
        self.rtp = SimpleNamespace(
            req_to_token=rtt.int().to(device), req_generation=torch.ones(n_req, dtype=torch.long)
        )
        runner = SimpleNamespace(
            token_to_kv_pool=self.pool,
            req_to_token_pool=self.rtp,
            model=SimpleNamespace(cfg=cfg),
            model_config=SimpleNamespace(context_len=context),
            token_to_kv_pool_allocator=SimpleNamespace(),
            server_args=SimpleNamespace(speculative_algorithm=None),  # no verify journal
            is_draft_worker=False,
        )
        self.backend = DSV4AttnBackend(runner)
        self.device = device

    def decode_batch(self, bs: int, seq: int) -> SimpleNamespace:
        """A decode batch of ``bs`` requests at length ``seq`` (the new token's slot included),
        shaped like SGLang's graph-runner view (``build_replay_fb_view``)."""
        dev = self.device
        slots = torch.arange(bs, device=dev)
        positions = torch.full((bs,), seq - 1, dtype=torch.long, device=dev)
        return SimpleNamespace(
            batch_size=bs,
            forward_mode=ForwardMode.DECODE,
            req_pool_indices=slots,
            seq_lens=positions + 1,
            seq_lens_cpu=torch.full((bs,), seq, dtype=torch.int32),
            positions=positions,
            out_cache_loc=self.rtp.req_to_token[slots, seq - 1].long(),
            spec_info=None,
        )

    def extend_batch(self, b: int, n: int, prefix: int = 0) -> SimpleNamespace:
        """``b`` prompts of ``n`` new tokens after ``prefix`` cached ones (a chunk of a longer
        prompt; 0: fresh), as ``ForwardBatch.init_new`` builds them, with the request slots on
        the host as the plugin's hook leaves them (``SlottedLens``: the served plan, no read)."""
        dev = self.device
        slots = torch.arange(b, device=dev)
        seq = prefix + n
        locs = self.rtp.req_to_token[:b, prefix:seq].long().flatten()
        return SimpleNamespace(
            batch_size=b,
            forward_mode=ForwardMode.EXTEND,
            req_pool_indices=slots,
            seq_lens=torch.full((b,), seq, device=dev),
            seq_lens_cpu=torch.full((b,), seq, dtype=torch.int64),
            extend_prefix_lens=torch.full((b,), prefix, dtype=torch.int32, device=dev),
            extend_prefix_lens_cpu=SlottedLens([prefix] * b, list(range(b))),
            extend_seq_lens=torch.full((b,), n, dtype=torch.int32, device=dev),
            extend_seq_lens_cpu=[n] * b,
            positions=torch.arange(prefix, seq, device=dev).repeat(b),
            out_cache_loc=locs,
            spec_info=None,
        )


class _CountOps(TorchDispatchMode):
    """Counts the torch ops a call dispatches (each a kernel launch on the GPU, ~5-10 us of
    host time; views included), and of them the host ops: no tensor on a GPU among their
    inputs and outputs (tensors built on the host from host facts; on a CPU run every op)."""

    def __init__(self):
        super().__init__()
        self.n = self.host = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.n += 1
        tensors = [
            t for t in pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)
        ]
        self.host += not any(t.device.type != "cpu" for t in tensors)
        return out


class _CountCopies:
    """Counts ``mem.h2d.to_device`` calls (host -> device copies of host-built tensors; on a CPU
    run the calls the GPU would copy) and their bytes, wherever a module imported it."""

    def __init__(self):
        self.n = self.bytes = 0
        self._orig = h2d.to_device
        for mod in list(sys.modules.values()):
            if getattr(mod, "__name__", "").startswith("sglang_dsv4") and (
                getattr(mod, "to_device", None) is self._orig
            ):
                mod.to_device = self._count

    def _count(self, host, device):
        self.n += 1
        self.bytes += host.numel() * host.element_size()
        return self._orig(host, device)


def time_calls(fn, reps: int, device: str, copies: _CountCopies) -> dict:
    """Median / min host microseconds of ``fn()``, torch ops per call (all, and host ops),
    host -> device copies and bytes per call, and host syncs per call (CUDA only)."""
    fn()  # warm: lazy imports, Triton compiles
    n, nbytes = copies.n, copies.bytes
    with _CountOps() as ops:
        fn()
    h2d_n, h2d_bytes = copies.n - n, copies.bytes - nbytes
    us, syncs = [], 0
    for _ in range(reps):
        if device != "cpu":
            torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if device != "cpu":
                torch.cuda.set_sync_debug_mode("warn")
            t = time.perf_counter()
            fn()
            dt = time.perf_counter() - t
            if device != "cpu":
                torch.cuda.set_sync_debug_mode("default")
        syncs += sum("synchroniz" in str(w.message) for w in caught)
        us.append(dt * 1e6)
    return {
        "median_us": statistics.median(us),
        "min_us": min(us),
        "torch_ops": ops.n,
        "host_ops": ops.host,
        "h2d_copies": h2d_n,
        "h2d_bytes": h2d_bytes,
        "syncs_per_call": syncs / reps,
    }


def cases(cfg, device: str, contexts: list[int], decode_bs: list[int], extend: list):
    """(name, callable) of every timed case; decode graphs of each size captured first."""
    for i, context in enumerate(contexts):
        first = extend and not i  # the extend cases run at the first context only
        n_req = max(*decode_bs, *(b for b, _, _ in extend)) if first else max(decode_bs)
        host = Host(cfg, n_req, device, context)
        yield from _decode_cases(host, context, decode_bs)
        yield from _alloc_cases(host, context, decode_bs)
        for b, n, prefix in extend if first else ():
            fb = host.extend_batch(b, n, prefix)
            name = f"extend {b}x{n}" + (f"+{prefix}" if prefix else "")
            yield name, functools.partial(host.backend.init_forward_metadata, fb)
        del host  # the next context's pools replace these


def _extend_cases(text: str) -> list[tuple[int, int, int]]:
    """``BxN`` (``B`` fresh prompts of ``N`` tokens) or ``BxN+P`` (chunks of ``N`` after ``P``
    cached tokens), comma-separated."""
    out = []
    for case in filter(None, text.split(",")):
        size, _, prefix = case.partition("+")
        b, n = size.split("x")
        out.append((int(b), int(n), int(prefix or 0)))
    return out


def _decode_cases(host: Host, context: int, decode_bs: list[int]):
    """A decode step's host work at ``context``: the requests at their last position."""
    backend, seq = host.backend, context - 1
    backend.init_cuda_graph_state(max(decode_bs), max(decode_bs))
    for bs in decode_bs:
        fb = host.decode_batch(bs, seq)
        capture = functools.partial(backend.init_forward_metadata_out_graph, fb, in_capture=True)
        yield f"decode-capture {context} bs{bs}", capture
        capture()  # the graph's plan, kept by size: what the replays below reuse
        replay = functools.partial(backend.init_forward_metadata_out_graph, fb)
        yield f"decode-replay {context} bs{bs}", replay
    for bs in decode_bs:
        fb = host.decode_batch(bs, seq)
        yield f"decode-eager {context} bs{bs}", functools.partial(backend.init_forward_metadata, fb)


def _alloc_cases(host: Host, context: int, decode_bs: list[int]):
    """Our allocator's decode step over ``host``'s pools (it registers its own full -> swa map,
    so it comes after the backend cases)."""
    from sglang_dsv4.mem.allocator import DSV4SWAAllocator

    pool, block = host.pool, host.pool.schema.block_size
    alloc = DSV4SWAAllocator(pool.size, pool.n_swa_slots, block, torch.bfloat16, host.device, pool,
                             need_sort=False)  # fmt: skip
    seq = context - block // 2  # mid-page: the step takes the slot after the last one
    for bs in decode_bs:
        seq_lens = torch.full((bs,), seq, dtype=torch.int64)
        last_loc = host.rtp.req_to_token[:bs, seq - 2].long()
        args = (seq_lens.to(host.device), seq_lens, last_loc)
        yield f"alloc-decode {context} bs{bs}", functools.partial(alloc.alloc_decode, *args)


def graph_launch_cases(nodes: list[int]):
    """(name, callable): ``CUDAGraph.replay()`` of graphs of ``n`` tiny kernels, the host cost
    of a decode step's launch (86 kernels at batch 1, 157 at 32 on 2026-12-06)."""
    x = torch.zeros(1, device="cuda") if nodes else None
    for n in nodes:
        graph = capture([functools.partial(x.add_, 1)] * n)
        yield f"graph-replay {n} nodes", graph.replay


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--config", default="configs/tiny-6l.json")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--profile", default=None, help="a case name, e.g. 'extend 16x4096'")
    ap.add_argument("--graph-nodes", default="86,157", help="CUDA only: graph launch cases")
    ap.add_argument("--contexts", default=CONTEXTS, help="context lengths (request slot widths)")
    ap.add_argument("--decode-bs", default=DECODE_BS, help="decode batch sizes")
    ap.add_argument("--extend", default=EXTEND_CASES, help="BxN or BxN+P cases ('': none)")
    ap.add_argument("--no-extend", action="store_true", help="decode cases only")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    torch.set_num_threads(1)  # the scheduler process's setting on CPU; host work is 1-thread
    cfg = load_config(args.config)
    rows = {}
    print(f"device {args.device}, {args.reps} reps, config {args.config}")
    print(
        f"{'case':<28} {'median us':>10} {'min us':>10} {'torch ops':>9} {'host ops':>8} "
        f"{'h2d':>4} {'h2d B':>8} {'syncs':>6}"
    )
    graphs = [int(n) for n in args.graph_nodes.split(",") if n] if args.device != "cpu" else []
    contexts, decode_bs = _ints(args.contexts), _ints(args.decode_bs)
    timed = cases(
        cfg, args.device, contexts, decode_bs, _extend_cases("" if args.no_extend else args.extend)
    )
    copies = _CountCopies()
    for name, fn in itertools.chain(timed, graph_launch_cases(graphs)):
        one_off = name.startswith(("extend", "decode-capture"))
        reps = max(3, args.reps // 10) if one_off else args.reps
        r = rows[name] = time_calls(fn, reps, args.device, copies)
        print(
            f"{name:<28} {r['median_us']:>10.1f} {r['min_us']:>10.1f} {r['torch_ops']:>9} "
            f"{r['host_ops']:>8} {r['h2d_copies']:>4} {r['h2d_bytes']:>8} "
            f"{r['syncs_per_call']:>6.1f}"
        )
        if name == args.profile:
            prof = cProfile.Profile()
            prof.runcall(fn)
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    path = write_json(
        os.path.join(args.out, "bench_plan_host.json"), {"device": args.device, "rows": rows}
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
