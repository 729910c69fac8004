"""Which sparse-MQA decode kernel serves a shape: ours (``kernels.attention.SparseMQA``, Triton),
FlashMLA's sparse FP8 decode (``sgl_kernel.flash_mla``) or our CuTe DSL kernel
(``kernels.cute_sparse_mqa.CuteSparseMQA``), from measured times kept here.

``MEASURED`` is the table of docs/perf/attention.md (H100 SXM, 2026-11-22,
``scripts/bench_attention.py``, CUDA-graph replays, same FP8 caches for both): per (kind, heads,
batch, keys per query) the microseconds of ours and FlashMLA's. :func:`pick` takes the nearest
measured row (same kind and heads; batch and keys compared on a log scale) and returns the
faster kernel. FlashMLA only runs where it can: FP8 rows, 64 or 128 query heads, head dim 512,
a CUDA device with sgl_kernel's FlashMLA (sm90); everywhere else ours serves. On the measured
shapes FlashMLA is faster (ours 0.34x-0.72x), so today ours serves the shapes FlashMLA lacks;
re-measure (``scripts/bench_attention.py --pages ours``) and update the table when ours improves.

``CUTE_MEASURED`` holds the CuTe kernel's microseconds for rows of ``MEASURED`` (same key, same
run of ``scripts/bench_attention.py --cute``). The CuTe kernel is a candidate only where the
nearest ``MEASURED`` row has a CuTe time and that time is the smallest: with no measured rows (as
now, 2026-12-06: it has not run on a GPU yet) it is never picked.
"""

import math

__all__ = ["CUTE", "CUTE_MEASURED", "FLASHMLA", "MEASURED", "OURS", "flashmla_eligible", "pick"]

OURS, FLASHMLA, CUTE = "ours", "flashmla", "cute"

# (kind, heads, batch, keys per query, ours us, FlashMLA us); kind "csa" = window + c4 top-k,
# "hca" = window + every c128 entry. SWA-only layers use the "hca" rows with the fewest keys.
MEASURED: tuple[tuple[str, int, int, int, float, float], ...] = (
    ("csa", 64, 1, 640, 19.7, 12.7),
    ("csa", 64, 32, 640, 48.4, 25.1),
    ("csa", 64, 128, 640, 111.9, 47.2),
    ("csa", 128, 1, 1152, 21.0, 14.2),
    ("csa", 128, 32, 1152, 88.2, 47.5),
    ("csa", 128, 128, 1152, 314.0, 105.4),
    ("hca", 64, 1, 160, 16.8, 10.6),
    ("hca", 64, 1, 384, 18.4, 11.9),
    ("hca", 64, 1, 1152, 21.2, 14.5),
    ("hca", 64, 1, 8320, 40.9, 29.0),
    ("hca", 64, 32, 160, 22.3, 16.1),
    ("hca", 64, 32, 384, 31.5, 20.8),
    ("hca", 64, 32, 1152, 61.7, 34.7),
    ("hca", 64, 128, 160, 44.1, 18.2),
    ("hca", 64, 128, 384, 73.1, 30.7),
    ("hca", 64, 128, 1152, 179.2, 72.5),
    ("hca", 128, 1, 160, 16.8, 10.0),
    ("hca", 128, 1, 1152, 21.1, 14.1),
    ("hca", 128, 1, 8320, 44.0, 26.3),
    ("hca", 128, 32, 160, 31.2, 14.0),
    ("hca", 128, 32, 1152, 87.0, 46.7),
    ("hca", 128, 128, 160, 79.5, 29.9),
    ("hca", 128, 128, 1152, 309.2, 103.8),
)

# (kind, heads, batch, keys per query, CuTe us): rows of MEASURED's runs. None measured yet.
CUTE_MEASURED: tuple[tuple[str, int, int, int, float], ...] = ()


def flashmla_eligible(fp8_rows: bool, heads: int, head_dim: int, device) -> bool:
    """FlashMLA's sparse decode runs FP8 rows, 64 / 128 heads of 512 on sm90 only."""
    import torch

    dev = torch.device(device)
    if not (fp8_rows and heads in (64, 128) and head_dim == 512 and dev.type == "cuda"):
        return False
    return torch.cuda.get_device_capability(dev)[0] == 9


def pick(kind, heads: int, batch: int, keys: int, eligible: bool, cute: bool = False) -> str:
    """The fastest kernel for this shape (``kind`` an ``AttnKind`` or "csa" / "hca" / "swa").
    ``eligible``: FlashMLA can run; ``cute``: the CuTe kernel can run (``cute_eligible``)."""
    if not (eligible or cute):
        return OURS
    kind = getattr(kind, "name", kind).lower()
    kind = "hca" if kind == "swa" else kind
    rows = [r for r in MEASURED if r[0] == kind and r[1] == heads]
    if not rows:
        return OURS

    def distance(r) -> float:
        return abs(math.log(max(batch, 1) / r[2])) + abs(math.log(max(keys, 1) / r[3]))

    nearest = min(rows, key=distance)
    key, ours, flashmla = nearest[:4], nearest[4], nearest[5]
    times = {OURS: ours}
    if eligible:
        times[FLASHMLA] = flashmla
    for r in CUTE_MEASURED if cute else ():
        if r[:4] == key:
            times[CUTE] = r[4]
    return min(times, key=times.get)  # ties: the first inserted (ours)
