"""``kernels.indexer_extend.IndexerExtend`` against ``ref.indexer`` on the dequantized keys.

Extend batches: requests with many new tokens over various prefixes (query tiles cross no
request; ragged last tiles), keys as FP8 (``IndexKeyLayout.write``, paged through a shuffled
block table; the kernel rounds the queries to e4m3, the reference through ``fp8_queries``) or
plain fp32 / bf16 rows (``plain`` / ``bf16``: scored as stored, queries unrounded). Outputs
and the logits workspace are poisoned (-7 / NaN) first. Per checked query:

* ``lengths = min(topk, visible)``, ids past it and their rows are -1, ids distinct and visible;
* exact top-k: every picked entry's reference score is >= the reference k-th best, every
  unpicked visible entry's <= it (within 1e-5 of the row's largest |score|: fp32 sums in
  another order), and at least 95 % of the reference's picks are picked;
* the logits (queries of the last workspace chunk) within that tolerance of the reference;
* rows: ``block_table[b, id // 32] * 32 + id % 32``.

On the GPU the FP8 path's MMA is FP8 x FP8, whose accumulator keeps 13 mantissa bits of its
aligned sums (H100: DeepSeek-V3 report 3.5.2, SageAttention2): each entry's tolerance grows by
``_FP8_MMA`` times its sum of |w| |q| . |k| over the heads (a model of that accumulator gave at
most 2^-11.3 on 20000 random 128-dim dots, mean 2^-14.8).

A small workspace forces several chunks (each chunk: tiled logits, then top-k).
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from triton_cpu import bf16_dots

from sglang_dsv4.kernels import topk_shapes
from sglang_dsv4.kernels.indexer_extend import IndexerExtend
from sglang_dsv4.kernels.kv_store import IndexKeyLayout
from sglang_dsv4.kernels.topk_shapes import SelectShape
from sglang_dsv4.ref.indexer import fp8_queries, index_scores

BLOCK, RATIO, EPB = 128, 4, 32
_FP8_MMA = 2.0**-9  # the FP8 MMA's error bound per unit of sum |q_d k_d| (see above)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _setup(fmt, seq_lens, n_heads, head_dim, device, gen):
    """(keys cache, key reader, block table [B, blocks]) holding every entry of each request."""
    b = len(seq_lens)
    blocks = max(1, -(-max(seq_lens) // BLOCK))
    pages = (torch.randperm(b * blocks + 2, generator=gen)[: b * blocks] + 1).view(b, blocks)
    bt = pages.int().to(device)
    n_rows = (b * blocks + 3) * EPB
    keys = torch.randn(n_rows, head_dim, generator=gen).to(device)
    keys *= torch.exp2(torch.randint(-3, 3, (n_rows, 1), generator=gen).float()).to(device)
    if fmt in ("plain", "bf16"):  # plain rows: fp32 / bf16, scored as stored
        rows = keys if fmt == "plain" else keys.bfloat16()
        return rows, (lambda r: rows[r]), None, bt
    layout = IndexKeyLayout("fp8", 32, head_dim)
    cache = layout.empty(n_rows, device).fill_(0xFF)
    layout.write(cache, torch.arange(n_rows, device=device), keys)
    return cache, (lambda rows: layout.read(cache, rows)), layout, bt


def _run(fmt, prefix, extend, topk, n_heads, device, workspace=1 << 28, stride=1, seed=0,
         gpu_dots=False, **shape):  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    head_dim = 128
    seq = [p + n for p, n in zip(prefix, extend, strict=True)]
    keys, read, layout, bt = _setup(fmt, seq, n_heads, head_dim, device, gen)
    t = sum(extend)
    q = torch.randn(t, n_heads, head_dim, generator=gen).to(device, torch.bfloat16)
    w = torch.randn(t, n_heads, generator=gen).to(device)
    qreq = torch.repeat_interleave(torch.arange(len(extend)), torch.tensor(extend))
    pos = torch.cat([torch.arange(p, s) for p, s in zip(prefix, seq, strict=True)])
    ix = IndexerExtend(topk, n_heads, head_dim, key_layout=layout, max_workspace_bytes=workspace,
                       **shape)  # fmt: skip
    assert ix.q_fp8 == (fmt == "fp8")
    ix.plan(extend, seq, device)
    if gpu_dots:  # the GPU's operand choice on the CPU (bf16 MMA where it is exact): bf16_dots
        ix._dot_f32 = False
    ix.ids.fill_(-7), ix.rows.fill_(-7), ix.lengths.fill_(-7)  # poison
    ix.logits.fill_(float("nan"))
    qreq_d, pos_d = qreq.int().to(device), pos.to(device)
    ids, rows, lengths = ix.run(q, w, keys, bt, qreq_d, pos_d)
    q_ref = fp8_queries(q) if ix.q_fp8 else q
    mma = _FP8_MMA if ix.q_fp8 and q.is_cuda else 0.0
    last_chunk = ix.chunks[-1][0]  # its queries' logits are still in the workspace
    checked = [*range(0, t - 1, stride), t - 1]
    for i in checked:
        b, p = int(qreq[i]), int(pos[i])
        vis = (p + 1) // RATIO
        k = min(topk, vis)
        assert int(lengths[i]) == k
        assert (ids[i, k:] == -1).all() and (rows[i, k:] == -1).all()
        if not k:
            continue
        ent = torch.arange(vis, device=device)
        key_rows = bt[b, ent // EPB].long() * EPB + ent % EPB
        keys_i = read(key_rows)
        ref = index_scores(q_ref[i : i + 1].float(), w[i : i + 1], keys_i)[0]  # [vis]
        slack = 1e-5 * ref.abs().max().item() + mma * _abs_scores(q_ref[i], w[i], keys_i)
        if i >= last_chunk:
            assert ((ix.logits[i - last_chunk, :vis] - ref).abs() <= slack).all()
        tol = (2 if mma else 1) * slack.max().item()  # two entries swapped: both moved
        sel = ids[i, :k].long()
        assert sel.unique().numel() == k and ((sel >= 0) & (sel < vis)).all()
        assert torch.equal(rows[i, :k].long(), key_rows[sel])
        top = ref.topk(k)
        kth = top.values[-1].item()
        assert ref[sel].min().item() >= kth - tol
        unpicked = torch.ones(vis, dtype=torch.bool, device=device)
        unpicked[sel] = False
        if unpicked.any():
            assert ref[unpicked].max().item() <= kth + tol
        assert (~unpicked[top.indices]).sum().item() >= 0.95 * k
    return len(ix.chunks)


def _abs_scores(q, w, keys):
    """sum_h |w_h| H^-1/2 Dh^-1/2 (|q_h| . |k_s|) [E] of one query ``q`` [H, Dh], ``w`` [H]."""
    h, dh = q.shape
    a = keys.float().abs() @ q.float().abs().T  # [E, H]
    return (a * w.float().abs() * h**-0.5).sum(1) * dh**-0.5


def _scaled_weights_pair(fmt, prefix, extend, n_heads, device, seed=0):
    """The picks, rows, counts and logits workspace of two launches: head weights pre-scaled in
    torch (``w.float() * Dh^-1/2``, the former ``extend_ops._rotated``), and the model's bf16
    weights as stored with that factor as ``w_scale``."""
    gen = torch.Generator().manual_seed(seed)
    seq = [p + n for p, n in zip(prefix, extend, strict=True)]
    keys, _, layout, bt = _setup(fmt, seq, n_heads, 128, device, gen)
    t = sum(extend)
    q = torch.randn(t, n_heads, 128, generator=gen).to(device, torch.bfloat16)
    w = torch.randn(t, n_heads, generator=gen).to(device, torch.bfloat16)
    qreq = torch.repeat_interleave(torch.arange(len(extend)), torch.tensor(extend))
    qreq = qreq.int().to(device)
    pos = torch.cat([torch.arange(p, s) for p, s in zip(prefix, seq, strict=True)]).to(device)
    ix = IndexerExtend(64, n_heads, 128, key_layout=layout)
    ix.plan(extend, seq, device)
    out = []
    for weights, scale in ((w.float() * 128**-0.5, 1.0), (w, 128**-0.5)):
        ix.logits.fill_(float("nan"))
        got = ix.run(q, weights, keys, bt, qreq, pos, w_scale=scale)
        out.append([x.clone() for x in (*got, ix.logits)])
    assert (out[0][2] > 0).any(), "no query picked anything"
    return out


@pytest.mark.parametrize("fmt", ["plain", "fp8"])
@pytest.mark.parametrize("n_heads", [16, 32])  # 32: H^-1/2 no power of 2
def test_weight_scale_equals_scaled_weights(fmt, n_heads):
    """``w_scale`` (the rotation's Dh^-1/2 folded into the logits kernel) gives the pre-scaled
    weights' launch bit for bit: the same fp32 products in the same order."""
    want, got = _scaled_weights_pair(fmt, [0, 200], [130, 20], n_heads, "cpu")
    for a, b in zip(want, got, strict=True):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("fmt", ["plain", "fp8"])
def test_extend_batch_over_prefixes(fmt):
    # tiles of 16 queries (16 heads): ragged last tiles, a 1-token extend, queries with no keys
    _run(fmt, prefix=[0, 400, 5], extend=[37, 1, 130], topk=16, n_heads=16, device="cpu")


def test_topk_larger_than_visible_and_32_heads():
    _run("plain", prefix=[0, 60], extend=[70, 9], topk=64, n_heads=32, device="cpu")


@pytest.mark.parametrize("fmt", ["plain", "bf16"])
def test_plain_keys_gpu_operands(fmt):
    """Plain keys are scored as stored, with the queries as given (``index_scores``, no
    rounding), also under the GPU's operand choice (``bf16_dots``: the interpreter's bf16
    ``tl.dot`` as the tensor cores': exact products, fp32 sums): fp32 keys take fp32 dots
    (the bf16 MMA rounded them: logits off by 0.85 % of the row's largest |score| here, by
    1.3e-2 in a row up to 2.62 on the H100 at Flash dims), bf16 keys the bf16 MMA. The GPU
    prefill's layout scaled down: one fresh request, key tiles of 32 (4 of them), top-64."""
    with bf16_dots():
        _run(fmt, [0], [512], 64, 16, "cpu", stride=7, gpu_dots=True, block_keys=32)


SM90_DOTS = textwrap.dedent("""
    import os, re, sys
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    from sglang_dsv4.kernels import indexer_extend as ie
    from sglang_dsv4.perf.sm90_compile import build

    types = dict(q_ptr="*bf16", w_ptr="*fp32", bt_ptr="*i32", tile_start_ptr="*i32",
                 tile_len_ptr="*i32", qreq_ptr="*i32", pos_ptr="*i64", logits_ptr="*fp32")
    ce = dict(H=64, DH=128, BS=64, EPB=32, RATIO=4, RPP=32, DOT_F32=False)
    cases = {"fp8": (torch.uint8, "*u8", dict(KEYS=0, Q_FP8=True)),
             "bf16": (torch.bfloat16, "*bf16", dict(KEYS=1, Q_FP8=False)),
             "fp32": (torch.float32, "*fp32", dict(KEYS=1, Q_FP8=False))}
    for name, (dtype, ptr, keys) in cases.items():
        if not ie.tensor_core_dots(torch.bfloat16, dtype):
            print(name, "fp32 dots")
            continue
        for bq in (4, 8):  # query tiles of 256 (served) and 512 rows
            ir = build(ie._tile_logits_kernel, dict(types, keys_ptr=ptr),
                       dict(ce, BQ=bq, **keys), 8, num_stages=2).asm["ttgir"]
            reg = re.search(r"local_load [^\\n]*dot_op<\\{opIdx = 0", ir) is not None
            print(name, bq, "wgmma" if "warp_group_dot " in ir else "no wgmma",
                  "register keys" if reg else "shared keys")
""")


def test_sm90_tensor_core_dots_read_keys_from_shared(tmp_path):
    """sm_90 compiles (no GPU) of every tensor-core variant of the logits kernel that ``run()``
    launches (bf16 queries; ``tensor_core_dots``): the wgmma reads the key tile from shared memory
    as loaded. Keys converted in registers first (main's FP8 bytes -> bf16, fp32 keys -> bf16)
    compiled to a register-operand wgmma over a single-buffered tile: the layout of both GPU
    failures on main (FP8 keys at 512-row tiles; fp32 keys: a pick scoring -4.56 below a k-th
    best of 0.12). fp32 keys take fp32 dots instead."""
    script = tmp_path / "dots.py"  # a subprocess: this one's kernels are interpreted
    script.write_text(SM90_DOTS)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:-1] == [
        "fp8 4 wgmma shared keys", "fp8 8 wgmma shared keys", "bf16 4 wgmma shared keys",
        "bf16 8 wgmma shared keys", "fp32 fp32 dots",
    ], out.stdout  # fmt: skip


