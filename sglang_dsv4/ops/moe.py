"""MoE op (``Ops.moe``): routing, routed experts and the shared expert of one layer.

``ffn(layer, x [T, d], ids [T]) -> [T, d]`` over a layer's :class:`~sglang_dsv4.model.experts.MoE`
(gate, expert banks, shared expert):

* :class:`MoeTorch` (the twin, the CPU path): the reference math, :mod:`sglang_dsv4.ref.moe`
  (``route_scores`` + ``route_topk`` / ``route_hash`` + ``route_weights``, then
  :class:`~sglang_dsv4.ref.moe.DenseExperts` over per-expert views of the banks, then the shared
  expert), the numbers of ``RefDSV4.ffn`` exactly;
* :class:`MoeTriton` (CUDA): routing in one kernel
  (:func:`~sglang_dsv4.kernels.moe_route.moe_route`), then the bank's grouped kernels
  (:mod:`sglang_dsv4.kernels.moe_experts`, dense / FP8 / FP4 banks; the shared expert is one
  more slot when it is a routed-bank row, its own one-row bank next to FP4 experts: one more
  program per token in the slot form's two launches; in the sorted form run first, alone (its
  identity grouping launches nothing), its rows added in the routed slot sum; no torch add).
  Per layer three launches at decode (slot form: route, w1/w3, w2) whatever the banks, 7-8 in
  the sorted form for the served Flash dims (``scripts/bench_moe.py --count``); no host sync,
  no shape from data: the same code runs eagerly and under CUDA-graph capture (no "every
  expert on every token").

The kernel form of dense / FP8 banks is picked per token count from :data:`SLOT_MAX_TOKENS`:
the slot (GEMV) form reads only the chosen experts' rows once per token slot, the best at batch
1; the sorted grouped GEMM reads each used expert once per M block, the best once tokens share
experts. Each entry of the table says whether it was measured (``scripts/bench_moe.py`` on the
H100) or guessed. The sorted form's tiles per pair count: ``kernels.moe_sorted_tiles.MEASURED``
(``scripts/bench_moe.py --sorted``).
"""

import torch

from sglang_dsv4.config import DSV4Config
from sglang_dsv4.kernels import moe_route as route_kernels
from sglang_dsv4.ref.moe import route_hash, route_scores, route_topk, route_weights, swiglu
from sglang_dsv4.weights.layout import Fmt

__all__ = ["SLOT_MAX_TOKENS", "MoeTorch", "MoeTriton", "moe_ops"]

SLOT_MAX_TOKENS = {
    # guesses (2026-12-06, not measured since the slot kernels' rewrite), served shape (16
    # experts, top-2 + shared): at T = 8 the slot form's 24 pair reads hit ~11 distinct experts,
    # its duplicate rows mostly served by L2 (the pair index is the grid's fastest axis), HBM
    # ~ the distinct bytes; the sorted form fills only ~11 x 16 tile programs there and adds
    # its grouping launch (kernels.moe_group). At T = 16 the slot form's L2 traffic (48 pair
    # reads) nears the HBM time.
    "bf16": 8,
    "fp8": 8,
    "fp4": 4,  # FP4 decode costs ALU per weight and pair: fewer pairs before it binds
}
"""Largest token count run in the slot form, by bank format (above it: the sorted form). Each
entry says whether it is measured (date, GPU) or a guess: ``python scripts/bench_moe.py
--shapes served`` prints the crossover it sees at the served shape, the value to write here."""


_FORMS_KEY = {Fmt.FP8: "fp8", Fmt.MXFP4: "fp4", Fmt.NVFP4: "fp4"}


class MoeTorch:
    """The twin: ``ref.moe`` over the layer's banks (module docstring)."""

    def __init__(self, cfg: DSV4Config):
        self.cfg = cfg

    def route(self, layer, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen [T, k], weights fp32 [T, k]) of ``x`` [T, d] (token ``ids`` [T] for hash
        layers)."""
        cfg, gate = self.cfg, layer.gate
        scores = route_scores(x, gate.weight, cfg.scoring_func)
        if layer.hash_moe:
            chosen = route_hash(ids, gate.tid2eid)
        else:
            chosen = route_topk(scores, gate.bias, cfg.n_experts_per_tok)
        return chosen, route_weights(scores, chosen, cfg.routed_scaling_factor)

    def ffn(self, layer, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The MoE block of ``layer`` on the normed input ``x`` [T, d] -> [T, d]."""
        limit = self.cfg.swiglu_limit
        chosen, weights = self.route(layer, x, ids)
        # the twin forced on a GPU under CUDA-graph capture: the reference's graph-safe form
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        out = layer.experts.dense()(x, chosen, weights, limit, dense=capturing)
        if (shared := layer.shared_linears()) is not None:
            out = out + swiglu(x, *shared, limit)
        return out


class MoeTriton(MoeTorch):
    """The GPU path: routing kernel + grouped expert kernels (module docstring). Holds the
    routing kernel's tickets (zeros, left zero by every launch)."""

    def __init__(self, cfg: DSV4Config, device: torch.device):
        super().__init__(cfg)
        device = torch.device(device)
        self.tickets = torch.zeros(route_kernels.MAX_TILES, dtype=torch.int32, device=device)
        # ~2 programs per SM (at decode the gate GEMM spreads over the GPU); CPU: a few splits
        cuda = device.type == "cuda"
        sms = torch.cuda.get_device_properties(device).multi_processor_count if cuda else 2
        self.programs = 2 * sms

    def route(self, layer, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, gate = self.cfg, layer.gate
        return route_kernels.moe_route(
            x,
            gate.weight,
            None if layer.hash_moe else gate.bias,
            gate.tid2eid if layer.hash_moe else None,
            ids if layer.hash_moe else None,
            cfg.n_experts_per_tok,
            cfg.routed_scaling_factor,
            cfg.scoring_func,
            tickets=self.tickets,
            programs=self.programs,
        )

    @staticmethod
    def form(layer, tokens: int) -> str:
        """Kernel form for ``tokens`` rows (a static shape: fixed per captured graph)."""
        fmt = _FORMS_KEY.get(layer.experts.fmt, "bf16")
        return "slots" if tokens <= SLOT_MAX_TOKENS[fmt] else "sorted"

    def ffn(self, layer, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        limit = self.cfg.swiglu_limit
        chosen, weights = self.route(layer, x, ids)
        form = self.form(layer, x.shape[0])
        # a shared bank of its own runs in the routed call's launches (its rows added in the
        # slot sum): the bits of routed + shared
        out = layer.experts.grouped(x, chosen, weights, limit, form, layer.shared_row, layer.shared)
        if layer.shared_experts is not None:  # NVFP4 linears
            out = out + swiglu(x, *layer.shared_experts.linears(), limit)
        return out


def moe_ops(cfg: DSV4Config, device: torch.device, kernels: bool) -> MoeTorch:
    """The MoE op: Triton kernels when ``kernels`` (CUDA), else the torch twin."""
    return MoeTriton(cfg, device) if kernels else MoeTorch(cfg)
