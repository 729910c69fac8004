"""``DeepseekV4ForCausalLM`` for SGLang: parameters under the released DeepSeek-V4 names, the
math of :class:`~sglang_dsv4.ref.model.RefDSV4` run through ``self.ops``
(:func:`sglang_dsv4.ops.build_ops`, built once from the device: Triton kernels on CUDA, the
``ref`` twins on CPU, which give the reference's numbers exactly) and the attention wrappers.

Each layer is built for its frozen kind (SWA / c4 / c128): it holds the matching parameters
and, at run time, the wrapper of its kind. Weights stream in tensor by tensor through
:meth:`load_weights` under released or HF transformers names, dense or in the released quantized
format (:mod:`sglang_dsv4.weights`), optionally re-stored as NVFP4 (config.json
``nvfp4_on_load``); MTP weights are left to the speculative draft model (:mod:`.mtp`).

Where quantized weights go (decided per released name by
:class:`~sglang_dsv4.model.linears.KeptFormats`):

* CPU: everything is dequantized once at load into dense ``nn.Linear`` weights;
* CUDA: the released FP8 linears (attention ``wq_a wq_b wkv wo_b``, ``indexer.wq_b``, shared
  experts) stay FP8 in :class:`~sglang_dsv4.model.linears.FP8Linear` (W8A16 kernel);
  NVFP4-on-load linears stay NVFP4 (:class:`~sglang_dsv4.model.linears.NVFP4Linear`); routed
  experts are one bank per layer (dense, FP8 of ``expert_dtype: fp8`` with the shared expert as
  a row, or FP4) run by grouped kernels (:mod:`sglang_dsv4.model.experts`, ``self.ops.moe``).
  ``wo_a`` and the BF16 / FP32 tensors are dense. The reference math calls the quantized
  modules through :func:`~sglang_dsv4.ref.linear.linear`; all of them are CUDA-graph safe.
"""

import logging
import re
from collections.abc import Iterable

import torch
from sglang.srt.layers.logits_processor import LogitsProcessor
from sglang.srt.model_executor.forward_context import get_attn_backend
from torch import nn

from sglang_dsv4.attention.decode import KVNorm
from sglang_dsv4.attention.wrappers import CompressedInputs, IndexerInputs
from sglang_dsv4.config import AttnKind, DSV4Config, LayerSpec
from sglang_dsv4.model.experts import MoE
from sglang_dsv4.model.linears import KeptFormats, QuantLinear, keeps_quantized
from sglang_dsv4.model.tp import current_tp
from sglang_dsv4.ops import HcWeights, build_ops
from sglang_dsv4.params import block_specs, declare, model_specs
from sglang_dsv4.ref.model import RefDSV4
from sglang_dsv4.weights.layout import StoredWeight
from sglang_dsv4.weights.loader import TensorMismatchError, WeightStream
from sglang_dsv4.weights.nvfp4 import CONFIG_KEY as NVFP4_KEY
from sglang_dsv4.weights.nvfp4 import nvfp4_scope, to_nvfp4

logger = logging.getLogger(__name__)

_FFN = re.compile(r"layers\.(\d+)\.ffn\.(.+)\Z")

_X_SWA = ("wq_a", "wkv")
_X_HCA = (*_X_SWA, "compressor.wkv", "compressor.wgate")
_X_CSA = (*_X_HCA, "indexer.compressor.wkv", "indexer.compressor.wgate", "indexer.weights_proj")
READS: dict[AttnKind, tuple[tuple[str, ...], tuple[str, ...]]] = {
    AttnKind.SWA: (_X_SWA, ("wq_b",)),
    AttnKind.HCA: (_X_HCA, ("wq_b",)),
    AttnKind.CSA: (_X_CSA, ("wq_b", "indexer.wq_b")),
}
"""The one table of the linears that share an input, by layer kind (names under
``layers.i.attn.``, in output order): those reading the normed attention input ``x``, then
those reading the normed ``q_lora`` row. The checkpoint keeps these names; ``ops.proj`` fuses
each tuple into one GEMM at load (a derived buffer)."""

__all__ = ["DeepseekV4ForCausalLM"]


