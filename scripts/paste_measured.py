"""Paste the measured extend attention times of ``bench_extend.py`` into the choice table.

    python scripts/paste_measured.py OUT/bench_extend.json [more.json ...]
        [--module sglang_dsv4/attention/extend_choice.py]

Rows of the same (kind, heads, tokens, keys) are replaced, others kept; the assignment is found
with ``ast`` and rewritten in place (``sglang_dsv4.perf.measured.paste``); prints the new table.
Run ``ruff format`` and the choice tests after it.
"""

import argparse
from pathlib import Path

from sglang_dsv4.config import load_config
from sglang_dsv4.perf.measured import extend_rows, load, paste

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("json", nargs="+", type=Path, help="bench_extend.json files")
    ap.add_argument("--module", type=Path, default=ROOT / "sglang_dsv4/attention/extend_choice.py")
    ap.add_argument("--config", type=Path, default=ROOT / "configs/dsv4-flash-dims.json")
    args = ap.parse_args()
    heads = load_config(args.config).num_heads
    rows, notes = [], []
    for path in args.json:
        bench = load(path)
        rows += extend_rows(bench, heads)
        notes.append(f"{bench.get('date')}, {bench.get('device')}, {bench.get('pool_rows')} rows")
    if not rows:
        raise SystemExit(
            "no row timed both ways (ours and FlashMLA) in " + ", ".join(map(str, args.json))
        )
    note = "; ".join(sorted(set(notes))) + ": scripts/bench_extend.py"
    print(paste(args.module, rows, note=note))


if __name__ == "__main__":
    main()
