"""scripts/count_csa_extend.py at the tiny model's dims (300 new tokens, FP8 rows and keys): one
CSA layer's extend ``run()`` with FlashMLA serving launches the KV store, the two compressor
flushes, the indexer's logits and select (which writes the picks into FlashMLA's index lists),
one workspace gather and FlashMLA, and no torch op but the indexer's query rotation
(``extend_ops._rotated``: a GEMM and the weights' scale). Main's path had two dequant launches
and five ops (``ge``, ``add``, ``where`` + its scalar, a strided copy) between the top-k and
FlashMLA per layer."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import count_csa_extend

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny-6l.json"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_flashmla_csa_run_launches():
    rows = count_csa_extend.measure(300, 0, "flashmla", TINY)
    run = rows["run"]
    kernels = dict(run["triton_kernels"])
    select = [k for k in ("_topk_kernel", "_rows_topk_kernel") if k in kernels]
    assert len(select) == 1 and kernels.pop(select[0]) == 1
    assert kernels == {"_kv_store_kernel": 1, "_flush_kernel": 2, "_tile_logits_kernel": 1,
                       "_gather_rows_kernel": 1}  # fmt: skip
    assert run["flashmla"] == 1
    # the indexer's query rotation: one bmm (its Dh^-1/2 is the logits kernel's w_scale)
    assert set(run["aten_ops"]) <= {"bmm"}, run["aten_ops"]
    attend = rows["attend"]
    assert attend["triton_kernels"] == {"_gather_rows_kernel": 1} and attend["aten"] == 0
    assert attend["flashmla"] == 1
    # the per-op closures add up to the run
    assert sum(r["triton"] for k, r in rows.items() if k != "run") == run["triton"]
