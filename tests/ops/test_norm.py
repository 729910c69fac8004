"""``ops.norm``: ``NormTriton`` (interpreted on CPU) equals the twin ``NormTorch`` on the
attention block's shapes (tiny config), and returns its results in the input's place."""

import torch

from sglang_dsv4.ops.norm import NormTorch, NormTriton
from sglang_dsv4.ref.rope import rope_inv_freq


def close(a, b, tol=1e-5) -> bool:
    return a.shape == b.shape and (a - b).abs().max().item() <= tol * max(1.0, b.abs().max())


def test_attention_path_equals_the_twin(tiny_cfg):
    cfg, gen = tiny_cfg, torch.Generator().manual_seed(0)
    twin, ours = NormTorch(cfg), NormTriton(cfg)
    n = 6
    pos = torch.randint(0, 5000, (n,), generator=gen)
    inv_freq = rope_inv_freq(cfg.layers[2].rope, cfg.rope_dim)
    qa, w = torch.randn(n, cfg.q_lora_rank, generator=gen), torch.rand(cfg.q_lora_rank) + 0.5
    assert close(ours.rms(qa, w), twin.rms(qa, w))
    q = torch.randn(n, cfg.num_heads, cfg.head_dim, generator=gen)
    want = twin.rms_rope(q, None, pos, inv_freq)
    got = ours.rms_rope(q, None, pos, inv_freq)
    assert got is q and close(got, want)  # in place
    kv, kw = torch.randn(n, cfg.head_dim, generator=gen), torch.rand(cfg.head_dim) + 0.5
    assert close(ours.rms_rope(kv.clone(), kw, pos, inv_freq), twin.rms_rope(kv, kw, pos, inv_freq))
    iq = torch.randn(n, cfg.index_n_heads, cfg.index_head_dim, generator=gen)
    assert close(ours.rope(iq.clone(), pos, inv_freq), twin.rope(iq, pos, inv_freq))
    rotated = ours.rope(iq.clone(), pos, inv_freq, hadamard=True)
    assert close(rotated, twin.rope(iq, pos, inv_freq, hadamard=True))
    o = torch.randn(n, cfg.num_heads, cfg.head_dim, generator=gen)
    back = ours.rope(ours.rope(o.clone(), pos, inv_freq), pos, inv_freq, inverse=True)
    assert close(back, o, 1e-5) and close(
        ours.rope(o.clone(), pos, inv_freq, inverse=True), twin.rope(o, pos, inv_freq, True)
    )


def test_rms_of_strided_rows_and_of_stacked_rows(tiny_cfg):
    """2-D rows (``q_norm``'s input: a strided split of the fused input GEMM) go to the kernel as
    they are, no reshape / view ops; other shapes through a reshape: the same values."""
    gen, n = torch.Generator().manual_seed(1), tiny_cfg.q_lora_rank
    ours = NormTriton(tiny_cfg)
    rows = torch.randn(6, 3 * n, generator=gen)[:, n : 2 * n]  # row stride 3n
    w = torch.rand(n, generator=gen) + 0.5
    got = ours.rms(rows, w)
    assert got.shape == (6, n) and close(got, NormTorch(tiny_cfg).rms(rows, w))
    stacked = ours.rms(rows.contiguous().view(2, 3, n), w)
    assert stacked.shape == (2, 3, n) and torch.equal(stacked.view(6, n), got)
