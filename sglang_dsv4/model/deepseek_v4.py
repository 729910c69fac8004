"""``DeepseekV4ForCausalLM`` for SGLang: parameters under the released DeepSeek-V4 names, math
from :class:`~sglang_dsv4.ref.model.RefDSV4` and the attention wrappers (no second copy).

Each layer is built for its frozen kind (SWA / c4 / c128): it holds the matching parameters
and, at run time, the wrapper of its kind. Weights stream in tensor by tensor through
:meth:`load_weights` under released or HF transformers names, dense or in the released quantized
format (:mod:`sglang_dsv4.weights`), optionally re-stored as NVFP4 (config.json
``nvfp4_on_load``); MTP weights are skipped with a log line. On CUDA, FP4 routed experts stay
FP4 (:mod:`sglang_dsv4.model.experts`); everything else is dequantized once at load.
"""

import logging
import re
from collections.abc import Iterable

import torch
from sglang.srt.layers.logits_processor import LogitsProcessor
from sglang.srt.model_executor.forward_context import get_attn_backend
from torch import nn

from sglang_dsv4.attention.wrappers import CompressedInputs, IndexerInputs
from sglang_dsv4.config import AttnKind, DSV4Config, LayerSpec
from sglang_dsv4.model.experts import FP4Experts, fp4_expert_format
from sglang_dsv4.ref.mhc import hc_post
from sglang_dsv4.ref.model import RefDSV4
from sglang_dsv4.ref.norm import rms_norm
from sglang_dsv4.weights.layout import StoredWeight
from sglang_dsv4.weights.loader import WeightStream
from sglang_dsv4.weights.nvfp4 import CONFIG_KEY as NVFP4_KEY
from sglang_dsv4.weights.nvfp4 import nvfp4_scope, to_nvfp4

logger = logging.getLogger(__name__)

_EXPERT = re.compile(r"layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])\.weight\Z")

__all__ = ["DeepseekV4ForCausalLM"]


def _linear(n_in: int, n_out: int) -> nn.Linear:
    return nn.Linear(n_in, n_out, bias=False)


class _Norm(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))


class _Compressor(nn.Module):
    def __init__(self, hidden: int, head_dim: int, ratio: int, overlap: bool):
        super().__init__()
        coff = 2 if overlap else 1
        self.wkv = _linear(hidden, coff * head_dim)
        self.wgate = _linear(hidden, coff * head_dim)
        self.ape = nn.Parameter(torch.zeros(ratio, coff * head_dim))
        self.norm = _Norm(head_dim)


class _Indexer(nn.Module):
    def __init__(self, cfg: DSV4Config):
        super().__init__()
        self.wq_b = _linear(cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim)
        self.weights_proj = _linear(cfg.hidden_size, cfg.index_n_heads)
        self.compressor = _Compressor(
            cfg.hidden_size, cfg.index_head_dim, AttnKind.CSA.ratio, overlap=True
        )


