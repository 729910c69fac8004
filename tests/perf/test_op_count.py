"""``perf.op_count``: aten ops sorted into device ops and views / allocations, Triton launches
counted by kernel name (the interpreter's own torch ops inside a launch not counted), ``dry``
launches counted without running; the launchers restored after the count."""

import torch

from sglang_dsv4.kernels.slot_sum import slot_sum
from sglang_dsv4.perf import op_count


def test_counts_device_ops_views_and_triton_launches():
    y, out = torch.randn(6, 8), torch.full((2, 8), float("nan"))

    def step():
        slot_sum(y, out)
        return y[:, :2] + 1, torch.empty(3).view(3, 1)

    counts, (res, _) = op_count.count_ops(step)
    assert counts.triton == {"_slot_sum_kernel": 1}
    assert counts.device == {"add": 1}
    assert counts.views == {"slice": 1, "empty": 1, "view": 1}
    assert (counts.kernels, counts.torch_ops) == (2, 4)
    assert torch.equal(out, y.view(2, 3, 8).sum(dim=1)) and torch.equal(res, y[:, :2] + 1)
    assert counts.summary()["triton_names"] == {"_slot_sum_kernel": 1}


def test_dry_counts_launches_without_running_them():
    y, out = torch.randn(6, 8), torch.full((2, 8), float("nan"))
    counts, _ = op_count.count_ops(lambda: (slot_sum(y, out), slot_sum(y, out)), dry=True)
    assert counts.triton == {"_slot_sum_kernel": 2} and counts.kernels == 2
    assert out.isnan().all()  # nothing ran
    slot_sum(y, out)  # the launcher is restored: this one runs
    assert not out.isnan().any()