def test_workspace_chunks():
    # ld = 96 logits per query: room for 46 queries -> tiles of 16 split into chunks
    chunks = _run("fp8", [0, 300], [90, 50], 16, 16, "cpu", workspace=4 * 112 * 40)
    assert chunks > 3


@pytest.mark.parametrize(("query_rows", "block_keys"), [(32, 16), (16, 128), (64, 32)])
def test_launch_shapes(query_rows, block_keys):
    """Other query tiles (queries per program) and key tiles: the same picks, the same
    logits to fp32 order (warps / stages only matter compiled: the GPU test below)."""
    _run("fp8", [0, 300], [90, 50], 16, 16, "cpu", query_rows=query_rows,
         block_keys=block_keys, warps=4, stages=3)  # fmt: skip


@pytest.mark.parametrize("select", [SelectShape("rows", 4, 128), SelectShape("radix", 8, 2048)])
def test_select_shapes(select):
    """The top-k's other launches (``topk_shapes``): the whole run's picks, in workspace chunks."""
    _run("fp8", [0, 300], [90, 50], 16, 16, "cpu", workspace=4 * 112 * 40, select=select)


def _into_lists(fmt, prefix, extend, topk, n_heads, device, select=None, workspace=1 << 28,
                seed=0):  # fmt: skip
    """The select writing into FlashMLA's index lists (``ids_out`` a column block of a wider
    -7-poisoned buffer, ``id_base`` per request) vs the same run into the plan's buffers:
    ids rebased (``base + id``, -1 kept), same picks in the same order, the lists' other
    columns untouched, the same lengths."""
    gen = torch.Generator().manual_seed(seed)
    seq = [p + n for p, n in zip(prefix, extend, strict=True)]
    keys, _, layout, bt = _setup(fmt, seq, n_heads, 128, device, gen)
    t = sum(extend)
    q = torch.randn(t, n_heads, 128, generator=gen).to(device, torch.bfloat16)
    w = torch.randn(t, n_heads, generator=gen).to(device)
    qreq = torch.repeat_interleave(torch.arange(len(extend)), torch.tensor(extend))
    qreq = qreq.int().to(device)
    pos = torch.cat([torch.arange(p, s) for p, s in zip(prefix, seq, strict=True)]).to(device)
    ix = IndexerExtend(topk, n_heads, 128, key_layout=layout, max_workspace_bytes=workspace,
                       select=select)  # fmt: skip
    ix.plan(extend, seq, device)
    ids, _, lengths = (x.clone() for x in ix.run(q, w, keys, bt, qreq, pos))
    lists = torch.full((t, 1, 3 + topk + 21), -7, dtype=torch.int32, device=device)
    base = torch.randint(0, 1 << 20, (len(extend),), generator=gen).int().to(device)
    ix.plan(extend, seq, device, ids_out=lists[:, 0, 3 : 3 + topk], id_base=base)
    ix.lengths.fill_(-7)
    got, rows, got_len = ix.run(q, w, keys, bt, qreq, pos)
    assert rows is None and got.data_ptr() == lists[:, 0, 3:].data_ptr()
    want = torch.where(ids >= 0, ids + base[qreq.long()].unsqueeze(1), -1)
    assert torch.equal(lists[:, 0, 3 : 3 + topk], want)
    assert (lists[:, 0, :3] == -7).all() and (lists[:, 0, 3 + topk :] == -7).all()
    assert torch.equal(got_len, lengths)
    return ix


