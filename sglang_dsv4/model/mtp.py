"""``DeepseekV4ForCausalLMNextN``: the checkpoint's MTP layer served as SGLang's speculative
draft model (EAGLE with top-k 1; SGLang renames a DSV4 draft's architecture to this class).

The math is :mod:`sglang_dsv4.ref.mtp`: the input streams mix the next token's embedding with
the previous streams (``spec_info.hidden_states``: the target's final residual streams [T,
hc*d], or this model's own at later draft steps), then the MTP block runs as layer 0 of a
one-layer DSV4 (:func:`~sglang_dsv4.ref.mtp.mtp_config`) through the same ops, attention
backend and pool kinds as the target: its KV (one SWA layer) lives in a draft pool of its own,
addressed by the same full / swa slots (SGLang shares the target's allocator). ``embed`` and
``head`` are the target's (``set_embed_and_head``). The logits processor returns this layer's
output streams (before its ``hc_head``) as the next step's hidden states.

Parameters follow the table (:func:`sglang_dsv4.params.mtp_specs`): the block under
``layers.0.``, the MTP rows under their own names (``enorm``, ``e_proj``, ``norm``,
``hc_head_fn`` ...); checkpoint tensors ``mtp.0.*`` are loaded into them by name.
"""

import logging
from collections.abc import Iterable

import torch
from sglang.srt.layers.logits_processor import LogitsProcessor
from sglang.srt.model_executor.forward_context import get_attn_backend
from torch import nn

from sglang_dsv4.config import DSV4Config
from sglang_dsv4.model.deepseek_v4 import DeepseekV4ForCausalLM, _Block
from sglang_dsv4.model.linears import KeptFormats, keeps_quantized
from sglang_dsv4.model.tp import TP
from sglang_dsv4.ops import build_ops
from sglang_dsv4.params import MTP_ROWS, declare, mtp_prefix, mtp_specs
from sglang_dsv4.ref.mtp import input_weights, mtp_config, mtp_input
from sglang_dsv4.weights.nvfp4 import CONFIG_KEY as NVFP4_KEY
from sglang_dsv4.weights.nvfp4 import nvfp4_scope

logger = logging.getLogger(__name__)

__all__ = ["DeepseekV4ForCausalLMNextN"]

_OWN = tuple(r.name for r in MTP_ROWS)  # enorm, hnorm, e_proj, h_proj, norm, hc_head_*


class DeepseekV4ForCausalLMNextN(DeepseekV4ForCausalLM):
    """The MTP layer ``0`` as a draft model (module docstring)."""

    def __init__(self, config, quant_config=None, prefix: str = ""):
        nn.Module.__init__(self)
        if quant_config is not None:
            raise ValueError(
                "quantized DSV4 checkpoints are not supported yet (got a quant_config)"
            )
        self.config = config
        self.full_cfg = DSV4Config.from_dict(config.to_dict())
        if not self.full_cfg.mtp_layers:
            raise ValueError(
                "speculative decoding drafts with the checkpoint's MTP layer, but config.json "
                "has num_nextn_predict_layers = 0"
            )
        self.cfg = mtp_config(self.full_cfg)  # the MTP block as layer 0 of a one-layer DSV4
        self.nvfp4 = nvfp4_scope(getattr(config, NVFP4_KEY, None))
        device = torch.get_default_device()
        kept = KeptFormats(self.full_cfg, self.nvfp4, keeps_quantized(device))
        # one rank: speculative decoding with --tp > 1 is refused at startup (arg_rules)
        self.tp, self._kept, self._dtype = TP(), kept, torch.get_default_dtype()
        p = mtp_prefix(0)
        own = [s for s in mtp_specs(self.full_cfg, 0).values() if s.name.removeprefix(p) in _OWN]
        declare(self, own, strip=p, linear=kept.linear)
        self.layers = nn.ModuleList([_Block(self.full_cfg, self.cfg.layers[0], kept, p)])
        self.embed = self.head = None  # the target's: set_embed_and_head
        self.logits_processor = LogitsProcessor(config)
        self._ref = self._projections = None  # both derived once the weights are in
        self.ops = build_ops(self.cfg, device)

    def set_embed_and_head(self, embed: torch.Tensor, head: torch.Tensor) -> None:
        """The target's embedding and head weights, shared (no copy)."""
        self.embed = nn.Embedding.from_pretrained(embed, freeze=True)
        self.head = nn.Linear(head.shape[1], head.shape[0], bias=False)
        self.head.weight = head if isinstance(head, nn.Parameter) else nn.Parameter(head, False)
        self._ref = self._projections = None

    def _param_name(self, name: str) -> str:
        rel = name.removeprefix(mtp_prefix(0))
        return rel if rel in _OWN else "layers.0." + rel

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """The checkpoint's ``mtp.0.*`` tensors (the main model's are skipped); a checkpoint
        without them stops with an error that says so."""
        stats = self._load_stream(weights, mtp=True)
        logger.info(
            "DSV4 MTP draft: loaded layer mtp.0 (%d main-model tensors skipped)", stats.skipped
        )

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch, **kwargs):
        backend = get_attn_backend()
        positions = positions.long()
        hc, block, cfg = self.ops.hc, self.layers[0], self.cfg
        n = input_ids.shape[0]
        h = forward_batch.spec_info.hidden_states[:n].view(n, cfg.hc_mult, cfg.hidden_size)
        wi = input_weights(self.ref.w, "")  # (enorm, hnorm, e_proj, h_proj)
        x = mtp_input(cfg, wi, self.ref.w["embed.weight"][input_ids], h.to(wi[0].dtype))
        u, post, comb = hc.pre(x, self._hc_site(block, "attn"))  # [T, d]
        y = self._attention(block, u, positions, backend)
        x, u, post, comb = hc.post_pre(y, x, post, comb, self._hc_site(block, "ffn"))
        y = self.ops.moe.ffn(block.ffn, u, input_ids)
        x = hc.post(y, x, post, comb)  # [T, hc, d]: the next draft step's hidden states
        hidden = hc.head(x, self._head_site())
        return self.logits_processor(
            input_ids, hidden, self.head, forward_batch, hidden_states_before_norm=x.flatten(1)
        )


EntryClass = DeepseekV4ForCausalLMNextN
