"""Random extend batches over random ``req_to_token`` / full -> swa maps, for the plan's
device half and what is built from it (tests/kernels/test_extend_meta.py,
test_flashmla_lists.py)."""

from types import SimpleNamespace

import torch

from sglang_dsv4.attention.plan_tables import TablesIn, facts_host

BLOCK = 128


def pool(f2s, n_slots: int, window: int, progress):
    tail_pos = torch.tensor(progress + [0] * (n_slots + 1 - len(progress)), device=f2s.device)
    return SimpleNamespace(
        schema=SimpleNamespace(block_size=BLOCK, sliding_window=window),
        full_to_swa_index_mapping=f2s,
        translate_loc_from_full_to_swa=lambda loc: f2s[loc.long()],
        tail_pos=tail_pos,
    )


def case(lens, window: int, width: int, seed: int, device, compressed=True):
    """A random world and batch: ``lens`` [(P, S)], slots permuted, some progress == P, some
    modes decided by the host, some swa rows freed (map 0)."""
    g = torch.Generator().manual_seed(seed)
    b = len(lens)
    n_slots = b + 3
    n_full = n_slots * width + 1
    r2t = torch.randint(1, n_full, (n_slots, width), generator=g).int()
    f2s = torch.randint(1, 8 * width, (n_full,), generator=g)
    f2s[torch.randint(0, n_full, (n_full // 50 + 1,), generator=g)] = 0  # freed swa rows
    slots = torch.randperm(n_slots, generator=g)[:b].tolist()
    prefix = [p for p, _ in lens]
    seq = [s for _, s in lens]
    lows = [max(0, p - window + 1) for p in prefix]
    own = (torch.rand(b, generator=g) < 0.6).tolist()
    codes = torch.randint(-1, 3, (b,), generator=g).tolist()
    progress = [0] * n_slots
    for s, p, o in zip(slots, prefix, own, strict=True):
        r = int(torch.randint(0, 3, (1,), generator=g))
        progress[s] = p if o and r else p + 5 * r
    host = facts_host(slots, prefix, seq, lows, own, codes)
    inp = TablesIn(
        host.to(device), n_tokens=sum(seq) - sum(prefix), n_window=sum(seq) - sum(lows),
        n_blocks=max(1, -(-max(seq) // BLOCK)),
        max_window=max(s - lo for s, lo in zip(seq, lows, strict=True)), compressed=compressed,
    )  # fmt: skip
    return r2t.to(device), f2s.to(device), n_slots, progress, inp
