"""Bit-compare two checkouts' ``kernels.mhc.hc_fused`` on the GPU: the same seeded inputs,
outputs saved by each, then compared output by output.

    PYTHONPATH=$PWD/.base python scripts/mhc_bits.py save /tmp/base.pt
    PYTHONPATH=$PWD python scripts/mhc_bits.py save /tmp/new.pt
    python scripts/mhc_bits.py compare /tmp/base.pt /tmp/new.pt

Cases: Flash dims (d 4096), the decode token counts of both forms (1 and 8: one launch; 32 and
128: the GEMM form), the previous block's post fused or not, the head, bf16 and fp32 streams.
``compare`` prints per case the outputs that differ (how many elements, the largest absolute
difference) and exits 0 either way: a difference is a finding to read, not a failure (the
tests hold the tolerances).
"""

import sys

import torch

HC, D, ITERS, EPS = 4, 4096, 20, 1e-6
TOKENS = (1, 8, 32, 128)
NAMES = ("streams", "h", "post", "comb")


def _case(n: int, dtype, fused: bool, head: bool, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    nm = HC if head else (2 + HC) * HC
    fn = torch.randn(nm, HC * D, device="cuda", generator=gen) * (HC * D) ** -0.5 * 3
    base = torch.randn(nm, device="cuda", generator=gen) * 0.5
    scale = torch.rand(1 if head else 3, device="cuda", generator=gen) + 0.5
    norm = (torch.rand(D, device="cuda", generator=gen) + 0.5).to(dtype)
    x = (torch.randn(n, HC, D, device="cuda", generator=gen) * 2).to(dtype)
    prev = None
    if fused:
        y = torch.randn(n, D, device="cuda", generator=gen).to(dtype)
        post = 2 * torch.rand(n, HC, device="cuda", generator=gen)
        comb = torch.rand(n, HC, HC, device="cuda", generator=gen) + 0.1
        prev = (y, post, comb / comb.sum(-1, keepdim=True))
    return x, (fn, base, scale, norm), prev


def save(path: str) -> None:
    from sglang_dsv4.kernels import mhc

    programs = 2 * torch.cuda.get_device_properties(0).multi_processor_count
    tickets = torch.zeros(mhc.MAX_TILES, dtype=torch.int32, device="cuda")
    out = {}
    for seed, (n, dtype, fused, head) in enumerate(
        (n, dt, f, h) for n in TOKENS for dt in (torch.bfloat16, torch.float32)
        for f in (False, True) for h in (False, True)
    ):  # fmt: skip
        x, w, prev = _case(n, dtype, fused, head, seed)
        got = mhc.hc_fused(x, *w, tickets, eps=EPS, hc_eps=EPS, iters=ITERS,
                           programs=programs, post_of=prev)  # fmt: skip
        key = f"T{n} {str(dtype)[6:]} {'post+' if fused else ''}{'head' if head else 'pre'}"
        out[key] = [None if g is None else g.cpu() for g in got]
    torch.save(out, path)
    print(f"saved {len(out)} cases to {path} ({mhc.__file__})")


def compare(path_a: str, path_b: str) -> None:
    a, b = torch.load(path_a), torch.load(path_b)
    same = 0
    for key in a:
        diffs = []
        for name, u, v in zip(NAMES, a[key], b[key], strict=True):
            if u is None or torch.equal(u, v):
                continue
            d = (u.float() - v.float()).abs()
            diffs.append(f"{name}: {int((u != v).sum())} differ, max |diff| {d.max().item():.2e}")
        same += not diffs
        print(f"{key:24s} {'bit-identical' if not diffs else '; '.join(diffs)}")
    print(f"{same} of {len(a)} cases bit-identical")


if __name__ == "__main__":
    if sys.argv[1] == "save":
        save(sys.argv[2])
    else:
        compare(sys.argv[2], sys.argv[3])