class _Block(nn.Module):
    """One decoder block of kind ``spec``: its rows of the parameter-spec table
    (:func:`sglang_dsv4.params.block_specs`) under ``prefix`` (``layers.{i}.``), the linears
    as ``kept`` decides, and its MoE (``ffn``) as expert banks
    (:mod:`sglang_dsv4.model.experts`)."""

    def __init__(self, cfg: DSV4Config, spec: LayerSpec, kept: KeptFormats, prefix: str):
        super().__init__()
        self.spec = spec
        own = [
            s
            for s in block_specs(cfg, spec, prefix).values()
            if not s.name.startswith(prefix + "ffn.")
        ]
        declare(self, own, strip=prefix, linear=kept.linear)
        self.ffn = MoE(cfg, spec, kept, prefix + "ffn.")


class DeepseekV4ForCausalLM(nn.Module):
    def __init__(self, config, quant_config=None, prefix: str = ""):
        super().__init__()
        if quant_config is not None:
            raise ValueError(
                "quantized DSV4 checkpoints are not supported yet (got a quant_config)"
            )
        self.config = config
        self.full_cfg = DSV4Config.from_dict(config.to_dict())
        # --tp N: this rank's heads, output groups and expert columns (sglang_dsv4.model.tp)
        self.tp = current_tp()
        self.cfg = cfg = self.tp.local_cfg(self.full_cfg)
        self.nvfp4 = nvfp4_scope(getattr(config, NVFP4_KEY, None))  # quantize-on-load option
        device = torch.get_default_device()  # SGLang builds the model under its target device
        kept = KeptFormats(cfg, self.nvfp4, keeps_quantized(device))
        # embed, head, norm, hc_head_*: the table's rows outside the layers
        top = [s for s in model_specs(cfg).values() if not s.name.startswith("layers.")]
        declare(self, top, linear=kept.linear)
        if self.tp.size > 1:  # vocabulary rows split as SGLang's DeepSeek models split them
            self.embed, self.head = self.tp.vocab_modules(cfg)
        self._kept, self._dtype = kept, torch.get_default_dtype()
        # chosen once: the table read, or the vocabulary-parallel lookup under TP
        self._embed_streams = self._parallel_streams if self.tp.size > 1 else self._table_streams
        self.layers = nn.ModuleList(
            _Block(cfg, spec, kept, f"layers.{spec.index}.") for spec in cfg.layers
        )
        self.logits_processor = LogitsProcessor(config)
        self._ref: RefDSV4 | None = None
        self._projections: dict | None = None  # derived from the weights at load
        self.ops = build_ops(cfg, device)  # Triton kernels on CUDA, the ref twins on CPU

    @property
    def ref(self) -> RefDSV4:
        """The reference math over this module's tensors (built once the weights are in)."""
        if self._ref is None:
            weights = dict(self.named_parameters()) | dict(self.named_buffers())
            # a kept-quantized linear stands in for its weight (ref.linear calls it)
            weights |= {f"{n}.weight": m for n, m in self._quant_linears().items()}
            for b in self.layers:  # experts held in banks: views (or FP8 row linears) by name
                weights |= b.ffn.ref_weights(f"layers.{b.spec.index}.ffn.")
            experts = {b.spec.index: b.ffn.experts.routed() for b in self.layers if b.ffn.fp4}
            self._ref = RefDSV4(self.cfg, weights, experts=experts)
        return self._ref

    def _quant_linears(self) -> dict[str, QuantLinear]:
        return {n: m for n, m in self.named_modules() if isinstance(m, QuantLinear)}

    def get_attention_sliding_window_size(self) -> int:
        return self.cfg.sliding_window

    def get_embed_and_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """SGLang's EAGLE worker shares them with the draft model (:mod:`.mtp`)."""
        return self.embed.weight, self.head.weight

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch, **kwargs):
        backend = get_attn_backend()
        positions = positions.long()
        hc, layers, reduce = self.ops.hc, self.layers, self.tp.reduce
        x = self._embed_streams(input_ids)  # [T, hc, d]
        h, post, comb = hc.pre(x, self._hc_site(layers[0], "attn"))  # h [T, d]: normed input
        for i, block in enumerate(layers):
            y = reduce(self._attention(block, h, positions, backend))  # TP: partial sums
            x, h, post, comb = hc.post_pre(y, x, post, comb, self._hc_site(block, "ffn"))
            y = reduce(self.ops.moe.ffn(block.ffn, h, input_ids))
            if i + 1 < len(layers):
                site = self._hc_site(layers[i + 1], "attn")
                x, h, post, comb = hc.post_pre(y, x, post, comb, site)
        # the MTP draft reads the streams (forward_batch is None in model-only tests)
        if forward_batch is not None and forward_batch.capture_hidden_mode.need_capture():
            x = hc.post(y, x, post, comb)  # [T, hc, d]
            hidden, streams = hc.head(x, self._head_site()), x.flatten(1)
        else:
            hidden, streams = hc.post_head(y, x, post, comb, self._head_site()), None
        return self.logits_processor(
            input_ids, hidden, self.head, forward_batch, hidden_states_before_norm=streams
        )

    def _table_streams(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [T] -> the ``hc_mult`` residual streams [T, hc, d]."""
        return self.ref.embed_streams(input_ids)

    def _parallel_streams(self, input_ids: torch.Tensor) -> torch.Tensor:
        """:meth:`_table_streams` under TP: SGLang's vocabulary-parallel lookup (masked rows of
        this rank's part + all-reduce)."""
        h = self.embed(input_ids)  # [T, d]
        return h.unsqueeze(1).expand(-1, self.cfg.hc_mult, -1).contiguous()

    @staticmethod
    def _hc_site(block: _Block, site: str) -> HcWeights:
        """The mHC weights before ``block``'s ``site`` (attn / ffn) and that block's norm."""
        norm = block.attn_norm if site == "attn" else block.ffn_norm
        return HcWeights(
            getattr(block, f"hc_{site}_fn"),
            getattr(block, f"hc_{site}_base"),
            getattr(block, f"hc_{site}_scale"),
            norm.weight,
        )

    def _head_site(self) -> HcWeights:
        return HcWeights(self.hc_head_fn, self.hc_head_base, self.hc_head_scale, self.norm.weight)

    def _attention(
        self, block: _Block, x: torch.Tensor, positions: torch.Tensor, backend
    ) -> torch.Tensor:
        """``ref.RefDSV4.project`` / ``output`` through ``self.ops``: normed input ``x`` [T, d]
        -> the attention block's output [T, d]. The linears that read ``x`` (and those that
        read ``q_lora``) run as one GEMM each (``ops.proj``, :data:`READS`)."""
        ref, cfg, spec, norm = self.ref, self.cfg, block.spec, self.ops.norm
        w, p, n = ref.w, f"layers.{spec.index}.attn.", x.shape[0]
        inv_freq = ref.inv_freq[spec.index]
        reads_x, reads_qr, out = self.projections[spec.index]
        xs = dict(zip(READS[spec.attn][0], self.ops.proj.run(reads_x, x), strict=True))
        qr = norm.rms(xs["wq_a"], w[p + "q_norm.weight"])  # [T, q_lora]
        qs = dict(zip(READS[spec.attn][1], self.ops.proj.run(reads_qr, qr), strict=True))
        q = qs["wq_b"].view(n, cfg.num_heads, cfg.head_dim)
        q = norm.rms_rope(q, None, positions, inv_freq)  # [T, H, D]
        # raw wkv(x): the backend applies kv_norm + RoPE inside its KV store (one fused kernel
        # on the GPU decode path)
        kv_norm = KVNorm(w[p + "kv_norm.weight"], inv_freq, positions, cfg.norm_eps)
        comp = None
        if spec.attn.compressed:
            indexer = None
            if spec.attn is AttnKind.CSA:
                iq = qs["indexer.wq_b"].view(n, cfg.index_n_heads, cfg.index_head_dim)
                indexer = IndexerInputs(
                    norm.rope(iq, positions, inv_freq),  # [T, Hi, Di] roped
                    xs["indexer.weights_proj"],  # [T, Hi]
                    ref.compressor_weights(spec.index, "indexer.compressor"),
                    cfg.index_topk,
                    (xs["indexer.compressor.wkv"], xs["indexer.compressor.wgate"]),
                )
            comp = CompressedInputs(
                x, ref.compressor_weights(spec.index), inv_freq, cfg.norm_eps, indexer,
                (xs["compressor.wkv"], xs["compressor.wgate"]),
            )  # fmt: skip
        lk = backend.token_to_kv_pool.layer(spec.index)
        sink, scale = block.attn.attn_sink, cfg.head_dim**-0.5
        o = backend.run(spec.attn, lk, q, xs["wkv"], sink, scale, comp, kv_norm=kv_norm)
        o = norm.rope(o, positions, inv_freq, inverse=True)  # [T, H, D]
        return self.ops.proj.grouped(o, out)

    @property
    def projections(self) -> dict:
        """Layer index -> what ``ops.proj.run`` takes for the linears reading ``x`` and those
        reading ``q_lora`` (:data:`READS`), and what ``ops.proj.grouped`` takes for the output
        projection, derived from the loaded weights once."""
        if self._projections is None:
            self._projections = self._fuse_projections()
        return self._projections

    def _fuse_projections(self) -> dict:
        w, proj, cfg = self.ref.w, self.ops.proj, self.cfg
        out = {}
        for b in self.layers:
            p = f"layers.{b.spec.index}.attn."
            groups = READS[b.spec.attn]
            fused = tuple(proj.fuse([w[f"{p}{n}.weight"] for n in g]) for g in groups)
            wo_a = w[p + "wo_a.weight"]  # [G*R, H/G*D] (this rank's heads under TP)
            n_groups = cfg.num_heads * cfg.head_dim // wo_a.shape[1]
            out[b.spec.index] = (*fused, proj.fuse_grouped(wo_a, w[p + "wo_b.weight"], n_groups))
        return out

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Stream checkpoint tensors (HF or released names, dense or released-format quantized)
        into the parameters (after the NVFP4 re-quantization when ``nvfp4_on_load`` asks for
        it). Weights the model keeps quantized (module docstring) are copied as they are into
        their modules' buffers; other quantized weights are dequantized once, here. Errors name
        the tensor and the expected / found shape and dtype (:mod:`sglang_dsv4.weights.loader`)."""
        stats = self._load_stream(weights, mtp=False)
        if stats.skipped:
            logger.info("DSV4: skipped %d MTP tensors (the speculative draft's)", stats.skipped)
        # after the weights are in: concatenated projections (the GPU's ops.proj) are derived
        # buffers whose parts become views, so later loads write through them
        self._projections = self._fuse_projections()

    def _param_name(self, name: str) -> str:
        """The parameter holding logical tensor ``name``."""
        return name

    def _load_stream(self, weights: Iterable[tuple[str, torch.Tensor]], mtp: bool):
        """Stream the main model's (``mtp``: the MTP layers') tensors into the parameters."""
        params = dict(self.named_parameters()) | dict(self.named_buffers())
        quant = {f"{n}.weight": m for n, m in self._quant_linears().items()}

        def deliver(logical: str, stored: StoredWeight) -> None:
            name = self._param_name(logical)
            if self.nvfp4 is not None and self.nvfp4(logical):
                stored = to_nvfp4(stored)
            try:
                stored = self.tp.shard(logical, stored, self._dtype, self._kept.kept)  # TP part
                if (module := quant.get(name)) is not None:
                    module.load(stored)
                    return
                if (m := _FFN.match(name)) and self.layers[int(m[1])].ffn.store(m[2], stored):
                    return  # an expert bank row
            except ValueError as e:
                raise TensorMismatchError(f"tensor `{logical}`: {e}") from None
            param = params[name]
            if (load := getattr(param, "weight_loader", None)) is not None:
                return load(param, stored.data)  # SGLang's vocabulary-parallel rows
            param.data.copy_(stored.dequant(param.dtype) if stored.fmt.quantized else stored.data)

        stats = WeightStream(self.full_cfg, deliver, mtp=mtp).run(weights)
        logger.info("DSV4: loaded %d tensors (%s)", stats.delivered, stats.formats)
        kept = [f"{m.fmt.value} linear" for m in quant.values()]
        kept += [bank for b in self.layers for bank in b.ffn.kept_banks()]
        if kept:
            counts = {k: kept.count(k) for k in dict.fromkeys(kept)}
            logger.info("DSV4: kept quantized (not dequantized): %s", counts)
        self._ref = None
        return stats


EntryClass = DeepseekV4ForCausalLM
