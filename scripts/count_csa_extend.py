"""Torch ops and kernel launches of one CSA (c4) layer's extend ``run()`` at Flash dims, on the
CPU (issue 14: fewer launches / ops per extend step; no GPU needed, nothing is computed by a
kernel).

    PYTHONPATH=$PWD python scripts/count_csa_extend.py [--tokens 8192] [--prefix 0]
    PYTHONPATH=/work/main python scripts/count_csa_extend.py   # the same count on another tree

The layer is built as ``scripts/bench_extend.py`` builds it (``extend_ops(kernels=True)`` over
``DSV4KVPool``s with FP8 rows and keys, ``CSAWrapper``, ``plan_batch``), on the CPU, with the
compressor projections given (``CompressedInputs.projected``, as the model's fused input GEMM
hands them). The attention is FlashMLA's extend path (``--attend flashmla``, the served choice at
these shapes: ``extend_choice.MEASURED``) or ours (``--attend ours``). Counted per op of the
wrapper (``bench_extend.op_calls``: store, flush, index_flush, picks, attend) and for the whole
``run()``:

* ``aten``: torch ops under a ``TorchDispatchMode``, views and allocations apart (a view or an
  ``empty`` launches nothing; every other op is a device kernel on the GPU);
* ``triton``: Triton launches (``KernelInterface.__getitem__`` patched: the kernel's name is
  recorded, the kernel does not run);
* ``flashmla``: calls of FlashMLA's sparse prefill (a fake ``sgl_kernel.flash_mla``).

Prints one JSON line per op and a table last.
"""

import argparse
import json
import os
import sys
import types
from collections import Counter
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # launches are recorded, never run

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.jit import KernelInterface

sys.path.insert(0, str(Path(__file__).resolve().parent))


class Counts(TorchDispatchMode):
    """aten ops (views and allocations apart), Triton launches, FlashMLA calls."""

    def __init__(self):
        super().__init__()
        self.aten, self.views, self.allocs = Counter(), 0, 0
        self.triton, self.flashmla = Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket).removeprefix("aten.")
        if func.is_view or name == "_unsafe_view":  # a view, not marked one
            self.views += 1
        elif name.startswith("empty") or name in ("new_empty", "new_empty_strided"):
            self.allocs += 1
        else:
            self.aten[name] += 1
        return func(*args, **(kwargs or {}))

    def row(self) -> dict:
        return dict(aten=sum(self.aten.values()), triton=sum(self.triton.values()),
                    flashmla=self.flashmla, views=self.views, allocs=self.allocs,
                    aten_ops=dict(self.aten), triton_kernels=dict(self.triton))  # fmt: skip


_ACTIVE: list[Counts] = []


def _launch(self, grid):
    def record(*args, **kwargs):
        name = getattr(getattr(self, "fn", None), "__name__", type(self).__name__)
        for c in _ACTIVE:
            c.triton[name] += 1

    return record


def _fake_flashmla():
    """``sgl_kernel.flash_mla`` whose sparse prefill records the call (no ``sgl_kernel`` on CPU:
    its import needs libcuda)."""

    def flash_mla_sparse_fwd(q, kv, indices, scale, d_v, sink, lengths):
        for c in _ACTIVE:
            c.flashmla += 1
        return q, None, None  # no op: the output's shape is q's

    mod = types.ModuleType("sgl_kernel.flash_mla")
    mod.flash_mla_sparse_fwd = flash_mla_sparse_fwd
    pkg = types.ModuleType("sgl_kernel")
    pkg.flash_mla = mod
    sys.modules.update({"sgl_kernel": pkg, "sgl_kernel.flash_mla": mod})


def count(fn) -> dict:
    c = Counts()
    _ACTIVE.append(c)
    try:
        with c:
            fn()
    finally:
        _ACTIVE.remove(c)
    return c.row()


def build(tokens: int, prefix: int, attend: str):
    """(the CSA wrapper planned over one request of ``tokens`` new tokens after ``prefix``, its
    ops' closures, the whole run's closure)."""
    _fake_flashmla()
    import bench_extend as be

    from sglang_dsv4.attention import extend_choice
    from sglang_dsv4.config import AttnKind, load_config

    be.DEV = "cpu"
    extend_choice.flashmla_eligible = lambda *args: True  # sm90's eligibility, on the CPU
    chosen = extend_choice.FLASHMLA if attend == "flashmla" else extend_choice.OURS
    extend_choice.pick = lambda *args: chosen
    cfg = load_config(be.CONFIG)
    world = be.World(cfg, 1, prefix, tokens, "fp8")
    lk = world.pool.layer(world.pool.schema.layers_of(AttnKind.CSA)[0].layer)
    w = be.make_wrapper(cfg, AttnKind.CSA, lk, kernels=True)
    gen = torch.Generator().manual_seed(0)
    q, kv, comp = be.layer_inputs(cfg, AttnKind.CSA, tokens, gen)
    bf = dict(dtype=torch.bfloat16)
    comp.projected = (torch.randn(tokens, 2 * cfg.head_dim, **bf),) * 2  # coff 2 (c4)
    comp.indexer.projected = (torch.randn(tokens, 2 * cfg.index_head_dim, **bf),) * 2
    sink, scale = torch.randn(cfg.num_heads, generator=gen), cfg.head_dim**-0.5
    w.plan(world.plan())
    assert w.ops.attend.choice == chosen
    norm = be.kv_norm(cfg, w._plan.tables.positions, gen)
    KernelInterface.__getitem__ = _launch  # from here on, launches are recorded
    calls = be.op_calls(w, lk, q, kv, sink, scale, comp, norm)
    return calls, lambda: w.run(lk, q, kv, sink, scale, comp, norm)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--prefix", type=int, default=0)
    ap.add_argument("--attend", choices=["flashmla", "ours"], default="flashmla")
    args = ap.parse_args()
    torch.set_num_threads(2)
    calls, run = build(args.tokens, args.prefix, args.attend)
    rows = {name: count(fn) for name, fn in calls.items()}
    rows["run"] = count(run)
    tree = Path(sys.modules["sglang_dsv4"].__file__).resolve().parents[1]
    for name, row in rows.items():
        print(json.dumps(dict(op=name, tree=str(tree), **row)))
    print(f"\n== CSA extend run(), 1x{args.tokens}+{args.prefix}, attend {args.attend}, "
          f"tree {tree} ==")  # fmt: skip
    print(f"{'op':>12} {'aten':>5} {'triton':>6} {'flashmla':>8} {'views':>5} {'allocs':>6}")
    for name, r in rows.items():
        print(f"{name:>12} {r['aten']:>5} {r['triton']:>6} {r['flashmla']:>8} {r['views']:>5} "
              f"{r['allocs']:>6}")  # fmt: skip


if __name__ == "__main__":
    main()
