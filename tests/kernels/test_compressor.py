"""``kernels.compressor.CompressorFlush`` against ``ref.compressor.compress`` (+ the store).

Each step feeds a packed batch; the reference runs ``compress`` per request with its own state.
Checked every step: the tail pool rows equal the reference states bit for bit (they are copies of
the inputs), rows of other requests / unused slots and every cache row that is not one of this
step's entries stay poisoned (NaN / 0xFF), and the entries match:

* fp8 rows: at most 1e-3 of the bytes differ from ``pack_fp8_rows(ref)``, each such value by one
  e4m3 step at most (``kv_tolerance.fp8_error``; the kernel's exp / sums differ from torch's by
  ulps), the bf16 RoPE channels by one bf16 ulp;
* fp32 rows: within 2e-6 of the row's largest value; bf16 rows within one bf16 ulp (+ that);
* indexer keys (Hadamard, then FP8 / FP4): at most 1e-3 of the values differ from ``ref.quant``'s
  fake-quant of the rotated ref entries, each by one quantization step at most.
"""

from dataclasses import dataclass, field

import pytest
import torch
from kv_tolerance import fp8_error
from triton_cpu import interpreted

from sglang_dsv4.kernels import compressor, kv_store
from sglang_dsv4.ref.compressor import CompressorState, CompressorWeights, compress
from sglang_dsv4.ref.kv_layout import pack_fp8_rows, unpack_fp8_rows
from sglang_dsv4.ref.quant import fp4_e2m1_fake_quant, fp8_e4m3_fake_quant, hadamard

BLOCK = 128
NAN = float("nan")
# the interpreter turns 1-element arrays into loop bounds
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def mods():
    with interpreted(kv_store, compressor) as pair:
        yield pair


