"""A decode step's slot allocation on both sides of the hybrid allocator in one launch.

SGLang's hybrid-SWA ``alloc_decode`` is four device steps per decode iteration on the
scheduler's host path: the swa ``last_loc`` translated through the full -> swa map, the full
side's and the swa side's ``alloc_decode_kernel`` (one Triton launch each, with its output
allocation), and the map write ``full_to_swa[full] = swa``. Here one program per request does
all four, with SGLang's page rule: request ``b`` opens a page when ``(S - 1) % page == 0``, and
takes the free page at index "number of earlier requests that open one" on each side; otherwise
its slots follow its last ones (``last + 1``, ``full_to_swa[last] + 1``). The map write cannot
race a read: a new slot is no request's last slot.
"""

import torch
import triton
import triton.language as tl

__all__ = ["alloc_decode_pair"]


@triton.jit(do_not_specialize=["free_full_ptr", "free_swa_ptr"])
def _alloc_decode_pair_kernel(
    seq_lens_ptr, last_loc_ptr, f2s_ptr, free_full_ptr, free_swa_ptr, out_ptr,
    BS: tl.constexpr, PAGE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    j = tl.arange(0, BS)
    earlier = tl.load(seq_lens_ptr + j, mask=j < pid, other=1)  # S of requests before pid
    start = tl.sum(((j < pid) & ((earlier - 1) % PAGE == 0)).to(tl.int32))
    seq = tl.load(seq_lens_ptr + pid)
    last = tl.load(last_loc_ptr + pid).to(tl.int64)
    if (seq - 1) % PAGE == 0:  # the new token opens a page on both sides
        full = tl.load(free_full_ptr + start).to(tl.int64) * PAGE
        swa = tl.load(free_swa_ptr + start).to(tl.int64) * PAGE
    else:
        full = last + 1
        swa = tl.load(f2s_ptr + last).to(tl.int64) + 1
    tl.store(out_ptr + pid, full)
    tl.store(f2s_ptr + full, swa)


def alloc_decode_pair(
    seq_lens: torch.Tensor,
    last_loc: torch.Tensor,
    full_to_swa: torch.Tensor,
    free_full: torch.Tensor,
    free_swa: torch.Tensor,
    *,
    page: int,
) -> torch.Tensor:
    """[B] int64 full slots of a decode step's new tokens (module docstring); writes their swa
    slots into ``full_to_swa``. ``seq_lens`` [B] lengths with the new token, ``last_loc`` [B]
    full slots of the tokens before it, ``free_full`` / ``free_swa`` the sides' free pages (the
    caller checked that each holds the step's opening pages, and drops them after)."""
    bs = seq_lens.shape[0]
    out = torch.empty(bs, dtype=torch.int64, device=seq_lens.device)
    _alloc_decode_pair_kernel[(bs,)](
        seq_lens_ptr=seq_lens, last_loc_ptr=last_loc, f2s_ptr=full_to_swa,
        free_full_ptr=free_full, free_swa_ptr=free_swa, out_ptr=out,
        BS=triton.next_power_of_2(bs), PAGE=page,
    )  # fmt: skip
    return out