class _Attention(nn.Module):
    def __init__(self, cfg: DSV4Config, spec: LayerSpec):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.wq_a = _linear(h, cfg.q_lora_rank)
        self.q_norm = _Norm(cfg.q_lora_rank)
        self.wq_b = _linear(cfg.q_lora_rank, cfg.num_heads * d)
        self.wkv = _linear(h, d)
        self.kv_norm = _Norm(d)
        self.wo_a = _linear(cfg.num_heads * d // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank)
        self.wo_b = _linear(cfg.o_groups * cfg.o_lora_rank, h)
        self.attn_sink = nn.Parameter(torch.zeros(cfg.num_heads))
        if spec.attn.compressed:
            self.compressor = _Compressor(h, d, spec.ratio, overlap=spec.attn is AttnKind.CSA)
        if spec.attn is AttnKind.CSA:
            self.indexer = _Indexer(cfg)


class _Expert(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.w1 = _linear(hidden, inter)
        self.w2 = _linear(inter, hidden)
        self.w3 = _linear(hidden, inter)


class _Gate(nn.Module):
    def __init__(self, cfg: DSV4Config, hash_moe: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cfg.n_routed_experts, cfg.hidden_size))
        if hash_moe:
            self.register_buffer(
                "tid2eid", torch.zeros(cfg.vocab_size, cfg.n_experts_per_tok, dtype=torch.long)
            )
        else:
            self.bias = nn.Parameter(torch.zeros(cfg.n_routed_experts, dtype=torch.float32))


class _MoE(nn.Module):
    def __init__(self, cfg: DSV4Config, spec: LayerSpec, fp4: str | None):
        super().__init__()
        self.gate = _Gate(cfg, spec.hash_moe)
        if fp4 is not None:  # kept quantized on the GPU (sglang_dsv4.model.experts)
            self.experts = FP4Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_inter_dim, fp4)
        else:
            self.experts = nn.ModuleList(
                _Expert(cfg.hidden_size, cfg.moe_inter_dim) for _ in range(cfg.n_routed_experts)
            )
        if cfg.n_shared_experts:
            self.shared_experts = _Expert(cfg.hidden_size, cfg.moe_inter_dim * cfg.n_shared_experts)


class _Block(nn.Module):
    def __init__(self, cfg: DSV4Config, spec: LayerSpec, fp4_experts: str | None):
        super().__init__()
        self.spec = spec
        self.attn_norm = _Norm(cfg.hidden_size)
        self.ffn_norm = _Norm(cfg.hidden_size)
        mix, flat = cfg.hc_mix_dim, cfg.hc_mult * cfg.hidden_size
        for site in ("attn", "ffn"):
            self.register_parameter(
                f"hc_{site}_fn", nn.Parameter(torch.zeros(mix, flat, dtype=torch.float32))
            )
            self.register_parameter(
                f"hc_{site}_base", nn.Parameter(torch.zeros(mix, dtype=torch.float32))
            )
            self.register_parameter(
                f"hc_{site}_scale", nn.Parameter(torch.ones(3, dtype=torch.float32))
            )
        self.attn = _Attention(cfg, spec)
        self.ffn = _MoE(cfg, spec, fp4_experts)