@pytest.mark.parametrize("select", [SelectShape("rows", 4, 128), SelectShape("radix", 8, 2048)])
def test_picks_into_flashmla_lists(select):
    """Both selects, several workspace chunks, a 1-token extend and queries with no keys."""
    ix = _into_lists("fp8", [0, 400, 5], [37, 1, 130], 16, 16, "cpu", select, 4 * 112 * 40)
    assert len(ix.chunks) > 1


def test_picks_into_lists_checks():
    ix = IndexerExtend(16, 16, 128)
    lists = torch.full((3, 40), -1, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"int32 \[3, 16\]"):
        ix.plan([3], [3], "cpu", ids_out=lists[:, :15], id_base=torch.zeros(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="id_base"):
        ix.plan([3], [3], "cpu", ids_out=lists[:, :16])
    with pytest.raises(ValueError, match="unit column"):
        ix.plan([3], [3], "cpu", ids_out=lists[:, ::2][:, :16],
                id_base=torch.zeros(1, dtype=torch.int32))  # fmt: skip


def test_plan_picks_the_measured_select(monkeypatch):
    """No ``select``: plan() takes ``topk_shapes.MEASURED``'s row for the widest measured
    rows not above the batch's, the default (radix) below them."""
    rows = SelectShape("rows", 8, 1024)
    monkeypatch.setattr(topk_shapes, "MEASURED", ((256, 16, rows, 1.0),))
    ix = IndexerExtend(16, 16, 128)
    ix.plan([8], [4 * 300], "cpu")
    assert ix.select_shape == rows and ix._select == ix._select_rows
    ix.plan([8], [4 * 200], "cpu")
    assert ix.select_shape == topk_shapes.default_shape(208) and ix._select == ix._select_radix


def test_plan_required_and_shapes():
    ix = IndexerExtend(16, 16, 128)
    q = torch.zeros(3, 16, 128, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="plan"):
        ix.run(q, torch.zeros(3, 16), torch.zeros(8, 128), None, None, None)
    ix.plan([3], [3], "cpu")
    with pytest.raises(ValueError, match="planned"):
        ix.run(q[:2], torch.zeros(2, 16), torch.zeros(8, 128), None, None, None)
    with pytest.raises(ValueError, match="bf16 or fp32"):  # a bf16 MMA would round fp16 keys
        ix.run(q, torch.zeros(3, 16), torch.zeros(8, 128, dtype=torch.float16), None, None, None)
    with pytest.raises(ValueError, match="heads"):
        IndexerExtend(16, 24, 128)


# ------------------------------------------------------------------ GPU, DSV4 shapes


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["fp8", "plain", "bf16"])
def test_gpu_flash_dims_prefill(fmt):
    # Flash: 64 indexer heads x 128, top-k 512; one 8K prefill (plain: fp32 keys, fp32 dots;
    # bf16: bf16 keys, the bf16 MMA)
    _run(fmt, [0], [8192], 512, 64, "cuda", stride=97)


