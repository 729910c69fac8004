"""KV compressor of c4 (CSA, ratio 4, overlapping) and c128 (HCA, ratio 128) layers.

Per token ``t`` the compressor projects ``C_t = wkv x_t`` and ``Z_t = wgate x_t + ape[t % ratio]``
(fp32). Entry ``i`` pools a window with a per-channel softmax over its slots:

* c128 (no overlap): the 128 tokens of window ``i``; ``C, Z`` have ``D`` channels.
* c4 (overlap): ``C, Z`` have ``2D`` channels, an "a" half ``[:D]`` and a "b" half ``[D:]``.
  Entry ``i`` pools 8 slots: the a-halves of the 4 tokens of window ``i-1`` and the b-halves of
  the 4 tokens of window ``i`` (each slot with its own ``ape`` row). Entry 0's missing window
  ``-1`` is padding with kv 0 and score -inf.

Then ``RMSNorm_w`` and RoPE on the last ``rope_dim`` channels at position ``i * ratio``.
Entry ``i`` is emitted once token ``(i+1) * ratio - 1`` has been seen.

The ``tail`` (:class:`CompressorState`) makes chunking free: the state after a prefix is the
projected ``C, Z`` of the windows that can still contribute to a future entry, in fixed slots:

* c128: slots ``[0, 128)`` = current (partial) window.
* c4:   slots ``[0, 4)`` = previous complete window (only its a-half is ever read again),
        slots ``[4, 8)`` = current (partial) window.

Empty slots hold kv 0 and score -inf. A state never stores its position: the caller owns it
(``start_pos`` = tokens already consumed), exactly as a serving tail pool will.
"""

from dataclasses import dataclass

import torch

from sglang_dsv4.ref.norm import rms_norm
from sglang_dsv4.ref.rope import apply_rope, rope_cos_sin

__all__ = ["CompressorState", "CompressorWeights", "compress", "compress_decode", "project"]


@dataclass
class CompressorWeights:
    wkv: torch.Tensor  # [coff * D, hidden]
    wgate: torch.Tensor  # [coff * D, hidden]
    ape: torch.Tensor  # [ratio, coff * D]
    norm: torch.Tensor  # [D]

    @property
    def ratio(self) -> int:
        return self.ape.shape[0]

    @property
    def head_dim(self) -> int:
        return self.norm.shape[0]

    @property
    def overlap(self) -> bool:
        return self.wkv.shape[0] == 2 * self.head_dim


@dataclass
class CompressorState:
    kv: torch.Tensor  # [coff * ratio, coff * D] fp32
    score: torch.Tensor  # [coff * ratio, coff * D] fp32, -inf in empty slots

    @classmethod
    def empty(cls, w: CompressorWeights, device: torch.device | str = "cpu") -> "CompressorState":
        coff = 2 if w.overlap else 1
        shape = (coff * w.ratio, coff * w.head_dim)
        return cls(
            kv=torch.zeros(shape, dtype=torch.float32, device=device),
            score=torch.full(shape, float("-inf"), dtype=torch.float32, device=device),
        )

    def clone(self) -> "CompressorState":
        return CompressorState(self.kv.clone(), self.score.clone())


def project(
    x: torch.Tensor, start_pos: int, w: CompressorWeights
) -> tuple[torch.Tensor, torch.Tensor]:
    """``C`` and ``Z`` (fp32, [T, coff*D]) of tokens ``start_pos ..``, inputs ``x`` [T, hidden]."""
    positions = start_pos + torch.arange(x.shape[0], device=x.device)
    kv = x.float() @ w.wkv.float().T
    score = x.float() @ w.wgate.float().T + w.ape.float()[positions % w.ratio]
    return kv, score


