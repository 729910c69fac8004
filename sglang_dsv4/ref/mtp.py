"""The MTP (next-next-token) layer of DSV4, the draft of speculative decoding: reference math.

MTP layer ``j`` (tensors ``mtp.{j}.*``, :data:`sglang_dsv4.params.MTP_ROWS` + one block) reads,
for the token at position ``t``, the main model's last residual streams ``H_t`` [hc, d] (before
``hc_head``: they predicted token ``t+1``) and the embedding of token ``t+1``, and predicts token
``t+2``:

* ``x = e_proj(enorm(embed(ids_{t+1})))`` broadcast over the ``hc`` streams
  ``+ h_proj(hnorm(H_t))`` per stream: [hc, d];
* one full decoder block at position ``t`` (SWA attention with plain RoPE over the MTP layer's
  own window, score-routed MoE, its own mHC);
* its own ``hc_head_*`` and ``norm``, then the main model's ``head``.

Its output streams (before its ``hc_head``) stand in for ``H`` at the next draft step.

The block part is exactly a one-layer DSV4 (:func:`mtp_as_model`): the MTP layer renamed to
``layers.0.*`` with its ``norm`` / ``hc_head_*`` as the model's and the main ``embed`` / ``head``;
the served draft model runs it that way through the same backend and pools as the target.
"""

import dataclasses
from collections.abc import Mapping

import torch

from sglang_dsv4.config import DSV4Config
from sglang_dsv4.params import MTP_ROWS, mtp_prefix
from sglang_dsv4.ref.linear import Weight, linear
from sglang_dsv4.ref.model import RefDSV4
from sglang_dsv4.ref.norm import rms_norm

__all__ = ["RefMTP", "input_weights", "mtp_as_model", "mtp_config", "mtp_input"]

# the MTP rows that stand in for the one-layer model's own (the rest feed ``mtp_input``)
_AS_MODEL = ("norm.weight", "hc_head_fn", "hc_head_base", "hc_head_scale")
_INPUT = tuple(r.name for r in MTP_ROWS if r.name not in _AS_MODEL)


def mtp_config(cfg: DSV4Config, j: int = 0) -> DSV4Config:
    """The one-layer DSV4 of MTP layer ``j``: its block as layer 0, no MTP layers."""
    spec = dataclasses.replace(cfg.mtp_layers[j], index=0)
    return cfg.replace(num_layers=1, layers=(spec,), mtp_layers=())


def mtp_as_model(weights: Mapping[str, Weight], j: int = 0) -> dict[str, Weight]:
    """The one-layer model's weights (:func:`mtp_config` names) from full-model ``weights``
    (main ``embed`` / ``head`` + ``mtp.{j}.*``): no copies."""
    p = mtp_prefix(j)
    out: dict[str, Weight] = {n: weights[n] for n in ("embed.weight", "head.weight")}
    for name, w in weights.items():
        if not name.startswith(p):
            continue
        rel = name.removeprefix(p)
        if rel in _AS_MODEL:
            out[rel] = w
        elif rel not in _INPUT:
            out["layers.0." + rel] = w
    return out


def mtp_input(
    cfg: DSV4Config,
    w: tuple[Weight, Weight, Weight, Weight],
    embeds: torch.Tensor,
    h: torch.Tensor,
) -> torch.Tensor:
    """The MTP layer's input streams [T, hc, d] from the next tokens' embeddings ``embeds``
    [T, d] and the previous streams ``h`` [T, hc, d]; ``w`` = its (enorm, hnorm, e_proj,
    h_proj) weights."""
    enorm, hnorm, e_proj, h_proj = w
    e = linear(rms_norm(embeds, enorm, cfg.norm_eps), e_proj)  # [T, d]
    hn = rms_norm(h, hnorm, cfg.norm_eps)  # per stream
    return e.unsqueeze(1) + linear(hn, h_proj)  # [T, hc, d]


def input_weights(w: Mapping[str, Weight], prefix: str) -> tuple[Weight, ...]:
    """(enorm, hnorm, e_proj, h_proj) of the MTP layer under ``prefix``."""
    return tuple(w[prefix + n + ".weight"] for n in ("enorm", "hnorm", "e_proj", "h_proj"))


class RefMTP:
    """``RefMTP(cfg, weights, j)(next_ids [S], h [S, hc, d]) -> (logits [S, vocab], streams
    [S, hc, d])`` over a whole sequence from position 0: row ``t`` pairs the main model's
    streams ``h[t]`` at position ``t`` with token ``next_ids[t]`` (the token at ``t+1``) and
    predicts the token at ``t+2``. ``weights``: full-model released names (main ``embed`` /
    ``head`` and ``mtp.{j}.*``)."""

    def __init__(self, cfg: DSV4Config, weights: Mapping[str, Weight], j: int = 0):
        self.cfg, self.w, self.prefix = cfg, weights, mtp_prefix(j)
        missing = [self.prefix + n for n in _INPUT if self.prefix + n not in weights]
        if missing:
            raise KeyError(f"MTP layer {j}: tensors missing from the weights: {missing}")
        self.body = RefDSV4(mtp_config(cfg, j), mtp_as_model(weights, j))

    @torch.no_grad()
    def __call__(self, next_ids: torch.Tensor, h: torch.Tensor):
        wi = input_weights(self.w, self.prefix)
        x = mtp_input(self.cfg, wi, self.w["embed.weight"][next_ids], h)
        x = self.body.blocks(x, next_ids)
        return linear(self.body.final_hidden(x), self.w["head.weight"]), x

    @torch.no_grad()
    def draft_chain(self, main: RefDSV4, ids: torch.Tensor, steps: int) -> list[int]:
        """Greedy draft tokens after prompt ``ids`` [S] whose next token is ``ids``' greedy
        continuation by ``main``: MTP step 1 reads the main streams, step k > 1 its own output
        streams of step k-1 (as the served draft does). Returns [next token, draft_1, ...,
        draft_steps] (the first from the main model)."""
        h = main.streams(ids)
        nxt = int(linear(main.final_hidden(h[-1:]), self.w["head.weight"]).argmax())
        out, tokens, streams = [nxt], [*ids[1:].tolist(), nxt], h
        for _ in range(steps):
            ids_t = torch.tensor(tokens, device=ids.device)
            logits, x = self(ids_t, streams)
            out.append(int(logits[-1].argmax()))
            # next step: the draft token appended, paired with this step's last streams
            tokens.append(out[-1])
            streams = torch.cat([streams, x[-1:]])
        return out
