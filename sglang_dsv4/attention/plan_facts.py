"""What the extend plan needs to know of each request's device state, and how it gets it.

Per request: its slot, its compressor tail's progress, whether the swa rows of its prefix window
are still held, and the swa page of token ``P-1`` (whose boundary rows a REBUILD resumes from).

* :func:`device_facts`: one device-to-host read per batch (the host waits for the previous
  forward to finish). Used where SGLang gave no host copy of the request slots.
* the host path (``plan.plan_batch`` given :class:`SlottedLens`): no read. The slots are
  SGLang's host values (each request's ``req_pool_idx``, carried by the plugin on
  ``extend_prefix_lens_cpu``), and the progress follows from host state: a slot whose tail
  owner is the request's own generation holds the request's own tail, which has seen exactly
  its cached prefix ``P`` (an extend leaves it at ``S``, a decode step advances it by one
  token, a verify's overshoot is rewound by the journal's commit, queued on the device first).
  The page of token ``P-1`` stays a device value (the kernels read it from ``BatchTables``;
  only the torch twin reads it back). The read path's checks (progress ``== P``, window held)
  are computed on the device with the plan's tables (:mod:`~sglang_dsv4.attention.plan_tables`),
  copied without a wait (:class:`~sglang_dsv4.mem.h2d.HostCopy`) and raised when the next
  batch is planned (:func:`check_pending`): a broken invariant still stops the server, one
  batch later.
"""

import torch

from sglang_dsv4.attention.plan_tables import held, last_pages
from sglang_dsv4.mem.h2d import HostCopy

__all__ = [
    "PendingChecks",
    "SlottedLens",
    "check_pending",
    "device_facts",
    "host_slots",
]


class SlottedLens(list):
    """``forward_batch.extend_prefix_lens_cpu`` as the plugin leaves it: the same prefix lengths,
    carrying the batch's request slots ``req_slots``. On a field, not on the batch: SGLang's
    runners rebuild the forward batch with ``dataclasses.replace`` before the attention backend
    sees it, which drops attributes of the batch and carries its fields by reference (a runner
    that sets new lengths drops the slots too: the plan then reads them back)."""

    def __init__(self, lens, req_slots: list[int]):
        super().__init__(lens)
        self.req_slots = req_slots


def host_slots(fb, n: int) -> list[int] | None:
    """The batch's request slots on the host, or None where SGLang's batch gave none (or a
    padded batch: ``n`` lengths but another number of slots)."""
    slots = getattr(getattr(fb, "extend_prefix_lens_cpu", None), "req_slots", None)
    return None if slots is None or len(slots) != n else [int(s) for s in slots]


def device_facts(pool, req_to_token_pool, slots_dev, prefix_dev):
    """``(request slot, tail progress, prefix window still held, swa page of token P-1)`` per
    request, in ONE device-to-host read for the batch (a read per request would drain the GPU
    queue each time; the slots ride along). ``slots_dev`` / ``prefix_dev`` [B] int64."""
    rtt = req_to_token_pool.req_to_token
    last = last_pages(pool, rtt, slots_dev, prefix_dev).long()
    ok = held(pool, rtt, slots_dev, prefix_dev)
    facts = torch.stack([slots_dev, pool.tail_pos[slots_dev], ok.long(), last], 1)
    return [tuple(r) for r in facts.tolist()]


class PendingChecks:
    """One host-planned batch's device checks ``flags`` [2, B] bool (tail progress == P, prefix
    window held), on their way to the host."""

    def __init__(self, slots: list[int], prefix_lens: list[int], flags: torch.Tensor):
        self.slots, self.prefix_lens, self.copy = slots, prefix_lens, HostCopy(flags)

    def check(self, window: int) -> None:
        progress_ok, held_ok = self.copy.wait().tolist()
        for slot, prefix, p, h in zip(self.slots, self.prefix_lens, progress_ok, held_ok,
                                      strict=True):  # fmt: skip
            if not p:
                raise RuntimeError(
                    f"request slot {slot}: prefix {prefix} was neither its own tail's progress nor "
                    "a block boundary when its last batch was planned; its compressor state is lost"
                )
            if not h:
                raise RuntimeError(
                    f"request slot {slot}: the swa rows of positions "
                    f"{max(0, prefix - window + 1)}..{prefix - 1} were freed while its queries "
                    "still needed them (found one batch late)"
                )


def check_pending(pool) -> None:
    """Raise what the last host-planned batch's checks found (then forget them)."""
    pending, pool.plan_checks = pool.plan_checks, None
    if pending is not None:
        pending.check(pool.schema.sliding_window)
