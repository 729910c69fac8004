"""The mHC decode tail in SASS (sm_90, compiled on a machine without a GPU): per kernel its
registers, instructions, barriers (``BAR.SYNC``: each a shared-memory round trip of the
reductions / layout changes) and, for the one-token form, those after the ticket's atomic (the
last program's serial maps, Sinkhorn, collapse and norm); per loop its instructions, barriers
and ``MUFU`` ops (the Sinkhorn rounds: 8 reciprocals each).

    python scripts/compile_mhc_tail.py [--pro] [--sb N] [--warps N]

Flash dims (d 4096) by default, Pro (7168) with ``--pro``; bf16 streams, as at decode.
``--sb``: partial rows per step of the one-token form's tail (default 128: as launched at one
token on 132 SMs, 128 splits; main launched 256). ``--warps``: of both kernels (default 8).
"""

import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compiled jit functions

import triton

from sglang_dsv4.kernels import mhc
from sglang_dsv4.perf.sm90_compile import build, resource_usage

_INSTR = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(\S.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"BRA (?:!?U?P\d, )?`\((\.L_x_\d+)\)")


def sass(kernel) -> tuple[list[str], dict[str, int]]:
    """The kernel's SASS instructions in order and the index each label points at."""
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True).stdout
    ins, labels = [], {}
    for line in text.splitlines():
        if m := _LABEL.match(line):
            labels[m[1]] = len(ins)
        elif m := _INSTR.match(line):
            ins.append(m[1])
    return ins, labels


def counts(ins: list[str]) -> str:
    n = {k: sum(k in i for i in ins) for k in ("BAR.SYNC", "MUFU", "SHFL", "STS", "LDS")}
    return f"{len(ins)} instr, " + ", ".join(f"{v} {k}" for k, v in n.items())


def report(name: str, fn, types: dict, constexprs: dict, warps: int) -> None:
    # constexprs the kernel lacks are dropped: the same command compiles an older checkout
    kernel = build(fn, types, {k: v for k, v in constexprs.items() if k in fn.arg_names}, warps)
    ins, labels = sass(kernel)
    print(f"{name}: {resource_usage(kernel)}; {counts(ins)}")
    atom = next((k for k, i in enumerate(ins) if "ATOMG" in i), None)
    if atom is not None:
        print(f"  after the ticket's atomic: {counts(ins[atom:])}")
    for k, i in enumerate(ins):
        if (m := _BRANCH.search(i)) and labels.get(m[1], k) < k:
            print(f"  loop at {labels[m[1]]}: {counts(ins[labels[m[1]] : k + 1])} per trip")


def main() -> None:
    args = sys.argv[1:]
    d = 7168 if "--pro" in args else 4096
    sb = int(args[args.index("--sb") + 1]) if "--sb" in args else 128
    warps = int(args[args.index("--warps") + 1]) if "--warps" in args else 8
    bdn = triton.next_power_of_2(d)
    act = "*bf16"
    hc_types = {a: "*fp32" for a in mhc._hc_kernel.arg_names if a.endswith("_ptr")}
    hc_types |= {a: act for a in ("x_ptr", "y_ptr", "x_out_ptr", "norm_w_ptr", "h_ptr")}
    hc_types |= {"ticket_ptr": "*i32", "eps": "fp32", "hc_eps": "fp32"}
    maps_types = {a: "*fp32" for a in mhc._maps_collapse_kernel.arg_names if a.endswith("_ptr")}
    maps_types |= {"x_ptr": act, "norm_w_ptr": act, "h_ptr": act, "eps": "fp32", "hc_eps": "fp32"}
    common = {"D": d, "HC": 4, "ITERS": 20, "BDN": bdn, "X_BF16": True, "W_BF16": True}
    for head in (False, True):
        nm, nmp = (4, 8) if head else (24, 32)
        ce = common | {"NM": nm, "NMP": nmp, "LOG_NMP": nmp.bit_length() - 1, "BD": 32,
                       "SB": sb, "POST": True, "HEAD": head}  # fmt: skip
        report(f"_hc_kernel post+{'head' if head else 'pre'}", mhc._hc_kernel, hc_types, ce, warps)
    ce = common | {"NM": 24, "NMP": 32, "LOG_NMP": 5, "SB": 64, "HEAD": False}
    report("_maps_collapse_kernel pre", mhc._maps_collapse_kernel, maps_types, ce, warps)


if __name__ == "__main__":
    main()
