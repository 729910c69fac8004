"""The MTP layer's reference math vs an HF transformers decoder layer holding its weights.

HF drops the MTP layer, but its block is an ordinary SWA decoder layer: a one-layer HF model
(layer 0 = the MTP block, ``norm`` / ``hc_head`` = the MTP layer's, ``embed`` / ``head`` =
the main model's) run on the MTP input streams (written here from the formula of
dsv4_semantics.md 4.8 and SGLang's native ``DeepseekV4ModelNextN``) is the oracle.
"""

import pytest
import torch

from sglang_dsv4.ref.model import RefDSV4
from sglang_dsv4.ref.mtp import RefMTP, mtp_as_model, mtp_config
from sglang_dsv4.weights.make import mtp_tensors
from sglang_dsv4.weights.names import to_released_names

S = 300  # > 2 windows of 128


@pytest.fixture(scope="module")
def weights(tiny_cfg, tiny_weights):
    return tiny_weights | mtp_tensors(tiny_cfg, seed=7)


@pytest.fixture(scope="module")
def hf_mtp(tiny_dict, weights):
    """The one-layer HF model holding the MTP block (see the module docstring)."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    one = tiny_dict | {"num_hidden_layers": 1, "compress_ratios": [0, 0], "num_hash_layers": 0}
    model = DeepseekV4ForCausalLM(DeepseekV4Config(**one)).eval()
    src = mtp_as_model(weights)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            for released, view in to_released_names(name, t):
                view.copy_(src[released])
    return model


def _rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _hf_forward(model, x, ids):
    """DeepseekV4Model.forward (transformers 5.12.1) from the residual streams ``x`` [S, hc, d]."""
    from transformers.cache_utils import DynamicCache
    from transformers.masking_utils import create_sliding_window_causal_mask

    m = model.model
    pos = torch.arange(ids.shape[0])[None]
    embeds = x[None, :, 0]
    cache = DynamicCache(config=m.config)
    mask = create_sliding_window_causal_mask(
        config=m.config,
        inputs_embeds=embeds,
        attention_mask=None,
        past_key_values=cache,
        position_ids=pos,
    )
    pe = {k: m.rotary_emb(embeds, position_ids=pos, layer_type=k) for k in ("main", "compress")}
    h = m.layers[0](
        x[None],
        position_embeddings=pe,
        position_ids=pos,
        attention_mask=mask,
        input_ids=ids[None],
        past_key_values=cache,
    )
    return model.lm_head(m.norm(m.hc_head(h)))[0], h[0]


def test_mtp_layer_matches_hf_decoder_layer(tiny_cfg, weights, hf_mtp):
    g = torch.Generator().manual_seed(3)
    next_ids = torch.randint(2, tiny_cfg.vocab_size, (S,), generator=g)
    h = torch.randn(S, tiny_cfg.hc_mult, tiny_cfg.hidden_size, generator=g)
    w = weights
    e = _rms(w["embed.weight"][next_ids], w["mtp.0.enorm.weight"]) @ w["mtp.0.e_proj.weight"].T
    x = e[:, None] + _rms(h, w["mtp.0.hnorm.weight"]) @ w["mtp.0.h_proj.weight"].T
    with torch.no_grad():
        want, want_streams = _hf_forward(hf_mtp, x, next_ids)
    got, streams = RefMTP(tiny_cfg, weights)(next_ids, h)
    diff = (got - want).abs().max().item()
    assert diff <= 1e-4 and want.abs().max() > 1.0, f"max |logit diff| {diff:.3e}"
    assert (streams - want_streams).abs().max() <= 1e-4


def test_mtp_config_is_one_swa_score_routed_layer(tiny_cfg):
    one = mtp_config(tiny_cfg)
    (spec,) = one.layers
    assert spec.index == 0 and not spec.attn.compressed and not spec.hash_moe
    assert spec.rope.yarn is None and one.mtp_layers == () and one.num_layers == 1


def test_missing_mtp_tensors_raise(tiny_cfg, tiny_weights):
    with pytest.raises(KeyError, match=r"mtp\.0\.e_proj\.weight"):
        RefMTP(tiny_cfg, tiny_weights)


def test_draft_chain_extends_like_the_served_draft(tiny_cfg, weights):
    """Step k > 1 at position S + k - 2 reads step k-1's streams; rows before it stay those of
    step 1 (causal), so the chain equals one MTP pass over the grown sequence."""
    main = RefDSV4(tiny_cfg, weights)
    mtp = RefMTP(tiny_cfg, weights)
    ids = torch.randint(2, tiny_cfg.vocab_size, (130,), generator=torch.Generator().manual_seed(5))
    chain = mtp.draft_chain(main, ids, steps=3)
    assert len(chain) == 4
    h = main.streams(ids)
    logits, x1 = mtp(torch.cat([ids[1:], torch.tensor(chain[:1])]), h)
    assert int(logits[-1].argmax()) == chain[1]
    step2, _ = mtp(torch.cat([ids[1:], torch.tensor(chain[:2])]), torch.cat([h, x1[-1:]]))
    assert int(step2[-1].argmax()) == chain[2]