@pytest.mark.gpu
@pytest.mark.parametrize("warps", [4, 8, 16])
def test_gpu_flash_dims_rows_select(warps):
    """The rows select (``topk_rows``) in the whole run at Flash dims: the last 8192-token chunk
    of a 24K prompt and a short chunk of a fresh request, against the reference."""
    _run("fp8", [16384, 0], [8192, 3000], 512, 64, "cuda", stride=89,
         select=SelectShape("rows", warps, 128 * warps))  # fmt: skip


@pytest.mark.gpu
def test_gpu_flash_dims_weight_scale():
    """``w_scale`` at the Flash dims (64 heads, FP8 keys, 8K prefill): bit for bit the launch on
    pre-scaled fp32 weights."""
    want, got = _scaled_weights_pair("fp8", [0], [8192], 64, "cuda")
    for a, b in zip(want, got, strict=True):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.gpu
def test_gpu_flash_dims_32k_chunk():
    # the last 8192-token chunk of a 32K prompt (the served prefill step of issue 14)
    _run("fp8", [24576], [8192], 512, 64, "cuda", stride=97)


@pytest.mark.gpu
def test_gpu_flash_dims_odd_sizes():
    # prefixes and chunks off every tile / block / window boundary, in a small workspace
    _run("fp8", [3001, 0, 777, 130], [4099, 13, 2047, 5], 512, 64, "cuda", workspace=1 << 25,
         stride=37, seed=3)  # fmt: skip


