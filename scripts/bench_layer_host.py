"""Torch ops and kernel launches of ONE extend (prefill) step on the GPU code path, counted on CPU.

    python scripts/bench_layer_host.py [--cases 2x150,1x8192] [--experts 16] [--vocab 4096]
        [--compare BEFORE.json] [--names] [--stack NAME] [--out DIR]
    python scripts/bench_layer_host.py --device cuda [--reps 10] ...   # real kernels, timed

The served ``DeepseekV4ForCausalLM`` of the Flash-dims config (``configs/dsv4-flash-dims.json``:
4 layers SWA, CSA, HCA, CSA at the real Flash widths; ``--experts`` / ``--vocab`` shrink the
routed experts and the vocabulary, which change no per-layer op) is built as CUDA builds it:
kept-quantized linears (FP8 / MXFP4 banks), the Triton ops (``build_ops(kernels=True)``), FP8
pools with the extend ops' kernels (``extend_ops(kernels=True)``) and the attend choice a
Hopper GPU makes (FlashMLA eligible; ``sgl_kernel.flash_mla`` is a counting stub here). Per case
``BxN`` (``B`` fresh prompts of ``N`` tokens) one uncounted step warms the lazy state (the
reference view, fused projections, caches), then one step is counted:

* ``plan``: ``backend.init_forward_metadata(fb)`` (once per step);
* the forward, per section: ``top`` (embedding, first mHC), each layer's ``attn`` (projections,
  norms, the backend's wrapper) and ``block`` (attn + the mHC and MoE after it), ``head``.

Counted per section: ``ops`` every torch op dispatched (``TorchDispatchMode``; views included),
``launch`` the ops that launch a CUDA kernel on the GPU (not views, not allocations), ``kern``
Triton / FlashMLA launches (patched ``KernelInterface.__getitem__``: on CPU counted and NOT run,
heavy torch GEMMs replaced by their output allocation, so the 8192-token case takes seconds; no
value steers the step's ops, the plan reads only host lengths), and ``sync`` host reads of
device values (``aten._local_scalar_dense``). Per kind: the mean over the layers of that kind.
The plan's ops are counted as the forward's are, though on the GPU many of them touch host
tensors only (``bench_plan_host.py`` splits host and device ops). Output: a table
(``--compare``: ``before -> now`` per cell, from an earlier run's JSON), and
``bench_layer_host.json`` in ``--out`` (default $OUT or ``.``) with every section's counts and
the kernel / op names (``--names`` prints them, ``--stack`` where each op is called from).

``--device cuda``: the same counts with every kernel run (compiled), weights small random values
(``_init_weights``), real FlashMLA, then ``--reps`` uncounted steps timed: the host's issue time
of plan + forward and the step's time to the device's end (medians; ``scripts/gpu_xlayer.sh``
runs it on this tree and on ``git archive main``).
"""

import argparse
import collections
import contextlib
import functools
import json
import os
import statistics
import sys
import time
import traceback
from types import SimpleNamespace

# CPU: the kernels' launches counted (or interpreted); chosen before triton is imported
_ARGV = " ".join(sys.argv[1:])
if "--device cuda" not in _ARGV and "--device=cuda" not in _ARGV:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton.runtime.jit as triton_jit  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from sglang_dsv4.attention.plan_facts import SlottedLens  # noqa: E402
from sglang_dsv4.config import AttnKind, DSV4Config  # noqa: E402
from sglang_dsv4.perf.timing import write_json  # noqa: E402

CASES = "2x150,1x8192"
# no kernel on the GPU: allocations, aliases, a reshape's view (``_unsafe_view``), the host
# scalar of ``torch.where(c, x, -1)`` (a wrapped CPU number), a host read (counted as a sync)
_ALLOC = {"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like",
          "_local_scalar_dense", "lift_fresh", "detach", "alias", "_unsafe_view",
          "scalar_tensor"}  # fmt: skip
_GEMM = {"mm", "bmm", "addmm", "baddbmm", "_scaled_mm"}


def _launches(func) -> bool:
    """Whether op ``func`` launches a kernel on the GPU: returns a tensor, not a view (an output
    aliasing an input without writing it) and not an allocation."""
    if func.__name__.split(".")[0] in _ALLOC:
        return False
    returns = func._schema.returns
    if not any("Tensor" in str(r.type) for r in returns):
        return False  # dtype / shape arithmetic (promote_types, sym sizes)
    return not any(r.alias_info is not None and not r.alias_info.is_write for r in returns)


