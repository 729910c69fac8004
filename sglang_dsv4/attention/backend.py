"""The SGLang attention backend of DSV4 (registered as ``dsv4_plugin`` by the plugin).

SGLang calls ``init_forward_metadata`` once per batch; the backend builds the batch plan (host
work) and hands it to one wrapper per layer kind. Layers then call their wrapper's ``run()``
directly (they are built for one kind, so there is no dispatch on the kind at run time).
The graph split follows SGLang 0.5.17: host work in ``init_forward_metadata_out_graph``, nothing
device-side yet in ``init_forward_metadata_in_graph``.
"""

import logging

from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from sglang_dsv4.attention.plan import BatchPlan, plan_batch
from sglang_dsv4.attention.wrappers import CSAWrapper, HCAWrapper, SWAWrapper
from sglang_dsv4.config import AttnKind
from sglang_dsv4.mem.pools import DSV4KVPool

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
        self.wrappers = {
            AttnKind.SWA: SWAWrapper(window),
            AttnKind.CSA: CSAWrapper(window),
            AttnKind.HCA: HCAWrapper(window),
        }
        self.plan: BatchPlan | None = None
        allocator = model_runner.token_to_kv_pool_allocator
        model = model_runner.model
        # One line that says which classes serve (the plugin test reads it from the server log).
        logger.info(
            "sglang-dsv4 active: model=%s.%s backend=%s pool=%s allocator=%s.%s",
            type(model).__module__,
            type(model).__name__,
            type(self).__name__,
            type(pool).__name__,
            type(allocator).__module__,
            type(allocator).__name__,
        )

    def init_forward_metadata(self, forward_batch) -> None:
        self.init_forward_metadata_out_graph(forward_batch)
        self.init_forward_metadata_in_graph(forward_batch)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False) -> None:
        if forward_batch.forward_mode.is_idle():
            self.plan = None
            return
        self.plan = plan_batch(forward_batch, self.token_to_kv_pool, self.req_to_token_pool)
        for wrapper in self.wrappers.values():
            wrapper.plan(self.plan)

    def init_forward_metadata_in_graph(self, forward_batch) -> None:
        """No device-side metadata yet: the reference wrappers read the plan directly."""

    def forward(self, *args, **kwargs):
        raise RuntimeError(
            f"{BACKEND_NAME} is driven by the DSV4 model's layers through its wrappers; "
            "RadixAttention layers cannot use it"
        )
