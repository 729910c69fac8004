"""Synchronizing CUDA calls caught under ``torch.cuda.set_sync_debug_mode("warn")``."""

import warnings

# c10's warning for each synchronizing call. Only this text: the mode's own one-time note
# ("Synchronization debug mode is a prototype feature and does not yet detect all synchronizing
# operations", TORCH_WARN_ONCE at the process's first set_sync_debug_mode, reported at torch's
# own line) also says "synchroniz", and a test that matched on that counted a sync that was not
# (H100, 2026-12-07 and 12-08).
SYNC_MESSAGE = "called a synchronizing CUDA operation"


def synchronizing_calls(caught: list[warnings.WarningMessage]) -> list[str]:
    """``file:line`` of every synchronizing call among ``caught`` warnings."""
    return [f"{w.filename}:{w.lineno}" for w in caught if SYNC_MESSAGE in str(w.message)]