class Counter(TorchDispatchMode):
    """Counts ops per section (``section`` names where they go); ``paused`` inside launches (the
    interpreter's own tensor traffic is not the model's). ``fake_gemm``: GEMMs allocate their
    output and return it unwritten (their count is what matters here, not their values)."""

    def __init__(self, fake_gemm: bool, stack: str | None = None):
        super().__init__()
        self.fake_gemm, self.stack = fake_gemm, stack
        self.section = "top"
        self.paused = False
        self.rows = collections.defaultdict(collections.Counter)
        self.names = collections.defaultdict(collections.Counter)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused:
            return func(*args, **kwargs)
        name = func.__name__
        row = self.rows[self.section]
        row["ops"] += 1
        launch = _launches(func)
        row["launch"] += launch
        self.names[self.section][("*" if launch else "") + name] += 1
        row["sync"] += name.startswith("_local_scalar_dense")
        if self.stack in (name, self.section):
            print(f"{self.section}: {'*' if launch else ' '}{name:<28} {_caller()}")
        if self.fake_gemm and name.split(".")[0] in _GEMM:
            return _gemm_output(func, args, kwargs)
        return func(*args, **kwargs)

    def kernel(self, name: str) -> None:
        self.rows[self.section]["kern"] += 1
        self.names[self.section]["K:" + name] += 1


def _caller() -> str:
    """The innermost project frames (file:line function) that called the op."""
    frames = [f for f in traceback.extract_stack() if "sglang_dsv4" in f.filename]
    return " < ".join(
        f"{f.filename.split('sglang_dsv4/')[-1]}:{f.lineno} {f.name}" for f in frames[::-1][:3]
    )


def _gemm_output(func, args, kwargs):
    """The GEMM's output, allocated but not computed (``out=``: that tensor)."""
    if "out" in kwargs:
        return kwargs["out"]

    def meta(t):
        if isinstance(t, torch.Tensor):
            return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
        return t

    m = func(*[meta(a) for a in args], **{k: meta(v) for k, v in kwargs.items()})
    return torch.empty_strided(m.shape, m.stride(), dtype=m.dtype)


def _kernel_name(k) -> str:
    while not callable(getattr(k, "__code__", None)) and hasattr(k, "fn"):
        k = k.fn
    return getattr(k, "__name__", type(k).__name__)


# the extend plan's tables (block table, windows, tail modes) steer the later ops' indexing
_ALWAYS_RUN = {"_extend_meta_kernel"}


@contextlib.contextmanager
def counted_launches(counter: Counter, execute: bool):
    """Every ``kernel[grid](...)`` counted (outermost only: an autotuner's inner runs are not
    ``__getitem__`` calls); run only with ``execute`` (the GPU), or where its outputs index
    the step's later ops (``_ALWAYS_RUN``: interpreted on CPU)."""
    original = triton_jit.KernelInterface.__getitem__

    def getitem(self, grid):
        launch = original(self, grid)

        def counted(*args, **kwargs):
            name = _kernel_name(self)
            counter.kernel(name)
            if not execute and name not in _ALWAYS_RUN:
                return None
            counter.paused = True
            try:
                return launch(*args, **kwargs)
            finally:
                counter.paused = False

        return counted

    triton_jit.KernelInterface.__getitem__ = getitem
    try:
        yield
    finally:
        triton_jit.KernelInterface.__getitem__ = original


def _flashmla_stub(counter: Counter):
    """``sgl_kernel.flash_mla`` as a module whose sparse prefill counts a launch (CPU has no
    FlashMLA); its output is allocated as FlashMLA's is."""

    def flash_mla_sparse_fwd(q, kv, indices, scale, d_v, sink, topk_length):
        counter.kernel("flash_mla_sparse_fwd")
        with _paused(counter):
            out = torch.empty(q.shape[0], q.shape[1], d_v, dtype=q.dtype)
            return out, None, None

    mod = type(sys)("sgl_kernel.flash_mla")
    mod.flash_mla_sparse_fwd = flash_mla_sparse_fwd
    return mod


