"""The trainable batched model computes the reference model's function (fp32), and its two
losses train disjoint parameter sets (the indexer learns only from its KL loss)."""

import pytest
import torch
from hf_tiny import tiny_config_dict

from sglang_dsv4.config import DSV4Config
from sglang_dsv4.ref.model import RefDSV4
from sglang_dsv4.train.model import TrainDSV4, export_state_dict, init_weights


@pytest.fixture(scope="module")
def model() -> TrainDSV4:
    cfg = DSV4Config.from_dict(tiny_config_dict())  # index_topk 16 < 96 entries at 384 tokens
    m = TrainDSV4(cfg)
    init_weights(m, seed=0, std=0.05)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # zero-initialized tensors drawn, so that the test exercises them
        for name, p in m.named_parameters():
            if name.endswith(("attn_sink", ".ape", "_base")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for name, b in m.named_buffers():
            if name.endswith("gate.bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return m.eval()


def test_batched_forward_equals_reference_model(model):
    ids = torch.randint(
        0, model.cfg.vocab_size, (2, 384), generator=torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        out = model(ids, sparse=True, recall=True)
        dense = model(ids, sparse=False)
    ref = RefDSV4(model.cfg, dict(model.state_dict()))
    for b in range(2):
        want = ref(ids[b])
        assert (out.logits[b] - want).abs().max().item() <= 1e-4
    # the c4 top-k matters at this length, and recall is measured on queries that see > k
    assert (dense.logits - out.logits).abs().max().item() > 1e-2
    for set_recall, mass, rows in out.recall.values():
        assert 0 <= set_recall <= 1 and 0 < mass <= 1 and rows == 384 - 4 * 17 + 1


def test_lm_loss_and_indexer_kl_train_disjoint_parameters(model):
    model.train()
    ids = torch.randint(
        0, model.cfg.vocab_size, (1, 256), generator=torch.Generator().manual_seed(3)
    )
    out = model(ids, sparse=True, indexer_kl=True)
    lm = torch.nn.functional.cross_entropy(out.logits[0, :-1], ids[0, 1:])
    lm_grads = torch.autograd.grad(
        lm, list(model.parameters()), retain_graph=True, allow_unused=True
    )
    kl_grads = torch.autograd.grad(out.indexer_kl, list(model.parameters()), allow_unused=True)
    model.eval()
    names = [n for n, _ in model.named_parameters()]

    def touched(grads):
        return {n for n, g in zip(names, grads, strict=True) if g is not None and g.abs().sum() > 0}

    indexer = {n for n in names if ".indexer." in n}
    assert touched(kl_grads) == indexer and touched(lm_grads) == set(names) - indexer
    assert out.indexer_kl.item() > 0


def test_export_uses_the_released_dtypes(model):
    sd = export_state_dict(model)
    assert sd["layers.0.ffn.gate.tid2eid"].dtype == torch.int64
    assert sd["layers.2.attn.attn_sink"].dtype == torch.float32
    assert sd["layers.3.hc_attn_fn"].dtype == torch.float32
    assert sd["layers.2.attn.compressor.ape"].dtype == torch.float32
    assert sd["layers.1.ffn.gate.bias"].dtype == torch.float32
    assert sd["layers.2.attn.wq_a.weight"].dtype == torch.bfloat16
    assert sd["embed.weight"].dtype == torch.bfloat16
    assert set(sd) == set(RefDSV4(model.cfg, sd).required_names())


def test_mtp_head_equals_the_reference_mtp_layer():
    """``TrainDSV4(mtp=True)``: the MTP logits are :class:`~sglang_dsv4.ref.mtp.RefMTP`'s over
    the main model's final streams, and the export carries ``mtp.0.*`` in released dtypes."""
    from sglang_dsv4.ref.mtp import RefMTP

    cfg = DSV4Config.from_dict(tiny_config_dict())
    m = TrainDSV4(cfg, mtp=True)
    init_weights(m, seed=4, std=0.05)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("attn_sink", "_base")):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.5)
    m.eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 256), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out = m(ids, sparse=True)
    sd = dict(m.state_dict())
    main = RefDSV4(cfg, sd)
    h = main.streams(ids[0])
    nxt = torch.cat([ids[0, 1:], ids[0, -1:]])
    want, _ = RefMTP(cfg, sd)(nxt, h)
    assert (out.mtp_logits[0] - want).abs().max().item() <= 1e-4
    assert want.abs().max() > 0.1
    exported = export_state_dict(m)
    assert exported["mtp.0.hc_head_fn"].dtype == torch.float32
    assert exported["mtp.0.e_proj.weight"].dtype == torch.bfloat16
    assert {n for n in exported if n.startswith("mtp.")} == {
        n for n in sd if n.startswith("mtp.")
    } and len([n for n in sd if n.startswith("mtp.")]) > 50
