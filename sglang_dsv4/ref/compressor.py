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

__all__ = ["CompressorState", "CompressorWeights", "compress"]


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


def compress(
    x: torch.Tensor,
    start_pos: int,
    state: CompressorState,
    w: CompressorWeights,
    inv_freq: torch.Tensor,
    norm_eps: float = 1e-6,
) -> tuple[torch.Tensor, int, CompressorState]:
    """Feed ``x`` [T, hidden] (tokens ``start_pos .. start_pos+T-1`` of one sequence).

    Returns ``(entries [E, D], first_entry_index, new_state)``: the entries completed by these
    tokens (``E`` may be 0) and the index of the first of them.
    """
    r, d = w.ratio, w.head_dim
    coff = 2 if w.overlap else 1
    n = x.shape[0]
    positions = start_pos + torch.arange(n, device=x.device)
    kv = x.float() @ w.wkv.float().T  # [T, coff*D]
    score = x.float() @ w.wgate.float().T + w.ape.float()[positions % r]  # [T, coff*D]

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