def _count_flashmla(counter: Counter) -> None:
    """``sgl_kernel.flash_mla.flash_mla_sparse_fwd`` counting its launches (once per process)."""
    try:
        import sgl_kernel.flash_mla as fm
    except ImportError:  # no FlashMLA: ours serves, nothing to count
        return
    real = fm.flash_mla_sparse_fwd
    if getattr(real, "counted", False):
        return

    def counted(*args, **kwargs):
        counter.kernel("flash_mla_sparse_fwd")
        with _paused(counter):  # its torch op is the launch just counted
            return real(*args, **kwargs)

    counted.counted = True
    fm.flash_mla_sparse_fwd = counted


@contextlib.contextmanager
def _paused(counter: Counter):
    counter.paused = True
    try:
        yield
    finally:
        counter.paused = False


def _model_config(path: str, experts: int, vocab: int):
    with open(path) as f:
        raw = json.load(f)
    raw["n_routed_experts"] = min(raw["n_routed_experts"], experts)
    raw["num_experts_per_tok"] = min(raw["num_experts_per_tok"], raw["n_routed_experts"])
    raw["vocab_size"] = min(raw["vocab_size"], vocab)
    return raw


def build_model(raw: dict, device: str = "cpu"):
    """The served model as CUDA builds it (module docstring), on ``device``; weights left
    uninitialized on CPU (nothing reads their values), small random ones on CUDA."""
    import sglang_dsv4.model.deepseek_v4 as served
    from sglang_dsv4.ops import build_ops

    config = SimpleNamespace(**raw, to_dict=lambda: dict(raw))
    patches = {
        "LogitsProcessor": lambda config: lambda ids, hidden, head, fb, **kw: hidden,
        "keeps_quantized": lambda device: True,
        "build_ops": functools.partial(build_ops, kernels=True),
    }
    old = {k: getattr(served, k) for k in patches}
    for k, v in patches.items():
        setattr(served, k, v)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = served.DeepseekV4ForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
        for k, v in old.items():
            setattr(served, k, v)
    if device != "cpu":
        _init_weights(model, raw["n_routed_experts"])
    model._projections = model._fuse_projections()  # what load_weights derives
    return model


