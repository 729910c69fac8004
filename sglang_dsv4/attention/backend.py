"""The SGLang attention backend of DSV4 (registered as ``dsv4_plugin`` by the plugin).

SGLang calls ``init_forward_metadata`` once per batch, split as SGLang 0.5.17 wants for CUDA
graphs: host work in ``init_forward_metadata_out_graph`` (runs before every replay too), static-
shape device work in ``init_forward_metadata_in_graph`` (recorded into the graph).

* extend batches: the host builds the batch plan and hands it to one wrapper per layer kind
  (``plan()``), whose ``run()`` the layers call;
* decode batches: the host plans the step's kernels once (``decode_ops.plan``, kept per captured
  graph size), the device builds :class:`DecodeMeta` (``attention.decode``) from SGLang's
  graph-static buffers and advances the tails' progress (``pool.tail_pos``), and every layer
  runs ``decode_ops.run``; this is what a captured decode graph replays. The decode ops are
  chosen once here: GPU kernels (``attention.decode_kernels``) for FP8 / bf16 rows on the GPU,
  the torch twin (``attention.decode.DecodeTorch``) otherwise.

Layers call :meth:`DSV4AttnBackend.run`, which picks one of the two per batch (a host decision
made once per forward, not per tensor value).
"""

import logging

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from sglang_dsv4.attention.decode import DecodeMeta, KVNorm, decode_ops
from sglang_dsv4.attention.extend_ops import extend_ops
from sglang_dsv4.attention.plan import BatchPlan, plan_batch
from sglang_dsv4.attention.speculative import VerifyJournal
from sglang_dsv4.attention.wrappers import CSAWrapper, HCAWrapper, SWAWrapper
from sglang_dsv4.config import AttnKind
from sglang_dsv4.mem.pools import DSV4KVPool
from sglang_dsv4.mem.schema import EntryFormat

__all__ = ["BACKEND_NAME", "DSV4AttnBackend"]

BACKEND_NAME = "dsv4_plugin"

logger = logging.getLogger(__name__)