class DeepseekV4ForCausalLM(nn.Module):
    def __init__(self, config, quant_config=None, prefix: str = ""):
        super().__init__()
        if quant_config is not None:
            raise ValueError(
                "quantized DSV4 checkpoints are not supported yet (got a quant_config)"
            )
        self.config = config
        self.cfg = DSV4Config.from_dict(config.to_dict())
        cfg = self.cfg
        self.nvfp4 = nvfp4_scope(getattr(config, NVFP4_KEY, None))  # quantize-on-load option
        device = torch.get_default_device()  # SGLang builds the model under its target device
        fp4 = fp4_expert_format(cfg, self.nvfp4, device)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(_Block(cfg, spec, fp4) for spec in cfg.layers)
        self.norm = _Norm(cfg.hidden_size)
        flat = cfg.hc_mult * cfg.hidden_size
        self.hc_head_fn = nn.Parameter(torch.zeros(cfg.hc_mult, flat, dtype=torch.float32))
        self.hc_head_base = nn.Parameter(torch.zeros(cfg.hc_mult, dtype=torch.float32))
        self.hc_head_scale = nn.Parameter(torch.ones(1, dtype=torch.float32))
        self.head = _linear(cfg.hidden_size, cfg.vocab_size)
        self.logits_processor = LogitsProcessor(config)
        self._ref: RefDSV4 | None = None

    @property
    def ref(self) -> RefDSV4:
        """The reference math over this module's tensors (built once the weights are in)."""
        if self._ref is None:
            tensors = dict(self.named_parameters()) | dict(self.named_buffers())
            fp4 = {b.spec.index: b.ffn.experts for b in self.layers}
            fp4 = {i: ex for i, ex in fp4.items() if isinstance(ex, FP4Experts)}
            for i, ex in fp4.items():
                tensors |= ex.named_expert_views(f"layers.{i}.ffn.experts.")
            self._ref = RefDSV4(self.cfg, tensors)
            for i, ex in fp4.items():  # experts dequantize on use (kernel), one at a time
                self._ref.experts[i] = ex.banks(self.head.weight.dtype)
        return self._ref

    def get_attention_sliding_window_size(self) -> int:
        return self.cfg.sliding_window

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch, **kwargs):
        ref, cfg = self.ref, self.cfg
        backend = get_attn_backend()
        positions = positions.long()
        # Inside a CUDA-graph capture every op must be free of data-dependent shapes.
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        x = ref.embed_streams(input_ids)  # [T, hc, d]
        for block in self.layers:
            spec = block.spec
            p = f"layers.{spec.index}."
            u, post, comb = ref.hc_pre(x, p + "hc_attn_")
            h = rms_norm(u, block.attn_norm.weight, cfg.norm_eps)
            y = self._attention(block, h, positions, backend)
            x = hc_post(y, x, post, comb)
            u, post, comb = ref.hc_pre(x, p + "hc_ffn_")
            h = rms_norm(u, block.ffn_norm.weight, cfg.norm_eps)
            y = ref.ffn(spec, h, input_ids, graph_safe=capturing)
            x = hc_post(y, x, post, comb)
        hidden = ref.final_hidden(x)
        return self.logits_processor(input_ids, hidden, self.head, forward_batch)

    def _attention(
        self, block: _Block, x: torch.Tensor, positions: torch.Tensor, backend
    ) -> torch.Tensor:
        ref, cfg, spec = self.ref, self.cfg, block.spec
        qr, q, kv = ref.project(spec, x, positions)
        comp = None
        if spec.attn.compressed:
            indexer = None
            if spec.attn is AttnKind.CSA:
                iq, iw = ref.indexer_query(spec, x, qr, positions)
                iw_comp = ref.compressor_weights(spec.index, "indexer.compressor")
                indexer = IndexerInputs(iq, iw, iw_comp, cfg.index_topk)
            comp = CompressedInputs(
                x,
                ref.compressor_weights(spec.index),
                ref.inv_freq[spec.index],
                cfg.norm_eps,
                indexer,
            )
        lk = backend.token_to_kv_pool.layer(spec.index)
        o = backend.run(spec.attn, lk, q, kv, block.attn.attn_sink, cfg.head_dim**-0.5, comp)
        return ref.output(spec, o, positions)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Stream checkpoint tensors (HF or released names, dense or released-format quantized)
        into the parameters; quantized weights are dequantized once, here (after the NVFP4
        re-quantization when ``nvfp4_on_load`` asks for it). Errors name the
        tensor and the expected / found shape and dtype (:mod:`sglang_dsv4.weights.loader`)."""
        params = dict(self.named_parameters()) | dict(self.named_buffers())

        def deliver(name: str, stored: StoredWeight) -> None:
            if self.nvfp4 is not None and self.nvfp4(name):
                stored = to_nvfp4(stored)
            if (m := _EXPERT.match(name)) and name not in params:  # an FP4 bank slot
                layer, expert, proj = m.groups()
                self.layers[int(layer)].ffn.experts.store(int(expert), proj, stored)
                return
            param = params[name]
            param.data.copy_(stored.dequant(param.dtype) if stored.fmt.quantized else stored.data)

        stats = WeightStream(self.cfg, deliver).run(weights)
        logger.info("DSV4: loaded %d tensors (%s)", stats.delivered, stats.formats)
        if stats.skipped_mtp:
            logger.info(
                "DSV4: skipped %d MTP tensors (speculative decoding is not wired yet)",
                stats.skipped_mtp,
            )
        self._ref = None


EntryClass = DeepseekV4ForCausalLM
