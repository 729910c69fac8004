"""Tensor parallelism of the served DSV4 model over SGLang's TP group (``--tp N``).

What each of the N ranks holds (docs/multi_gpu.md has the design and the per-rank bytes):

* attention: query heads ``[r H/N, (r+1) H/N)`` (``wq_b`` rows, ``attn_sink``) and output groups
  ``[r G/N, (r+1) G/N)`` (``wo_a`` rows, ``wo_b`` columns); ``wo_b`` is then row-parallel and
  its partial sums are all-reduced. A group's heads are consecutive, so both splits agree.
  Replicated: ``wq_a`` / ``q_norm`` (the shared ``q_lora``), the one K=V head (``wkv``,
  ``kv_norm``: MQA), both compressors and the whole indexer. The KV pool of every rank is
  therefore the full cache (each rank's heads read every row), and no compressor or indexer
  state is exchanged: a rank computes it for itself, bit for bit the same as the others;
* MoE (TP-MoE, SGLang's default ``ep_size == 1``): every expert on every rank with intermediate
  columns ``[r I/N, (r+1) I/N)`` (w1 / w3 rows, w2 columns; the shared expert likewise); the
  router is replicated, so every rank picks the same experts, and the routed + shared partial
  sums take one all-reduce. Chosen over expert parallelism because it is exact with the
  existing banks and kernels (no token dispatch, no remapping of expert ids, no load imbalance
  to handle) and keeps one all-reduce per MoE block, like SGLang's TP MoE;
* embedding / head: SGLang's ``VocabParallelEmbedding`` / ``ParallelLMHead`` (vocabulary rows
  split, masked lookup + all-reduce; logits all-gathered by ``LogitsProcessor``), as SGLang's
  DeepSeek models; mHC and norms replicated.

Per layer: two all-reduces of [T, d] (attention output, MoE output), as SGLang's DeepSeek. At
``tp == 1`` nothing here runs: :attr:`TP.reduce` is the identity and no weight is sliced.
Checkpoint tensors stream in whole; :meth:`TP.shard` cuts this rank's part. Quantized tensors
kept quantized are cut on block boundaries (the blocks of a released FP8 / FP4 tensor are
independent), others are dequantized first.
"""

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sglang_dsv4.config import DSV4Config
from sglang_dsv4.ref.weight_quant import FP8_BLOCK, MXFP4_BLOCK, NVFP4_BLOCK
from sglang_dsv4.weights.layout import Fmt, StoredWeight

__all__ = ["TP", "TPError", "check_split", "current_tp"]

_SPLITS: tuple[tuple[re.Pattern, int], ...] = (
    (re.compile(r"layers\.\d+\.attn\.(wq_b\.weight|attn_sink|wo_a\.weight)\Z"), 0),
    (re.compile(r"layers\.\d+\.attn\.wo_b\.weight\Z"), 1),
    (re.compile(r"layers\.\d+\.ffn\.(experts\.\d+|shared_experts)\.w[13]\.weight\Z"), 0),
    (re.compile(r"layers\.\d+\.ffn\.(experts\.\d+|shared_experts)\.w2\.weight\Z"), 1),
)
"""Logical tensor name -> the dim split across ranks (its [out, in] layout); others whole."""

_LAYOUT: dict[Fmt, tuple[tuple[int, int], tuple[int, int]]] = {
    Fmt.FP8: ((1, FP8_BLOCK), (1, FP8_BLOCK)),
    Fmt.MXFP4: ((1, 1), (2, MXFP4_BLOCK)),
    Fmt.NVFP4: ((1, 1), (2, NVFP4_BLOCK)),
}
"""Quantized formats, per dim [out, in]: (logical elements per stored element, elements per
scale block). A rank's part is exact in the format when it is whole blocks."""


class TPError(ValueError):
    """A model / parallelism combination the served model cannot split."""


def check_split(cfg: DSV4Config, tp: int) -> None:
    """Raise :class:`TPError` naming the first dimension that ``--tp tp`` does not divide."""
    dims = {
        "num_attention_heads": cfg.num_heads,
        "o_groups": cfg.o_groups,
        "moe_intermediate_size": cfg.moe_inter_dim,
    }
    for name, value in dims.items():
        if value % tp:
            raise TPError(
                f"DSV4 --tp {tp}: {name} = {value} is not divisible by the TP size "
                f"(heads, output groups and expert columns are split across ranks)"
            )


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class TP:
    """This rank's place in the TP group: ``size`` ranks, this one ``rank``."""

    size: int = 1
    rank: int = 0

    def local_cfg(self, cfg: DSV4Config) -> DSV4Config:
        """The dims this rank holds: heads, output groups and expert columns / ``size``."""
        if self.size == 1:
            return cfg
        check_split(cfg, self.size)
        return dataclasses.replace(
            cfg,
            num_heads=cfg.num_heads // self.size,
            o_groups=cfg.o_groups // self.size,
            moe_inter_dim=cfg.moe_inter_dim // self.size,
        )

    @property
    def reduce(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Sum of the ranks' partial outputs (SGLang's TP all-reduce); identity at size 1."""
        if self.size == 1:
            return _identity
        from sglang.srt.distributed import tensor_model_parallel_all_reduce

        return tensor_model_parallel_all_reduce

    @staticmethod
    def split_dim(name: str) -> int | None:
        """The dim of logical tensor ``name`` split across ranks; None: held whole."""
        return next((dim for pat, dim in _SPLITS if pat.match(name)), None)

    def shard(
        self, name: str, stored: StoredWeight, dtype: torch.dtype, kept: Callable[[str], object]
    ) -> StoredWeight:
        """This rank's part of checkpoint tensor ``name``. A quantized tensor is cut on block
        boundaries; when the split falls inside a block it is dequantized to ``dtype`` first,
        unless the destination holds it quantized (``kept(name)`` not None: TPError)."""
        dim = None if self.size == 1 else self.split_dim(name)
        if dim is None:
            return stored
        if not stored.fmt.quantized:
            return StoredWeight(stored.fmt, self._part(stored.data, dim))
        pack, block = _LAYOUT[stored.fmt][dim]
        per_rank = stored.data.shape[dim] * pack // self.size  # logical rows / columns
        if per_rank % block == 0:
            data, scale = self._part(stored.data, dim), self._part(stored.scale, dim)
            return StoredWeight(stored.fmt, data, scale, stored.global_scale)
        if kept(name) is not None:
            raise TPError(
                f"tensor `{name}`: --tp {self.size} gives each rank {per_rank} of dim {dim}, "
                f"not a whole number of its {stored.fmt.value} blocks ({block})"
            )
        return StoredWeight(Fmt.DENSE, self._part(stored.dequant(dtype), dim))

    def _part(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        size = t.shape[dim]
        if size % self.size:
            raise TPError(f"--tp {self.size} does not divide a dim of size {size}")
        step = size // self.size
        return t.narrow(dim, self.rank * step, step)

    def vocab_modules(self, cfg: DSV4Config) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(embed, head) split by vocabulary rows as SGLang's DeepSeek models split them; their
        ``weight_loader`` cuts this rank's rows from the whole checkpoint tensor."""
        from sglang.srt.layers.vocab_parallel_embedding import (
            ParallelLMHead,
            VocabParallelEmbedding,
        )

        v, d = cfg.vocab_size, cfg.hidden_size
        return VocabParallelEmbedding(v, d), ParallelLMHead(v, d)


def current_tp() -> TP:
    """This process's TP group (SGLang's); a single rank when none is set up (model-only use,
    tests)."""
    from sglang.srt.distributed import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return TP()
    return TP(ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank())
