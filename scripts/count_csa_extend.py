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

Prints one JSON line per op and a table last. ``--config``: other dims (the test's tiny model).
"""

import argparse
import contextlib
import json
import sys
import types
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.jit import KernelInterface

sys.path.insert(0, str(Path(__file__).resolve().parent))

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "dsv4-flash-dims.json"


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


def flash_mla_sparse_fwd(q, kv, indices, scale, d_v, sink, lengths):
    """FlashMLA's sparse prefill, recorded (no ``sgl_kernel`` on CPU: its import needs
    libcuda)."""
    for c in _ACTIVE:
        c.flashmla += 1
    return q, None, None  # no op: the output's shape is q's


def count(fn) -> dict:
    c = Counts()
    _ACTIVE.append(c)
    try:
        with c:
            fn()
    finally:
        _ACTIVE.remove(c)
    return c.row()


@contextlib.contextmanager
def _patched(attend: str):
    """FlashMLA eligible and chosen (``attend``), its prefill recorded, the bench on the CPU,
    Triton launches recorded from ``recording()`` on; everything restored on exit."""
    import bench_extend as be

    from sglang_dsv4.attention import extend_choice

    mod = types.ModuleType("sgl_kernel.flash_mla")
    mod.flash_mla_sparse_fwd = flash_mla_sparse_fwd
    pkg = types.ModuleType("sgl_kernel")
    pkg.flash_mla = mod
    chosen = extend_choice.FLASHMLA if attend == "flashmla" else extend_choice.OURS
    saved_modules = {k: sys.modules.get(k) for k in ("sgl_kernel", "sgl_kernel.flash_mla")}
    saved = [(be, "DEV", be.DEV), (extend_choice, "pick", extend_choice.pick),
             (extend_choice, "flashmla_eligible", extend_choice.flashmla_eligible),
             (KernelInterface, "__getitem__", KernelInterface.__getitem__)]  # fmt: skip
    sys.modules.update({"sgl_kernel": pkg, "sgl_kernel.flash_mla": mod})
    be.DEV = "cpu"
    extend_choice.flashmla_eligible = lambda *args: True  # sm90's eligibility, on the CPU
    extend_choice.pick = lambda *args: chosen
    try:
        yield be, chosen
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
        for k, v in saved_modules.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def measure(tokens: int, prefix: int = 0, attend: str = "flashmla", config=CONFIG) -> dict:
    """{op name: counts} of one CSA layer's ``run()`` over one request of ``tokens`` new tokens
    after ``prefix`` (each op of ``bench_extend.op_calls``, then the whole run)."""
    from sglang_dsv4.config import AttnKind, load_config

    with _patched(attend) as (be, chosen):
        cfg = load_config(config)
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
        rows = {name: count(fn) for name, fn in calls.items()}
        rows["run"] = count(lambda: w.run(lk, q, kv, sink, scale, comp, norm))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--prefix", type=int, default=0)
    ap.add_argument("--attend", choices=["flashmla", "ours"], default="flashmla")
    ap.add_argument("--config", default=str(CONFIG))
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = measure(args.tokens, args.prefix, args.attend, args.config)
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
