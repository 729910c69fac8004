"""``perf.sm90_compile``: the signature Triton is given, and one real sm_90 compile of a tiny
kernel (in a subprocess: the test process's kernels are decorated for the interpreter)."""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from sglang_dsv4.perf.sm90_compile import axis_split, signature


def test_signature_types_default_i32_and_constexprs_by_index():
    sig, ce = signature(["x_ptr", "n", "eps", "BLOCK"], {"x_ptr": "*bf16", "eps": "fp32"},
                        {"BLOCK": 128})  # fmt: skip
    assert sig == {"x_ptr": "*bf16", "n": "i32", "eps": "fp32", "BLOCK": "constexpr"}
    assert ce == {(3,): 128}


def test_axis_split_reads_one_axis_of_a_blocked_layout():
    layout = ("#ttg.blocked<{sizePerThread = [1, 8], threadsPerWarp = [2, 16], "
              "warpsPerCTA = [4, 2], order = [1, 0]}>")  # fmt: skip
    assert axis_split(layout, 1) == (8, 16, 2)
    assert axis_split(layout, 0) == (1, 2, 4)


KERNEL = textwrap.dedent("""
    import os
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    import triton.language as tl
    from sglang_dsv4.perf.sm90_compile import build, resource_usage, sass_loops

    @triton.jit
    def _scale(x_ptr, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n) * 2, mask=i < n)

    @triton.jit
    def _sum_rows(x_ptr, n, BLOCK: tl.constexpr):
        acc = tl.zeros([BLOCK], tl.float32)
        for i in range(0, n, BLOCK):
            acc += tl.load(x_ptr + i + tl.arange(0, BLOCK))
        tl.store(x_ptr + tl.arange(0, BLOCK), acc)

    print(resource_usage(build(_scale, {"x_ptr": "*fp32"}, {"BLOCK": 128})))
    print(build(_scale, {"x_ptr": "*fp32"}, {"BLOCK": 64}, aligned=False).name)
    print(sass_loops(build(_scale, {"x_ptr": "*fp32"}, {"BLOCK": 128})))
    print(sass_loops(build(_sum_rows, {"x_ptr": "*fp32"}, {"BLOCK": 128})))
""")


def test_build_compiles_for_sm90_and_reports_registers(tmp_path):
    script = tmp_path / "kernel.py"  # triton.jit needs the source in a file
    script.write_text(KERNEL)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    usage, name, no_loop, one_loop = out.stdout.split("\n")[:4]
    assert usage.startswith("REG:") and "LOCAL:0" in usage, usage
    assert name == "_scale"
    assert no_loop == "[]"  # sass_loops: no backward branch
    trips = ast.literal_eval(one_loop)
    assert len(trips) == 1 and 3 <= trips[0] <= 60, one_loop  # a load, an add, the branch


PLAN_KERNELS = textwrap.dedent("""
    import os, sys
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, "scripts")
    import compile_decode_sm90, compile_extend_sm90
    from sglang_dsv4.perf.sm90_compile import check_all
    variants = (*compile_extend_sm90.plan_variants(), *compile_decode_sm90.alloc_variants())
    raise SystemExit(check_all(variants, tail=1500))
""")


def test_plan_and_allocation_kernels_compile_for_sm90(tmp_path):
    """The extend plan's kernels (``extend_meta``, ``flashmla_lists``) and the decode
    allocation's (``alloc_decode``) lower to sm_90 in every launched variant: the interpreter
    the other CPU tests run them under accepts what the compiler may not."""
    script = tmp_path / "plan_kernels.py"
    script.write_text(PLAN_KERNELS)
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                         cwd=root)  # fmt: skip
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    oks = [line for line in out.stdout.splitlines() if line.startswith("ok ")]
    assert len(oks) == 13, out.stdout
