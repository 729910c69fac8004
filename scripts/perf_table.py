"""Side-by-side JSONs (``scripts/side_by_side.py``) -> one merged JSON and the markdown table
for docs/perf.md (runs with date, GPU and command; cells with ours / native ratios for decode
tok/s, TTFT and prefill tok/s; pool capacity per server).

    python scripts/perf_table.py /tmp/sbs/sbs_*.json [--json docs/gpu/side_by_side.json] [--md x.md]
"""

import argparse
import json
import sys
from pathlib import Path

from sglang_dsv4.perf.table import load_runs, markdown, merge


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--json", type=Path, help="write the merged record here")
    ap.add_argument("--md", type=Path, help="write the markdown table here")
    args = ap.parse_args()
    merged = merge(load_runs(args.files))
    text = markdown(merged)
    if args.json:
        args.json.write_text(json.dumps(merged, indent=2) + "\n")
    if args.md:
        args.md.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
