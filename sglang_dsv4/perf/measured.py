"""The measured-time tables of the kernel choices (``attention.extend_choice.MEASURED``), written
from a benchmark's JSON instead of by hand.

``scripts/bench_extend.py`` writes ``bench_extend.json`` with a ``measured`` list, one row per
(kind, heads, new tokens, keys per query): ours and FlashMLA's ms. :func:`paste` merges such rows
into the ``MEASURED`` assignment of a module's source (a row of the same shape is replaced, the
others kept, sorted), found with ``ast`` so comments around it stay.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

__all__ = ["extend_rows", "merge", "paste", "render"]

Row = tuple  # (kind, heads, tokens, keys, ours ms, FlashMLA ms)


def extend_rows(bench: dict, heads: int) -> list[Row]:
    """The MEASURED rows of one ``bench_extend.json`` result (rows timed both ways)."""
    out = []
    for r in bench.get("rows", []):
        if "flashmla_attend_s" not in r or "ours_attend_s" not in r:
            continue
        out.append(
            (
                r["kind"].lower(),
                heads,
                int(r["tokens"]),
                int(r["keys"]),
                round(1e3 * r["ours_attend_s"], 3),
                round(1e3 * r["flashmla_attend_s"], 3),
            )
        )
    return out


def merge(old: list[Row], new: list[Row]) -> list[Row]:
    """``old`` with every shape of ``new`` replaced or added, sorted by shape."""
    rows = {r[:4]: tuple(r) for r in old}
    rows |= {r[:4]: tuple(r) for r in new}
    return [rows[k] for k in sorted(rows)]


def render(name: str, rows: list[Row], note: str = "") -> str:
    """The assignment's source: ``NAME: tuple[...] = (rows)``."""
    head = f"{name}: tuple[tuple[str, int, int, int, float, float], ...] = ("
    if not rows:
        return head + ")\n"
    lines = [head] + ([f"    # {note}"] if note else [])
    lines += [f"    ({', '.join(json.dumps(v) for v in r)})," for r in rows]  # ruff's quotes
    return "\n".join(lines) + "\n)\n"


def _assignment(tree: ast.Module, name: str):
    for node in tree.body:
        target = getattr(node, "target", None) or (getattr(node, "targets", None) or [None])[0]
        if isinstance(target, ast.Name) and target.id == name:
            return node
    raise ValueError(f"no top-level assignment of {name} in the module")


def paste(path: str | Path, rows: list[Row], name: str = "MEASURED", note: str = "") -> str:
    """Merge ``rows`` into ``name`` in the module at ``path`` (rewritten in place); returns the
    new assignment's source."""
    path = Path(path)
    src = path.read_text()
    node = _assignment(ast.parse(src), name)
    old = [tuple(r) for r in ast.literal_eval(node.value)]
    text = render(name, merge(old, rows), note)
    lines = src.splitlines(keepends=True)
    path.write_text("".join(lines[: node.lineno - 1]) + text + "".join(lines[node.end_lineno :]))
    return text


def load(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
