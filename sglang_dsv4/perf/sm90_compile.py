"""Offline compile of Triton kernels for Hopper (sm_90) on a machine without a GPU.

The interpreter (the CPU tests) does not lower kernels, so compiling each launched variant with
the real compiler catches what only it sees (layouts, unsupported ops, a name rebound to another
constexpr shape, register spills) before device time is spent. The variant lists live in
``scripts/compile_{ops,moe,decode,extend}_sm90.py`` (one command: ``scripts/compile_sm90.py``);
this module holds what they share.

Triton picks the interpreter when a kernel is *decorated* (``TRITON_INTERPRET=1``, which
``tests/conftest.py`` sets without CUDA), so a script drops that variable
(``os.environ.pop("TRITON_INTERPRET", None)``) before it imports the kernel modules. Importing
this module needs triton, not a GPU.
The target says warp size 128; the register counts matched a warp-size-32 target in a check on
2026-12-06.
"""

import os
import re
import subprocess
import tempfile
from collections.abc import Iterable

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 128)
USAGE = re.compile(r"REG:\d+ STACK:\d+ SHARED:\d+ LOCAL:\d+")


def signature(arg_names: list[str], types: dict, constexprs: dict) -> tuple[dict, dict]:
    """Triton's ``signature`` / ``constexprs`` for arguments ``arg_names``: typed by ``types``
    (default ``i32``), ``constexprs`` fixed (keyed by the argument's index path)."""
    sig = {a: "constexpr" if a in constexprs else types.get(a, "i32") for a in arg_names}
    return sig, {(arg_names.index(a),): v for a, v in constexprs.items()}


def build(fn, types: dict, constexprs: dict, num_warps: int = 4, *, aligned: bool = True,
          num_stages: int = 3, divisible: tuple[str, ...] = ()):  # fmt: skip
    """Compile ``fn`` for :data:`TARGET` and return the compiled kernel (``num_stages``: as a
    launch passes it; 3 is Triton's default).

    ``aligned``: pointers 16-byte aligned, as the launcher specializes torch's allocations (vector
    loads); the decode / extend scripts compile without that hint. ``divisible``: integer
    arguments a launch passes as multiples of 16 (strides, dims), which the launcher specializes
    too: without the hint a gather's rows look unaligned and the K loop is neither vectorized
    nor software-pipelined (no cp.async), unlike the launched kernel."""
    sig, ce = signature(fn.arg_names, types, constexprs)
    hinted = [a for a, t in sig.items() if ("*" in t and aligned) or a in divisible]
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in hinted}
    src = ASTSource(fn=fn, signature=sig, constexprs=ce, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(src, target=TARGET, options=options)


def resource_usage(kernel) -> str:
    """``REG:n STACK:n SHARED:n LOCAL:n`` of a compiled kernel, from ``cuobjdump -res-usage``."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True)
    return " ".join(USAGE.findall(usage.stdout))


_SASS_LINE = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(\S.*)$")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"BRA (?:!?U?P\d, )?`\((\.L_x_\d+)\)")


def sass_loops(kernel) -> list[int]:
    """SASS instructions in the body of each loop of a compiled kernel (a backward branch and
    the code from its target up to it), in program order: what one trip issues per warp."""
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True).stdout
    labels, counted, loops = {}, 0, []
    for line in sass.splitlines():
        if m := _LABEL.match(line):
            labels[m[1]] = counted
        elif _SASS_LINE.match(line):
            counted += 1
            if (m := _BRANCH.search(line)) and m[1] in labels and counted - labels[m[1]] > 1:
                loops.append(counted - labels[m[1]])
    return loops


_LAYOUT = re.compile(r"^(#[\w.]+) = (#ttg\.\w+<.*>)$", re.M)
_REDUCE = re.compile(r"\"?tt\.reduce\"?\(%[\w#]+\).*?\(tensor<[^>]*?, (#[\w.]+)>\)", re.S)


def reduce_layouts(kernel) -> list[str]:
    """The register layout (``#ttg.blocked<...>`` text) of each ``tt.reduce``'s operand in a
    compiled kernel's TTGIR, in program order: the order of a ``tl.sum``'s adds follows it."""
    ttgir = kernel.asm["ttgir"]
    layouts = dict(_LAYOUT.findall(ttgir))
    return [layouts.get(name, name) for name in _REDUCE.findall(ttgir)]


def axis_split(layout: str, axis: int) -> tuple[int, int, int]:
    """(elements per thread, lanes, warps) of a ``#ttg.blocked`` layout along ``axis``: what
    sets the order of a reduction over that axis (the other axes only replicate it)."""
    fields = ("sizePerThread", "threadsPerWarp", "warpsPerCTA")
    lists = (re.search(rf"{f} = \[([\d, ]+)\]", layout)[1].split(",") for f in fields)
    return tuple(int(v[axis]) for v in lists)


def check_all(variants: Iterable[tuple], *, tail: int = 400, aligned: bool = False) -> int:
    """Compile every ``(name, fn, types, constexprs, num_warps)``, printing ``ok`` / ``FAILED``
    (the last ``tail`` characters of the error) for each; returns the number that failed."""
    failed = 0
    for name, fn, types, ce, warps in variants:
        try:
            build(fn, types, ce, warps, aligned=aligned)
            print(f"ok     {name}", flush=True)
        except Exception as e:  # report every variant, then fail
            failed += 1
            print(f"FAILED {name}: {type(e).__name__}: {str(e)[-tail:]}", flush=True)
    return failed
