"""The served model's forward through ``self.ops`` (no server): the CPU twins give the reference
model's logits, and the Triton ops (forced, interpreted on CPU; on the GPU in bf16) give the
twins' logits.

The attention backend is replaced by :class:`OneSequence`: ``RefDSV4.attention``'s key lists
(window, compressed entries, indexer top-k) over the q / kv / compressor inputs the forward hands
to ``backend.run``, for one sequence prefilled from position 0, so everything else in the
forward (mHC, norms, RoPE, projections, MoE) is the served code.
"""

from types import SimpleNamespace

import pytest
import torch
from served_model import load_served

from sglang_dsv4.config import AttnKind
from sglang_dsv4.ops import HcTorch, NormTorch
from sglang_dsv4.ops.mhc import HcTriton
from sglang_dsv4.ops.norm import NormTriton
from sglang_dsv4.ref.attention import sparse_attention, window_indices
from sglang_dsv4.ref.compressor import CompressorState, compress
from sglang_dsv4.ref.indexer import index_scores, index_topk
from sglang_dsv4.ref.linear import linear
from sglang_dsv4.ref.model import RefDSV4

N_TOKENS = 150  # > 128: a c128 entry, 37 c4 entries (> top-k 16)
N_INTERPRETED = 40  # the ops are per token; the interpreter is slow


class OneSequence:
    """``backend.run`` for one sequence at positions 0..T-1, without a cache."""

    def __init__(self, window: int):
        self.window = window
        self.token_to_kv_pool = SimpleNamespace(layer=lambda index: index)

    @staticmethod
    def _entries(comp, cw):
        state = CompressorState.empty(cw, comp.x.device)
        entries, _, _ = compress(comp.x, 0, state, cw, comp.inv_freq, comp.norm_eps)
        return entries.to(comp.x.dtype)

    def run(self, kind: AttnKind, lk, q, kv, sink, scale, comp=None, kv_norm=None):
        if kv_norm is not None:  # raw wkv(x): the backend's KV store applies kv_norm + RoPE
            kv = kv_norm.apply(kv)
        pos = torch.arange(q.shape[0], device=q.device)
        indices = window_indices(pos, self.window)  # [T, W]
        if comp is not None:
            entries = self._entries(comp, comp.compressor)  # [E, D]
            if comp.indexer is not None:
                ix = comp.indexer
                scores = index_scores(ix.q, ix.weights, self._entries(comp, ix.compressor))
                picks = index_topk(scores, pos, kind.ratio, ix.topk)
            else:
                picks = torch.arange(entries.shape[0], device=q.device).expand(q.shape[0], -1)
                picks = torch.where(picks < ((pos + 1) // kind.ratio)[:, None], picks, -1)
            indices = torch.cat([indices, torch.where(picks >= 0, picks + q.shape[0], -1)], 1)
            kv = torch.cat([kv, entries])
        return sparse_attention(q, kv, indices, sink, scale)


def served_logits(model, ids: torch.Tensor, monkeypatch) -> torch.Tensor:
    import sglang_dsv4.model.deepseek_v4 as served

    backend = OneSequence(model.cfg.sliding_window)
    monkeypatch.setattr(served, "get_attn_backend", lambda: backend)
    head = model.ref.w["head.weight"]
    model.logits_processor = lambda ids, hidden, lm_head, batch, **kw: linear(hidden, head)
    return model(ids, torch.arange(ids.shape[0], device=ids.device), None)


def ids_of(n: int, device="cpu") -> torch.Tensor:
    return torch.randint(2, 1024, (n,), generator=torch.Generator().manual_seed(n)).to(device)


@pytest.fixture(scope="module")
def twin(tiny_checkpoint):
    model = load_served(tiny_checkpoint, kept=False)
    assert type(model.ops.hc) is HcTorch and type(model.ops.norm) is NormTorch  # CPU
    return model


def test_cpu_twins_give_the_reference_logits(twin, tiny_cfg, tiny_weights, monkeypatch):
    got = served_logits(twin, ids_of(N_TOKENS), monkeypatch)
    want = RefDSV4(tiny_cfg, tiny_weights)(ids_of(N_TOKENS))
    assert want.abs().max() > 0.1
    assert torch.equal(got, want), (got - want).abs().max()


def test_triton_ops_interpreted_equal_the_twins(twin, tiny_checkpoint, monkeypatch):
    model = load_served(tiny_checkpoint, kept=False, kernels=True)
    assert isinstance(model.ops.hc, HcTriton) and isinstance(model.ops.norm, NormTriton)
    got = served_logits(model, ids_of(N_INTERPRETED), monkeypatch)
    want = served_logits(twin, ids_of(N_INTERPRETED), monkeypatch)
    assert want.abs().max() > 0.1
    err = (got - want).abs().max().item()
    print(f"Triton ops (interpreted) vs twins: max |logit diff| {err:.2e}")
    assert err <= 1e-4


@pytest.mark.gpu
def test_gpu_ops_equal_the_twins_bf16(tiny_checkpoint, monkeypatch):
    """bf16 on CUDA: the Triton ops within twice the bf16 twins' own distance to fp32."""
    ids = ids_of(N_TOKENS, "cuda")
    twin32 = load_served(tiny_checkpoint, kept=False, device="cuda", kernels=False)
    fp32 = served_logits(twin32, ids, monkeypatch)

    def bf16(kernels: bool) -> torch.Tensor:
        model = load_served(
            tiny_checkpoint, kept=False, device="cuda", dtype=torch.bfloat16, kernels=kernels
        )
        return served_logits(model, ids, monkeypatch).float()

    def rel(a):
        return ((a - fp32).norm() / fp32.norm()).item()

    twin, ours = rel(bf16(False)), rel(bf16(True))
    print(f"bf16 rel L2 to fp32: twins {twin:.2e}, Triton ops {ours:.2e}")
    assert ours <= max(2 * twin, 1e-2)
