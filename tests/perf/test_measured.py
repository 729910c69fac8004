"""``perf.measured``: bench_extend JSON rows -> the MEASURED table of extend_choice, pasted into
a copy of the real module (comments kept, same shapes replaced, idempotent)."""

import ast
import shutil
from pathlib import Path

import pytest

from sglang_dsv4.attention import extend_choice
from sglang_dsv4.perf.measured import extend_rows, merge, paste, render

BENCH = {
    "rows": [
        {"kind": "CSA", "tokens": 8192, "keys": 640, "ours_attend_s": 2e-3,
         "flashmla_attend_s": 1.5e-3},
        {"kind": "SWA", "tokens": 4096, "keys": 128, "ours_attend_s": 4e-4,
         "flashmla_attend_s": 5e-4},
        {"kind": "HCA", "tokens": 4096, "run_s": 1e-3},  # not timed both ways: no row
    ]
}  # fmt: skip


def _table(path: Path) -> list[tuple]:
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if getattr(getattr(n, "target", None), "id", "") == "MEASURED")
    return [tuple(r) for r in ast.literal_eval(node.value)]


def test_rows_from_bench():
    rows = extend_rows(BENCH, heads=64)
    assert rows == [("csa", 64, 8192, 640, 2.0, 1.5), ("swa", 64, 4096, 128, 0.4, 0.5)]


def test_merge_replaces_same_shape():
    old = [("csa", 64, 8192, 640, 9.0, 9.0), ("hca", 64, 4096, 160, 1.0, 2.0)]
    new = [("csa", 64, 8192, 640, 2.0, 1.5)]
    assert merge(old, new) == [("csa", 64, 8192, 640, 2.0, 1.5), ("hca", 64, 4096, 160, 1.0, 2.0)]
    assert render("M", []) == "M: tuple[tuple[str, int, int, int, float, float], ...] = ()\n"


def test_paste_into_module_copy(tmp_path):
    path = tmp_path / "extend_choice.py"
    shutil.copy(extend_choice.__file__, path)
    before = path.read_text()
    table = _table(path)  # the module's measured rows: the paste merges into them
    rows = extend_rows(BENCH, heads=64)
    paste(path, rows, note="test run")
    after = path.read_text()
    assert _table(path) == merge(table, rows) and set(rows) <= set(_table(path))
    assert len(_table(path)) == len({r[:4] for r in table} | {r[:4] for r in rows})
    assert "# test run" in after
    # everything outside the assignment is unchanged
    head = before[: before.index("MEASURED: tuple")]
    assert after.startswith(head)
    assert after.endswith(before[before.index("_ALIGN = 128") :])
    compile(after, str(path), "exec")
    # a second paste with a new time for one shape replaces it, keeps the other
    paste(path, [("csa", 64, 8192, 640, 1.0, 3.0)])
    want = [r for r in merge(table, rows) if r[:4] != ("csa", 64, 8192, 640)]
    assert _table(path) == merge(want, [("csa", 64, 8192, 640, 1.0, 3.0)])
    final = _table(path)
    assert ("csa", 64, 8192, 640, 1.0, 3.0) in final and ("swa", 64, 4096, 128, 0.4, 0.5) in final
    assert ("csa", 64, 8192, 640, 2.0, 1.5) not in final
    with pytest.raises(ValueError, match="no top-level assignment"):
        paste(path, rows, name="NOT_THERE")