@dataclass
class Harness:
    """A tail pool, a block table and an entry cache for ``n_req`` requests, plus their
    reference states; ``step`` runs one batch through the kernel and the reference."""

    ks: object
    cm: object
    ratio: int
    d: int
    out: str
    hidden: int
    n_req: int
    max_len: int
    device: str
    rows_per_page: int = 3
    weights: CompressorWeights = field(init=False)

    def __post_init__(self):
        r, d, dev = self.ratio, self.d, self.device
        coff = 2 if r == 4 else 1
        g = torch.Generator(device="cpu").manual_seed(1234 + r + d)

        def rnd(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g) * scale).to(dev)

        self.weights = CompressorWeights(
            rnd(coff * d, self.hidden, scale=self.hidden**-0.5),
            rnd(coff * d, self.hidden, scale=2 * self.hidden**-0.5),
            rnd(r, coff * d),
            (torch.rand(d, generator=g) + 0.5).to(dev),
        )
        self.inv_freq = 1.0 / 160000 ** (torch.arange(0, 64, 2, device=dev).float() / 64)
        self.states = [CompressorState.empty(self.weights, dev) for _ in range(self.n_req)]
        self.history: list[list[torch.Tensor]] = [[] for _ in range(self.n_req)]
        self.pos = [0] * self.n_req
        slots = self.n_req + 3  # unused slots must stay poisoned
        self.req_slot = torch.randperm(slots)[: self.n_req].tolist()
        self.tail_kv = torch.full((slots, coff * r, coff * d), NAN, device=dev)
        self.tail_score = torch.full_like(self.tail_kv, NAN)
        for i, st in enumerate(self.states):
            self.tail_kv[self.req_slot[i]] = st.kv
            self.tail_score[self.req_slot[i]] = st.score
        blocks = -(-self.max_len // BLOCK)
        self.n_pages = self.n_req * blocks + 2
        pages = torch.randperm(self.n_pages - 1)[: self.n_req * blocks] + 1  # page 0 unused
        self.block_table = pages.view(self.n_req, blocks).int().to(dev)
        self.n_rows = self.n_pages * (BLOCK // r)
        self.flush = self.cm.CompressorFlush(r, d, self.out, layout=self._layout())
        self.cache = self._empty_cache()

    def _layout(self):
        if self.out == "fp8":
            return self.ks.FP8RowLayout.paged(self.rows_per_page, self.d)
        if self.out.startswith("index"):
            return self.ks.IndexKeyLayout(self.out[6:], self.rows_per_page, self.d)
        return None

    def _empty_cache(self):
        if self.out in ("bf16", "fp32"):
            dt = torch.bfloat16 if self.out == "bf16" else torch.float32
            return torch.full((self.n_rows, self.d), NAN, dtype=dt, device=self.device)
        return self.flush.layout.empty(self.n_rows, self.device).fill_(0xFF)

    def poison_cache(self):
        self.cache.fill_(NAN if self.out in ("bf16", "fp32") else 0xFF)

    def inputs(self, batch):
        """Random new tokens of ``batch`` [(request, n)]: x per request and the kernel inputs."""
        xs = [torch.randn(n, self.hidden, device=self.device) for _, n in batch]
        w = self.weights
        kv = torch.cat([x.float() @ w.wkv.float().T for x in xs])
        score = torch.cat([x.float() @ w.wgate.float().T for x in xs])
        reqs = [i for i, _ in batch]
        lens = [n for _, n in batch]
        meta = dict(
            req_slots=torch.tensor([self.req_slot[i] for i in reqs], dtype=torch.int32),
            prefix_lens=torch.tensor([self.pos[i] for i in reqs], dtype=torch.int32),
            cu_seqlens=torch.tensor([0, *lens], dtype=torch.int32).cumsum(0).int(),
        )
        meta = {k: v.to(self.device) for k, v in meta.items()}
        meta["block_table"] = self.block_table[reqs].contiguous()
        return xs, kv, score, meta

    def launch(self, kv, score, meta, **extra):
        w = self.weights
        self.flush.run(
            kv, score, w.ape, w.norm, self.inv_freq, self.tail_kv, self.tail_score,
            meta["req_slots"], meta["prefix_lens"], meta["cu_seqlens"], meta["block_table"],
            self.cache, **extra,
        )  # fmt: skip

    def step(self, batch, decode=False, **extra):
        xs, kv, score, meta = self.inputs(batch)
        if decode:
            self.flush.plan_decode(len(batch))
        else:
            self.flush.plan([self.pos[i] for i, _ in batch], [n for _, n in batch])
        self.poison_cache()
        self.launch(kv, score, meta, **extra)
        self.check(batch, xs)

    def reference(self, batch, xs):
        """Advance the reference states; the entries completed, as (rows, entries)."""
        rows, ents = [], []
        for (i, n), x in zip(batch, xs, strict=True):
            e, first, st = compress(x, self.pos[i], self.states[i], self.weights, self.inv_freq)
            self.states[i] = st
            self.pos[i] += n
            self.history[i].append(x)
            ids = torch.arange(first, first + e.shape[0], device=self.device)
            blk = self.block_table[i, ids * self.ratio // BLOCK].long()
            rows.append(blk * (BLOCK // self.ratio) + ids * self.ratio % BLOCK // self.ratio)
            ents.append(e)
        return torch.cat(rows), torch.cat(ents)

    def check(self, batch, xs):
        rows, ents = self.reference(batch, xs)
        for i, st in enumerate(self.states):
            s = self.req_slot[i]
            assert torch.equal(self.tail_kv[s], st.kv), f"tail kv of request {i}"
            assert torch.equal(self.tail_score[s], st.score), f"tail score of request {i}"
        unused = [s for s in range(self.tail_kv.shape[0]) if s not in self.req_slot]
        assert self.tail_kv[unused].isnan().all() and self.tail_score[unused].isnan().all()
        others = torch.ones(self.n_rows, dtype=torch.bool, device=self.device)
        others[rows] = False
        others = others.nonzero().flatten()
        if self.out in ("bf16", "fp32"):
            assert self.cache[others].isnan().all(), "a row that is no new entry was written"
            got, ref = self.cache[rows].float(), ents.float()
            assert not got.isnan().any()
            ulp = 2.0**-7 if self.out == "bf16" else 0.0
            bound = ulp * ref.abs() + 2e-6 * ref.abs().amax(1, keepdim=True)
            assert ((got - ref).abs() <= bound).all()
            return
        lay = self.flush.layout
        if self.out == "fp8":
            assert (lay.read(self.cache, others) == 0xFF).all(), "a non-entry row was written"
            got, want = lay.read(self.cache, rows), pack_fp8_rows(ents)
            assert (got != want).sum() <= 1e-3 * got.numel()
            a, b = unpack_fp8_rows(got, self.d), unpack_fp8_rows(want, self.d)
            assert not a.isnan().any()
            assert (fp8_error(a[:, :-64], b[:, :-64]) <= 1).all()
            rope_ulp = 2.0**-7 * b[:, -64:].abs() + 2.0**-22 * b.abs().amax(1, keepdim=True)
            assert ((a[:, -64:] - b[:, -64:]).abs() <= rope_ulp).all()
            return
        if others.numel():  # untouched key rows still decode the poison bytes (NaN / inf)
            assert not lay.read(self.cache, others).isfinite().any()
        got = lay.read(self.cache, rows)
        rot = hadamard(ents)
        if self.out == "index_fp8":
            want = fp8_e4m3_fake_quant(rot, block=self.d)
            step = 2.0**-3 * want.abs()
        else:
            want = fp4_e2m1_fake_quant(rot)
            step = 0.5 * want.abs().unflatten(-1, (-1, 32)).amax(-1, keepdim=True) / 3
            step = step.expand(-1, -1, 32).flatten(1)  # one e2m1 grid step: <= amax / 3
        assert not got.isnan().any()
        assert (got != want).sum() <= 1e-3 * got.numel()
        assert ((got - want).abs() <= step + 1e-30).all()


def _prefill_then_extend(h: Harness, first: list[int], second: list[int]):
    h.step(list(enumerate(first)))
    h.step(list(enumerate(second)))


# ------------------------------------------------------------------ CPU (TRITON_INTERPRET=1)


@pytest.mark.parametrize(
    "ratio,out",
    [(4, "fp8"), (4, "bf16"), (4, "index_fp8"), (4, "index_fp4"), (128, "fp8"), (128, "fp32")],
)
def test_prefill_and_extend(mods, ratio, out):
    ks, cm = mods
    h = Harness(ks, cm, ratio, 128, out, 32, 4, 700, "cpu")
    if ratio == 4:
        _prefill_then_extend(h, [1, 3, 9, 130], [1, 14, 6, 3])
    else:
        _prefill_then_extend(h, [1, 127, 130, 300], [1, 1, 254, 3])


@pytest.mark.parametrize("ratio", [4, 128])
def test_chunked_extends(mods, ratio):
    """One request fed 1+2+3+125+130+389 tokens."""
    ks, cm = mods
    h = Harness(ks, cm, ratio, 128, "fp8", 32, 1, 650, "cpu")
    for n in (1, 2, 3, 125, 130, 389):
        h.step([(0, n)])


@pytest.mark.parametrize("ratio", [4, 128])
def test_decode_token_by_token(mods, ratio):
    """Three requests at different offsets, one token each per step; only completed windows
    emit (decided on device)."""
    ks, cm = mods
    h = Harness(ks, cm, ratio, 128, "fp8", 32, 3, 300, "cpu")
    h.step([(0, 2), (1, 5), (2, 125)])
    for _ in range(6):
        h.step([(0, 1), (1, 1), (2, 1)], decode=True)


@pytest.mark.parametrize("ratio,out", [(4, "fp8"), (4, "index_fp8"), (128, "fp8")])
def test_bf16_weights_as_stored_equal_their_fp32_copies(mods, ratio, out):
    """The extend flush hands the model's bf16 ``ape`` / ``norm`` to the kernel as stored
    (``extend_ops.FlushTriton``, as the decode flush does): every output (entries, tails, c4
    boundary rows) equals the launch on their fp32 copies, the previous per-step casts, bit for
    bit."""
    ks, cm = mods
    _bf16_weights_pair(Harness(ks, cm, ratio, 128, out, 32, 2, 400, "cpu"), [260, 9])


def _bf16_weights_pair(h: Harness, lens: list[int]) -> None:
    """Fresh requests of ``lens`` tokens flushed twice, on fp32 copies of bf16 ``ape`` /
    ``norm`` and on the bf16 tensors: every output equal as bits (poison NaNs included)."""
    ape, norm = h.weights.ape.bfloat16(), h.weights.norm.bfloat16()
    _, kv, score, meta = h.inputs(list(enumerate(lens)))
    h.flush.plan([0] * len(lens), lens)
    runs = []
    for a, n in ((ape.float(), norm.float()), (ape, norm)):
        tails, cache = (h.tail_kv.clone(), h.tail_score.clone()), h.cache.clone()
        bnd = None
        if h.ratio == 4:
            bnd = tuple(torch.full((h.n_pages, 4, h.d), NAN, device=h.device) for _ in range(2))
        h.flush.run(
            kv, score, a, n, h.inv_freq, *tails, meta["req_slots"], meta["prefix_lens"],
            meta["cu_seqlens"], meta["block_table"], cache, boundary=bnd,
        )  # fmt: skip
        runs.append((cache, [*tails, *(bnd or ())]))
    (want_cache, want_f32), (got_cache, got_f32) = runs
    assert not torch.equal(got_cache, h.cache), "no entry was written"
    for want, got in zip(want_f32, got_f32, strict=True):
        assert torch.equal(want.view(torch.uint8), got.view(torch.uint8))
    if h.device != "cpu" and h.flush.layout is not None:  # the compiled flush's FP8 entry rows
        _same_up_to_fp8_steps(h, want_cache, got_cache)
    else:
        assert torch.equal(want_cache.view(torch.uint8), got_cache.view(torch.uint8))


def _same_up_to_fp8_steps(h: Harness, want: torch.Tensor, got: torch.Tensor) -> None:
    """The compiled GPU flush on bf16 and on fp32 weights rounds a handful of values apart (the
    compiler contracts the products differently): H200, 2026-12-07: 12 of 2.6M bytes of the c4
    main cache at 8192 + 300 tokens, 3 of 0.57M of the c4 index cache; H100, 2026-12-08: bytes
    1-8 apart in the main cache, the bf16 RoPE half included, where a rotation cancels and one
    fp32 ulp of the row is several bf16 ulps of a small value. So: at most 1e-5 of the bytes
    differ, the same rows are written, and decoded they agree to one e4m3 step (the no-RoPE
    channels, a scale change included) and one bf16 rounding plus 2^-20 of the row's largest
    value (the RoPE channels)."""
    differ = int((want.view(torch.uint8) != got.view(torch.uint8)).sum())
    assert differ <= max(1, 1e-5 * want.view(torch.uint8).numel()), differ
    rows = torch.arange(h.n_rows, device=want.device)
    a, b = h.flush.layout.read(want, rows), h.flush.layout.read(got, rows)
    rope = 64 if a.dtype == torch.uint8 else 0  # FlashMLA rows: no-RoPE FP8, RoPE bf16
    if rope:
        a, b = unpack_fp8_rows(a, h.d), unpack_fp8_rows(b, h.d)
    written = a.isfinite()  # the poison bytes decode to NaN / inf
    assert torch.equal(written, b.isfinite()) and written.any()
    a, b = a.where(written, 0.0), b.where(written, 0.0)
    nope = h.d - rope
    assert (fp8_error(b[:, :nope], a[:, :nope]) <= 1).all()
    bound = 2.0**-7 * a[:, nope:].abs() + 2.0**-20 * a.abs().amax(1, keepdim=True)
    assert ((b[:, nope:] - a[:, nope:]).abs() <= bound).all()


def test_tail_modes_and_boundary(mods):
    """``boundary`` gets the a-halves of every block-ending window; a fresh request ignores a
    stale pool row; a request rebuilt from a block end equals the reference rebuilt the same way
    (empty state + the boundary a-halves, as the wrappers' REBUILD does)."""
    ks, cm = mods
    h = Harness(ks, cm, 4, 128, "fp8", 32, 2, 400, "cpu")
    bnd = tuple(torch.full((h.n_pages, 4, 128), NAN) for _ in range(2))
    mode = torch.tensor([cm.TAIL_FRESH, cm.TAIL_FRESH], dtype=torch.int32)
    page = torch.tensor([-1, -1], dtype=torch.int32)
    h.tail_kv[h.req_slot[1]] = 7.0  # stale state of a previous owner
    h.tail_score[h.req_slot[1]] = 3.0
    h.step([(0, 300), (1, 5)], tail_mode=mode, rebuild_page=page, boundary=bnd)
    x0 = torch.cat(h.history[0])
    for blk, end in ((0, 128), (1, 256)):  # the reference state at each block end
        pg = int(h.block_table[0, blk])
        _, _, st = compress(x0[:end], 0, CompressorState.empty(h.weights), h.weights, h.inv_freq)
        assert torch.equal(bnd[0][pg], st.kv[:4, :128])
        assert torch.equal(bnd[1][pg], st.score[:4, :128])
    touched = {int(h.block_table[0, 0]), int(h.block_table[0, 1])}
    assert all(bnd[0][p].isnan().all() for p in range(h.n_pages) if p not in touched)
    # request 1 restarts from request 0's block end at 256 (a prefix hit by a new owner)
    pg = int(h.block_table[0, 1])
    h.block_table[1, :2] = h.block_table[0, :2]
    h.pos[1] = 256
    st = CompressorState.empty(h.weights)
    st.kv[:4, :128], st.score[:4, :128] = bnd[0][pg], bnd[1][pg]
    h.states[1] = st
    h.tail_kv[h.req_slot[1]] = NAN  # must not be read
    mode = torch.tensor([cm.TAIL_KEEP, cm.TAIL_REBUILD], dtype=torch.int32)
    page = torch.tensor([-1, pg], dtype=torch.int32)
    h.step([(0, 3), (1, 41)], tail_mode=mode, rebuild_page=page, boundary=bnd)


def test_boundary_table(mods):
    """With a ``boundary_table`` the a-halves of a block end go to that table's page (the swa
    page the wrappers keep them with), not the block table's, and nowhere where it holds -1."""
    ks, cm = mods
    h = Harness(ks, cm, 4, 128, "fp32", 32, 1, 400, "cpu")
    bnd = tuple(torch.full((h.n_pages, 4, 128), NAN) for _ in range(2))
    table = torch.full_like(h.block_table, -1)
    table[0, 0] = int(h.block_table[0, 1])  # block 0's end kept at block 1's page; block 1 not
    h.step([(0, 300)], boundary=bnd, boundary_table=table)
    _, _, st = compress(torch.cat(h.history[0])[:128], 0, CompressorState.empty(h.weights),
                        h.weights, h.inv_freq)  # fmt: skip
    pg = int(table[0, 0])
    assert torch.equal(bnd[0][pg], st.kv[:4, :128])
    assert torch.equal(bnd[1][pg], st.score[:4, :128])
    assert all(bnd[0][p].isnan().all() for p in range(h.n_pages) if p != pg)


# ------------------------------------------------------------------ GPU, DSV4 shapes

FLASH_HIDDEN = 4096


def _gpu(ratio, d, out, n_req, max_len, rows_per_page=32):
    return Harness(kv_store, compressor, ratio, d, out, FLASH_HIDDEN, n_req, max_len, "cuda",
                   rows_per_page)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("ratio", [4, 128])
@pytest.mark.parametrize("lens", [[4097], [1, 3, 4097], "129"])
def test_gpu_prefill_and_extend(ratio, lens):
    if lens == "129":
        lens = torch.randint(1, 700, (129,)).tolist()
    h = _gpu(ratio, 512, "fp8", len(lens), max(lens) + 400)
    _prefill_then_extend(h, lens, torch.randint(1, 390, (len(lens),)).tolist())


@pytest.mark.gpu
@pytest.mark.parametrize("out", ["index_fp8", "index_fp4"])
def test_gpu_indexer_compressor(out):
    h = _gpu(4, 128, out, 3, 4097 + 130)
    _prefill_then_extend(h, [1, 129, 4097], [130, 3, 1])


@pytest.mark.gpu
@pytest.mark.parametrize("ratio,d,out", [(4, 512, "fp8"), (128, 512, "fp8"), (4, 128, "index_fp8")])
def test_gpu_bf16_weights_as_stored(ratio, d, out):
    """The extend flush's bf16 ``ape`` / ``norm`` read as stored at the Flash dims (main c4 /
    c128, c4 indexer): the launch on their fp32 copies bit for bit."""
    _bf16_weights_pair(_gpu(ratio, d, out, 2, 8192 + 300), [8192, 300])


@pytest.mark.gpu
@pytest.mark.parametrize("ratio", [4, 128])
def test_gpu_chunked_extends(ratio):
    h = _gpu(ratio, 512, "fp8", 1, 650)
    for n in (1, 2, 3, 125, 130, 389):
        h.step([(0, n)])


@pytest.mark.gpu
@pytest.mark.parametrize("ratio", [4, 128])
def test_gpu_decode_cuda_graph(ratio):
    """129 requests at random offsets: one eager decode step, then a captured step replayed on
    new tokens; every replay matches the reference (entries only where windows complete)."""
    n = 129
    h = _gpu(ratio, 512, "fp8", n, 700)
    h.step(list(enumerate(torch.randint(1, 300, (n,)).tolist())))
    decode = [(i, 1) for i in range(n)]
    h.step(decode, decode=True)  # compiles outside the capture
    _, kv, score, meta = h.inputs(decode)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h.launch(kv, score, meta)
    for _ in range(5):  # crosses c4 windows; c128 windows for some requests
        xs, kv_new, score_new, meta_new = h.inputs(decode)
        kv.copy_(kv_new)
        score.copy_(score_new)
        for k, v in meta_new.items():
            meta[k].copy_(v)
        h.poison_cache()
        graph.replay()
        h.check(decode, xs)