@pytest.mark.gpu
def test_gpu_flash_dims_extend_batch():
    # chunks over cached prefixes next to fresh requests, a workspace of a few chunks
    _run("fp8", [4096, 0, 12288, 128], [1024, 2000, 512, 1], 512, 64, "cuda",
         workspace=1 << 24, stride=31)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape", [(128, 64, 8, 2), (64, 64, 4, 2), (256, 128, 8, 2), (512, 64, 8, 2)]
)
def test_gpu_launch_shapes(shape):
    """The shapes ``bench_kv_kernels.py --only isweep`` times, at the Flash dims over a cached
    prefix (the served 32K chunk's layout, shorter)."""
    rows, keys, warps, stages = shape
    _run("fp8", [6144], [2048], 512, 64, "cuda", stride=61, query_rows=rows, block_keys=keys,
         warps=warps, stages=stages)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("select", [SelectShape("rows", 8, 1024), SelectShape("radix", 8, 2048)])
def test_gpu_flash_dims_picks_into_lists(select):
    """The served 8192-token chunk after a 24K prefix next to a short fresh request, the picks
    written into FlashMLA's lists (64 indexer heads x 128, top-512): the same picks, rebased."""
    _into_lists("fp8", [24576, 0], [8192, 300], 512, 64, "cuda", select, 1 << 27)