def compress(
    x: torch.Tensor,
    start_pos: int,
    state: CompressorState,
    w: CompressorWeights,
    inv_freq: torch.Tensor,
    norm_eps: float = 1e-6,
    projected: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, int, CompressorState]:
    """Feed ``x`` [T, hidden] (tokens ``start_pos .. start_pos+T-1`` of one sequence);
    ``projected``: their :func:`project` output when the caller already has it.

    Returns ``(entries [E, D], first_entry_index, new_state)``: the entries completed by these
    tokens (``E`` may be 0) and the index of the first of them.
    """
    r, d = w.ratio, w.head_dim
    coff = 2 if w.overlap else 1
    n = x.shape[0]
    kv, score = projected if projected is not None else project(x, start_pos, w)  # [T, coff*D]

    # Virtual token stream that starts at window (start_pos // r) - (coff - 1): the state's
    # windows followed by the new tokens, padded to whole windows.
    kept = (coff - 1) * r + start_pos % r
    vkv = torch.cat([state.kv[:kept], kv])
    vscore = torch.cat([state.score[:kept], score])
    first_window = start_pos // r
    cur = (
        (start_pos + n) // r - first_window + (coff - 1)
    )  # virtual index of the new current window
    n_win = cur + 1
    pad = n_win * r - vkv.shape[0]
    vkv = torch.cat([vkv, vkv.new_zeros(pad, coff * d)]).view(n_win, r, coff * d)
    vscore = torch.cat([vscore, vscore.new_full((pad, coff * d), float("-inf"))]).view(
        n_win, r, coff * d
    )

    done = range(coff - 1, cur)  # virtual windows completed by this call
    if overlap := w.overlap:
        pool_kv = torch.cat(
            [vkv[done.start - 1 : cur - 1, :, :d], vkv[done.start : cur, :, d:]], dim=1
        )
        pool_score = torch.cat(
            [vscore[done.start - 1 : cur - 1, :, :d], vscore[done.start : cur, :, d:]], dim=1
        )
    else:
        pool_kv, pool_score = vkv[:cur], vscore[:cur]
    entries = (pool_kv * pool_score.softmax(dim=1)).sum(dim=1)  # [E, D]
    entries = rms_norm(entries, w.norm.float(), norm_eps)
    first_entry = first_window
    if len(done):
        cos, sin = rope_cos_sin(
            (first_entry + torch.arange(len(done), device=x.device)) * r, inv_freq
        )
        entries = apply_rope(entries, cos, sin)

    lo = cur - (1 if overlap else 0)
    new_state = CompressorState(
        kv=vkv[lo : cur + 1].reshape(coff * r, coff * d).clone(),
        score=vscore[lo : cur + 1].reshape(coff * r, coff * d).clone(),
    )
    return entries, first_entry, new_state


def compress_decode(
    x: torch.Tensor,
    positions: torch.Tensor,
    state_kv: torch.Tensor,
    state_score: torch.Tensor,
    w: CompressorWeights,
    inv_freq: torch.Tensor,
    norm_eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One new token per request, batched, with no host decision (CUDA-graph safe).

    ``x`` [B, hidden] at ``positions`` [B]; ``state_kv`` / ``state_score`` [B, coff*r, coff*D]
    (the requests' tails, slot layout as in :class:`CompressorState`). Returns
    ``(entry [B, D], emit [B] bool, new_kv, new_score)``: ``entry`` is entry ``pos // r`` and
    only meaningful where the token completes its window (``emit``); the new state is the
    state after the token (window shifted out where it emitted). Equals :func:`compress` fed
    the same token.
    """
    r, d = w.ratio, w.head_dim
    coff = 2 if w.overlap else 1
    n = x.shape[0]
    rows = torch.arange(n, device=x.device)
    kv = x.float() @ w.wkv.float().T  # [B, coff*D]
    score = x.float() @ w.wgate.float().T + w.ape.float()[positions % r]
    slot = (coff - 1) * r + positions % r  # [B] the token's slot in the current window
    new_kv, new_score = state_kv.clone(), state_score.clone()
    new_kv[rows, slot] = kv
    new_score[rows, slot] = score
    if w.overlap:  # previous window's a-halves + current window's b-halves
        pool_kv = torch.cat([new_kv[:, :r, :d], new_kv[:, r:, d:]], dim=1)  # [B, 2r, D]
        pool_score = torch.cat([new_score[:, :r, :d], new_score[:, r:, d:]], dim=1)
    else:
        pool_kv, pool_score = new_kv, new_score  # [B, r, D]
    entry = (pool_kv * pool_score.softmax(dim=1)).sum(dim=1)  # [B, D]
    entry = rms_norm(entry, w.norm.float(), norm_eps)
    cos, sin = rope_cos_sin(positions // r * r, inv_freq)
    entry = apply_rope(entry, cos, sin)
    emit = (positions + 1) % r == 0
    # After an emit the current window becomes the previous one (c4) or is dropped (c128).
    empty_kv = torch.zeros_like(new_kv[:, :r])
    empty_score = torch.full_like(new_score[:, :r], float("-inf"))
    if w.overlap:
        shifted_kv = torch.cat([new_kv[:, r:], empty_kv], dim=1)
        shifted_score = torch.cat([new_score[:, r:], empty_score], dim=1)
    else:
        shifted_kv, shifted_score = empty_kv, empty_score
    keep = emit.view(-1, 1, 1)
    return (
        entry,
        emit,
        torch.where(keep, shifted_kv, new_kv),
        torch.where(keep, shifted_score, new_score),
    )