@torch.no_grad()
def _init_weights(model, n_experts: int) -> None:
    """Finite values the kernels can run on: N(0, 0.02) floats (norm weights 1), FP8 weights
    of N(0, 0.1), every scale 1 (e8m0 / UE8M0 byte 127), random FP4 codes, expert ids of the
    hash layer's table within the experts."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.dtype in (torch.bfloat16, torch.float32):
            if name.endswith(("norm.weight", "global_scale")):
                t.fill_(1.0)
            else:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.02)
        elif t.dtype == torch.float8_e4m3fn:
            t.copy_((torch.randn(t.shape, generator=gen) * 0.1).to(t.dtype))
        elif t.dtype == torch.float8_e8m0fnu or name.endswith("scale"):
            t.view(torch.uint8).fill_(127)
        elif t.dtype == torch.uint8:
            t.copy_(torch.randint(0, 256, t.shape, generator=gen, dtype=torch.uint8))
        elif not t.is_floating_point():
            t.copy_(torch.randint(0, n_experts, t.shape, generator=gen))


class Host:
    """FP8 pools (as on the GPU) for ``n_req`` requests of ``context`` tokens and the backend
    over them with the extend kernels forced (``bench_plan_host.Host``'s bookkeeping)."""

    def __init__(self, model, n_req: int, context: int, counter: Counter, device: str):
        import sglang_dsv4.attention.backend as backend_mod
        import sglang_dsv4.attention.extend_choice as choice_mod
        from sglang_dsv4.mem.pools import DSV4KVPool
        from sglang_dsv4.mem.schema import CacheSchema, EntryFormat

        cfg = model.cfg
        block = cfg.block_size
        schema = CacheSchema.from_config(cfg, EntryFormat.FP8)
        n_full, n_swa = n_req * context, n_req * context
        self.pool = DSV4KVPool(schema, n_full, n_swa, n_req, torch.bfloat16, device)
        full = torch.arange(n_full + block)
        self.pool.register_mapping(torch.cat([full, torch.tensor([-1])]).to(device))
        rtt = block + torch.arange(n_req).unsqueeze(1) * context + torch.arange(context)
        self.rtp = SimpleNamespace(
            req_to_token=rtt.int().to(device), req_generation=torch.ones(n_req, dtype=torch.long)
        )
        self.device = device
        runner = SimpleNamespace(
            token_to_kv_pool=self.pool,
            req_to_token_pool=self.rtp,
            model=model,
            model_config=SimpleNamespace(context_len=context),
            token_to_kv_pool_allocator=SimpleNamespace(),
            server_args=SimpleNamespace(speculative_algorithm=None),
            is_draft_worker=False,
        )
        ext = backend_mod.extend_ops
        eligible = choice_mod.flashmla_eligible
        if device == "cpu":  # the GPU's choices, FlashMLA a counting stub
            sys.modules["sgl_kernel.flash_mla"] = _flashmla_stub(counter)
            backend_mod.extend_ops = lambda *a, **k: ext(*a, **{**k, "kernels": True})
            choice_mod.flashmla_eligible = lambda fp8, heads, dim, dev: fp8 and heads in (64, 128)
        else:  # the real FlashMLA, its launches counted (the backend takes it at construction)
            _count_flashmla(counter)
        try:
            self.backend = backend_mod.DSV4AttnBackend(runner)
        finally:
            backend_mod.extend_ops, choice_mod.flashmla_eligible = ext, eligible
        if device == "cpu":  # the GPU's plan tables: one launch (counted, not run)
            from sglang_dsv4.attention.plan_tables import tables_triton

            self.backend._tables = tables_triton

    def extend_batch(self, b: int, n: int) -> SimpleNamespace:
        """``b`` fresh prompts of ``n`` tokens (new requests: their generation bumped)."""
        self.rtp.req_generation[:b] += 1
        dev = self.device
        return SimpleNamespace(
            batch_size=b,
            forward_mode=ForwardMode.EXTEND,
            req_pool_indices=torch.arange(b, device=dev),
            seq_lens=torch.full((b,), n, device=dev),
            seq_lens_cpu=torch.full((b,), n, dtype=torch.int64),
            extend_prefix_lens=torch.zeros(b, dtype=torch.int32, device=dev),
            extend_prefix_lens_cpu=SlottedLens([0] * b, list(range(b))),
            extend_seq_lens=torch.full((b,), n, dtype=torch.int32, device=dev),
            extend_seq_lens_cpu=[n] * b,
            positions=torch.arange(n, device=dev).repeat(b),
            out_cache_loc=self.rtp.req_to_token[:b, :n].long().flatten(),
            spec_info=None,
            capture_hidden_mode=SimpleNamespace(need_capture=lambda: False),
        )


def _sections(model, counter: Counter):
    """Point ``counter.section`` at the layer whose code runs (instance-level wrappers)."""
    attention, ffn, head = model._attention, model.ops.moe.ffn, model.ops.hc.post_head

    def attn(block, *args):
        counter.section = f"L{block.spec.index} attn"
        out = attention(block, *args)
        counter.section = f"L{block.spec.index} hc"
        return out

    def moe(layer, *args):
        index = counter.section.split()[0]
        counter.section = f"{index} moe"
        out = ffn(layer, *args)
        counter.section = f"{index} hc"
        return out

    def post_head(*args):
        counter.section = "head"
        return head(*args)

    model._attention = attn
    object.__setattr__(model.ops.moe, "ffn", moe)
    object.__setattr__(model.ops.hc, "post_head", post_head)


def run_case(model, counter: Counter, b: int, n: int, reps: int,
             pyprofile: bool = False) -> dict:  # fmt: skip
    """Counts of one extend step of ``b`` fresh prompts of ``n`` tokens (after a warm one); on
    CUDA also ``reps`` timed steps (:func:`_time_steps`)."""
    device = str(model.embed.weight.device.type)
    host = Host(model, b, max(n, 256), counter, device)
    vocab = model.cfg.vocab_size
    ids = torch.randint(2, vocab, (b * n,), generator=torch.Generator().manual_seed(n))
    ids = ids.to(device)

    def step(fb=None):
        counter.section = "batch"  # the harness's own tensors: not counted
        fb = fb or host.extend_batch(b, n)
        counter.section = "plan"
        if device == "cpu":  # the checks' kernel was counted, not run: nothing to check
            host.pool.plan_checks = None
        host.backend.init_forward_metadata(fb)
        counter.section = "top"
        with _patched_backend(host.backend):
            model.forward(ids, fb.positions, fb)

    with counted_launches(counter, execute=device != "cpu"):
        with counter:  # warm: lazy state (ref view, caches) built; counts discarded
            step()
        counter.rows.clear()
        counter.names.clear()
        with counter:
            step()
    out = summarize(model.cfg, counter)
    if device != "cpu":
        out["timing"] = _time_steps(host, step, b, n, reps)
    if pyprofile:
        with contextlib.ExitStack() as stack:
            if device == "cpu":  # launches stubbed, GEMMs faked: the Python around them
                stack.enter_context(counted_launches(counter, execute=False))
                stack.enter_context(counter)
            out["pyprofile"] = py_profile(host, step, b, n)
    return out


_FAMILIES = (("triton", "/triton/"), ("sglang_dsv4", "/sglang_dsv4/"), ("sglang", "/sglang/"),
             ("torch (Python)", "/torch/"))  # fmt: skip


def py_profile(host: "Host", step, b: int, n: int, top: int = 25) -> dict:
    """One more uncounted step under cProfile (it slows Python-heavy code more than C calls:
    read the split, not the total): own milliseconds by family -- Triton's launcher, our
    code, SGLang, torch's Python, C calls (``{built-in ...}``: torch ops and launches
    included), the rest -- and the ``top`` functions by own time."""
    import cProfile
    import pstats

    fb = host.extend_batch(b, n)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    prof = cProfile.Profile()
    prof.enable()
    step(fb)
    prof.disable()
    sync()
    families: dict[str, float] = {}
    rows = []
    for (file, line, name), (_, calls, own, cum, _) in pstats.Stats(prof).stats.items():
        family = "C calls" if file == "~" else next((f for f, m in _FAMILIES if m in file), "other")
        families[family] = families.get(family, 0.0) + own * 1e3
        where = f"{os.path.basename(file)}:{line}" if file != "~" else ""
        rows.append({"fn": f"{where} {name}".strip(), "calls": calls, "own_ms": own * 1e3,
                     "cum_ms": cum * 1e3})  # fmt: skip
    rows.sort(key=lambda r: -r["own_ms"])
    return {"families_ms": dict(sorted(families.items(), key=lambda kv: -kv[1])),
            "top": rows[:top]}  # fmt: skip


def print_profile(p: dict) -> None:
    print("  Python profile of one step (own ms): "
          + ", ".join(f"{k} {v:.2f}" for k, v in p["families_ms"].items()))  # fmt: skip
    for r in p["top"]:
        print(f"    {r['own_ms']:8.3f} own {r['cum_ms']:8.3f} cum {r['calls']:6d} x  {r['fn']}")


def _time_steps(host: "Host", step, b: int, n: int, reps: int) -> dict:
    """Median milliseconds over ``reps`` uncounted steps (batch built beforehand, the device
    idle at the start): ``host_ms`` until plan + forward have returned (the host's issue time),
    ``step_ms`` until the device has run them."""
    host_ms, step_ms = [], []
    for _ in range(reps):
        fb = host.extend_batch(b, n)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(fb)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        host_ms.append((t1 - t0) * 1e3)
        step_ms.append((time.perf_counter() - t0) * 1e3)
    return {"host_ms": statistics.median(host_ms), "step_ms": statistics.median(step_ms)}


@contextlib.contextmanager
def _patched_backend(backend):
    import sglang_dsv4.model.deepseek_v4 as served

    old = served.get_attn_backend
    served.get_attn_backend = lambda: backend
    try:
        yield
    finally:
        served.get_attn_backend = old


KEYS = ("ops", "launch", "kern", "sync")


def summarize(cfg: DSV4Config, counter: Counter) -> dict:
    rows = {s: {k: r[k] for k in KEYS} for s, r in counter.rows.items() if s != "batch"}
    layers = {}
    for spec in cfg.layers:
        i = spec.index
        parts = [rows.get(f"L{i} {p}", dict.fromkeys(KEYS, 0)) for p in ("attn", "hc", "moe")]
        layers[i] = {
            "kind": spec.attn.name,
            "attn": parts[0],
            "block": {k: sum(p[k] for p in parts) for k in KEYS},
        }
    kinds = {}
    for kind in AttnKind:
        ls = [v for v in layers.values() if v["kind"] == kind.name]
        if ls:
            kinds[kind.name] = {
                part: {k: sum(v[part][k] for v in ls) / len(ls) for k in KEYS}
                for part in ("attn", "block")
            }
    forward = {k: sum(r[k] for s, r in rows.items() if s != "plan") for k in KEYS}
    return {
        "plan": rows.get("plan", dict.fromkeys(KEYS, 0)),
        "forward": forward,
        "kinds": kinds,
        "layers": layers,
        "sections": rows,
        "names": {s: dict(c.most_common()) for s, c in counter.names.items() if s != "batch"},
    }


def _rows(r: dict) -> list[tuple[str, dict]]:
    """(label, counts) of a case's table: the plan, per kind attn / block per layer, forward."""
    out = [("plan", r["plan"])]
    for kind, v in r["kinds"].items():
        out += [(f"{kind} {part} /layer", v[part]) for part in ("attn", "block")]
    return [*out, ("forward (total)", r["forward"])]


def print_case(name: str, r: dict, before: dict | None = None) -> None:
    """The case's table; with ``before`` (the same case of an earlier run) each cell reads
    ``before -> now``."""

    def cell(label: str, c: dict, k: str) -> str:
        if before is None:
            return f"{c[k]:>7g}"
        was = dict(_rows(before)).get(label, dict.fromkeys(KEYS, 0))[k]
        return f"{f'{was:g} -> {c[k]:g}':>14}"

    width = 7 if before is None else 14
    print(f"\n{name}: {'section':<18} " + " ".join(f"{k:>{width}}" for k in KEYS))
    for label, c in _rows(r):
        print(f"{'':{len(name) + 1}} {label:<18} " + " ".join(cell(label, c, k) for k in KEYS))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/dsv4-flash-dims.json")
    ap.add_argument("--cases", default=CASES, help="BxN: B fresh prompts of N tokens")
    ap.add_argument("--experts", type=int, default=16, help="routed experts (at most)")
    ap.add_argument("--vocab", type=int, default=4096, help="vocabulary rows (at most)")
    ap.add_argument("--names", action="store_true", help="print each section's op names")
    ap.add_argument(
        "--stack",
        default=None,
        help="print where op NAME is called, or every op of section NAME ('L1 attn')",
    )
    ap.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="cuda: the kernels run, and steps are timed",
    )
    ap.add_argument("--reps", type=int, default=10, help="timed steps per case (CUDA)")
    ap.add_argument("--pyprofile", action="store_true", help="one more step under cProfile")
    ap.add_argument("--compare", default=None, help="an earlier run's JSON: before -> now")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    torch.set_flush_denormal(True)  # unwritten buffers hold arbitrary bits
    torch.manual_seed(0)
    earlier = {}
    if args.compare:
        with open(args.compare) as f:
            earlier = json.load(f)["cases"]
    raw = _model_config(args.config, args.experts, args.vocab)
    model = build_model(raw, args.device)
    counter = Counter(fake_gemm=args.device == "cpu", stack=args.stack)
    _sections(model, counter)
    out = {"config": args.config, "experts": raw["n_routed_experts"], "vocab": raw["vocab_size"],
           "device": args.device, "cases": {}}  # fmt: skip
    for case in filter(None, args.cases.split(",")):
        b, n = (int(v) for v in case.split("x"))
        r = out["cases"][case] = run_case(model, counter, b, n, args.reps, args.pyprofile)
        print_case(case, r, earlier.get(case))
        if "timing" in r:
            was = earlier.get(case, {}).get("timing")
            t = r["timing"]
            print(
                f"{'':{len(case) + 1}} timed ({args.reps} steps, median): host issue "
                f"{t['host_ms']:.2f} ms, step {t['step_ms']:.2f} ms"
                + (f" (before: {was['host_ms']:.2f} ms, {was['step_ms']:.2f} ms)" if was else "")
            )
        if "pyprofile" in r:
            print_profile(r["pyprofile"])
        if args.names:
            for section, names in r["names"].items():
                print(f"  {section}: {names}")
    path = write_json(os.path.join(args.out, "bench_layer_host.json"), out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
