"""Import CuTe DSL and compile a tiny kernel for sm_90a: no GPU needed (the DSL compiles to a cubin
on the host). Used by ``build_cutlass_dsl.sh VERIFY=1`` to check a trimmed tree and by
``gpu_cute.sh`` first on the device.

    CUTE_SITE=/tmp/site python scripts/cute_smoke.py     # the tree to import (default: sys.path)

Prints the cutlass version and path, the compile time and the embedded cubin's arch; exits 1
when any of it fails.
"""

import os
import struct
import sys
import time

_SITE = os.environ.get("CUTE_SITE")
if _SITE:
    # The staged tree first: a cutlass already on sys.path (the venv's) must not shadow it.
    sys.path[:] = [p for p in sys.path if "dsl_packages" not in p]
    sys.path[:0] = [os.path.join(_SITE, "nvidia_cutlass_dsl", "dsl_packages"), _SITE]
os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")

t0 = time.time()
import cutlass  # noqa: E402
import cutlass.cute as cute  # noqa: E402
from cutlass.cute.runtime import make_fake_compact_tensor  # noqa: E402

print(f"cutlass {getattr(cutlass, '__version__', '?')} from {os.path.dirname(cutlass.__file__)}")
print(f"import {time.time() - t0:.2f} s")


@cute.kernel
def _double(a: cute.Tensor, b: cute.Tensor):
    tidx, _, _ = cute.arch.thread_idx()
    bidx, _, _ = cute.arch.block_idx()
    i = bidx * 128 + tidx
    b[i] = a[i] * 2.0


@cute.jit
def _host(a: cute.Tensor, b: cute.Tensor):
    _double(a, b).launch(grid=(a.shape[0] // 128, 1, 1), block=(128, 1, 1))


def cubin_arch(obj: bytes) -> str:
    """The sm arch of the first CUDA ELF (e_machine 190) embedded in a host object."""
    at = obj.find(b"\x7fELF", 1)
    while at >= 0:
        if struct.unpack_from("<H", obj, at + 18)[0] == 190:
            flags = struct.unpack_from("<I", obj, at + 48)[0]
            sm = (flags >> 8) & 0xFF if flags & 0xFF00 else flags & 0xFF
            return f"sm_{sm}"
        at = obj.find(b"\x7fELF", at + 1)
    return "none"


def main() -> int:
    a = make_fake_compact_tensor(cutlass.Float32, (1024,))
    b = make_fake_compact_tensor(cutlass.Float32, (1024,))
    t = time.time()
    fn = cute.compile(_host, a, b)
    obj = fn.dump_to_object("smoke")
    arch = cubin_arch(obj)
    print(f"compile {time.time() - t:.2f} s, host object {len(obj)} bytes, cubin {arch}")
    return 0 if arch.startswith("sm_90") else 1


if __name__ == "__main__":
    sys.exit(main())
