"""Compile the Triton kernels for Hopper (sm_90) on a machine without a GPU: one family or all.

    PYTHONPATH=$PWD python scripts/compile_sm90.py --family all     # or ops | moe | decode | extend

Each family is the variant list of ``scripts/compile_<family>_sm90.py`` (which still run alone,
with the same output); ``ops`` and ``moe`` print registers / spills, ``decode`` and ``extend``
``ok`` / ``FAILED`` per variant. Exits 1 when a variant failed. Machinery and why:
``sglang_dsv4/perf/sm90_compile.py``.
"""

import argparse
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compiled jit functions
sys.path.insert(0, str(Path(__file__).resolve().parent))

import compile_decode_sm90
import compile_extend_sm90
import compile_moe_sm90
import compile_ops_sm90

FAMILIES = {
    "ops": compile_ops_sm90.main,
    "moe": compile_moe_sm90.main,
    "decode": compile_decode_sm90.main,
    "extend": compile_extend_sm90.main,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", choices=[*FAMILIES, "all"], default="all")
    args = ap.parse_args()
    names = list(FAMILIES) if args.family == "all" else [args.family]
    failed = 0
    for name in names:
        if len(names) > 1:
            print(f"== {name}", flush=True)
        failed += FAMILIES[name]() or 0  # ops / moe raise on a failure instead
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