class DSV4AttnBackend(AttentionBackend):
    def __init__(self, model_runner):
        super().__init__()
        pool = model_runner.token_to_kv_pool
        if not isinstance(pool, DSV4KVPool):
            raise TypeError(
                f"the {BACKEND_NAME} backend needs the DSV4 pools, got {type(pool).__name__}"
            )
        self.token_to_kv_pool = pool
        self.req_to_token_pool = model_runner.req_to_token_pool
        window = pool.schema.sliding_window
        cfg = model_runner.model.cfg
        self._heads, self._index_topk = cfg.num_heads, cfg.index_topk
        self._use_kernels = pool.device != "cpu" and pool.schema.fmt is not EntryFormat.FP32

        def ops(kind: AttnKind):
            return extend_ops(
                kind.value,
                _first_layer(pool, kind),
                window=window,
                n_heads=cfg.num_heads,
                index_heads=cfg.index_n_heads,
                topk=cfg.index_topk,
                device=pool.device,
                kernels=self._use_kernels,
                norm_eps=cfg.norm_eps,
            )

        self.wrappers = {
            AttnKind.SWA: SWAWrapper(window, ops(AttnKind.SWA)),
            AttnKind.CSA: CSAWrapper(window, ops(AttnKind.CSA), topk=cfg.index_topk),
            AttnKind.HCA: HCAWrapper(window, ops(AttnKind.HCA)),
        }
        self.decode_ops = decode_ops(
            pool, cfg.num_heads, cfg.index_topk, cfg.index_n_heads, kernels=self._use_kernels
        )
        self.plan: BatchPlan | None = None
        self.journal = VerifyJournal(pool)  # target verify: the rejected tokens' tails undone
        self._verify = False
        self.decode_meta: DecodeMeta | None = None
        self.decode_plan = None  # the step's planned decode kernels
        self._decode_pages = 0  # pages per request in the decode metadata
        self._graph_pages = 0  # ... fixed for captured graphs (the context length)
        self._graph_bs = 0
        self._graph_plans: dict = {}  # graph batch size -> its decode plan (kept alive)
        self._context_len = model_runner.model_config.context_len
        allocator = model_runner.token_to_kv_pool_allocator
        model = model_runner.model
        # One line that says which classes serve (the plugin test reads it from the server log).
        logger.info(
            "sglang-dsv4 active: model=%s.%s backend=%s pool=%s allocator=%s.%s rows=%s "
            "index_keys=%s decode=%s",
            type(model).__module__,
            type(model).__name__,
            type(self).__name__,
            type(pool).__name__,
            type(allocator).__module__,
            type(allocator).__name__,
            pool.schema.fmt.value,
            pool.schema.index_fmt.value,
            type(self.decode_ops).__name__,
        )

    def init_forward_metadata(self, forward_batch) -> None:
        """An eager forward (SGLang's model runner): plan for this batch, never a graph's."""
        self._prepare(forward_batch, in_capture=False, replay=False)
        self.init_forward_metadata_in_graph(forward_batch)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False) -> None:
        """SGLang's graph runner: before a capture, or before a replay (the graph's batch size)."""
        self._prepare(forward_batch, in_capture, replay=not in_capture)

    def _prepare(self, forward_batch, in_capture: bool, replay: bool) -> None:
        fb = forward_batch
        self.plan = self.decode_meta = None
        self._verify = False
        if fb.forward_mode.is_idle():
            return
        if fb.forward_mode.is_decode():
            bs = fb.seq_lens_cpu.numel()
            replay = replay and bool(self._graph_pages)
            if in_capture or replay:
                self._decode_pages = self._graph_pages
            else:
                self._decode_pages = -(-int(fb.seq_lens_cpu.max()) // self._block)
            if in_capture:  # the captured graph keeps these buffers: one plan per graph size
                self.decode_plan = self._graph_plans[bs] = self._plan_decode(bs)
            elif replay:  # the graph replays its own plan; run() is not called
                self.decode_plan = self._graph_plans.get(bs)
            else:
                self.decode_plan = self._plan_decode(bs)
            return
        pool, rtp = self.token_to_kv_pool, self.req_to_token_pool
        self.plan = plan_batch(fb, pool, rtp, commit=self.journal.commit)
        self._verify = fb.forward_mode.is_target_verify()
        if self._verify:
            self.journal.begin(self.plan, rtp.req_generation)
        for wrapper in self.wrappers.values():
            wrapper.plan(self.plan)

    def init_forward_metadata_in_graph(self, forward_batch) -> None:
        fb = forward_batch
        if fb.forward_mode.is_decode():
            self._decode_meta(fb, fb.positions, fb.out_cache_loc)

    def init_step_metadata(self, forward_batch, positions, out_cache_loc) -> None:
        """A draft decode step (:class:`~sglang_dsv4.attention.speculative.DraftDecodeSteps`):
        the batch's requests at ``positions`` [B] writing ``out_cache_loc`` [B]."""
        fb = forward_batch
        self.plan = None
        last = int(fb.seq_lens_cpu.max()) + int((positions - fb.positions).max()) + 1
        self._decode_pages = -(-last // self._block)
        self.decode_plan = self._plan_decode(fb.seq_lens_cpu.numel())
        self._decode_meta(fb, positions, out_cache_loc)

    def _decode_meta(self, fb, positions, out_cache_loc) -> None:
        pool = self.token_to_kv_pool
        # one launch on the GPU; it also advances the tails' progress on the device
        self.decode_meta = self.decode_ops.build_meta(
            fb.req_pool_indices,
            positions,
            out_cache_loc,
            self.req_to_token_pool.req_to_token,
            pool.full_to_swa_index_mapping,
            pool.spare_tail_row,
            pool.tail_pos,
            window=pool.schema.sliding_window,
            block=self._block,
            n_pages=self._decode_pages,
        )

    def _plan_decode(self, bs: int):
        plan = self.decode_ops.plan(bs, self._decode_pages)
        choice = getattr(plan, "choice", None)
        if choice:
            logger.debug("dsv4 decode bs=%d pages=%d attention %s", bs, self._decode_pages, choice)
        return plan

    @property
    def _block(self) -> int:
        return self.token_to_kv_pool.schema.block_size

    # CUDA graphs (decode): all per-batch tensors are derived in init_forward_metadata_in_graph.
    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        self._graph_bs = max_bs
        self._graph_pages = -(-self._context_len // self._block)

    def get_cuda_graph_seq_len_fill_value(self) -> int:
        return 1

    def on_after_cuda_graph_warmup(self) -> None:
        """SGLang runs a graph's forward once eagerly, calls this, then captures."""
        if self.decode_plan is not None:
            self.decode_ops.after_warmup(self.decode_plan)

    def run(
        self,
        kind: AttnKind,
        lk,
        q,
        kv,
        sink,
        scale: float,
        comp=None,
        kv_norm: KVNorm | None = None,
    ) -> torch.Tensor:
        """One layer's attention over this batch (``q`` [T, H, D], ``kv`` [T, D]: the raw
        ``wkv(x)`` with ``kv_norm``, which the KV store then applies, else normed and roped)."""
        if self.decode_meta is not None:
            meta, plan = self.decode_meta, self.decode_plan
            return self.decode_ops.run(plan, kind, lk, meta, q, kv, sink, scale, comp, kv_norm)
        if self._verify and comp is not None:
            self.journal.record(lk.layer, comp)
        return self.wrappers[kind].run(lk, q, kv, sink, scale, comp, kv_norm)

    def forward(self, *args, **kwargs):
        raise RuntimeError(
            f"{BACKEND_NAME} is driven by the DSV4 model's layers through its wrappers; "
            "RadixAttention layers cannot use it"
        )


def _first_layer(pool: DSV4KVPool, kind: AttnKind):
    """A layer of ``kind`` (its row formats are the kind's), or None if the model has none."""
    layers = pool.schema.layers_of(kind)
    return pool.layer(layers[0].layer) if layers else None
