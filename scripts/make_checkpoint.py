"""Write a small random DSV4 in two checkpoint formats holding the same model.

    python scripts/make_checkpoint.py configs/tiny-6l.json /tmp/tiny \
        [--seed 0] [--expert-dtype fp4|fp8] [--shard-mb 2] [--tokenizer]

gives ``/tmp/tiny/hf`` (HF transformers names, fp32) and ``/tmp/tiny/released`` (the released
DeepSeek-V4 format: FP8 e4m3 linears with 128x128 UE8M0 ``.scale`` tensors, MXFP4 routed experts,
BF16 / FP32 / I64 specials, ``mtp.0.*``, ``quantization_config`` + ``expert_dtype`` in
config.json, sharded with ``model.safetensors.index.json``). The weights are rounded onto the
released grid first, so both load to identical fp32 tensors (see sglang_dsv4/weights/make.py).
Serve either with ``python -m sglang.launch_server --model-path /tmp/tiny/released``.
"""

import argparse
import json
import time
from pathlib import Path

from sglang_dsv4.weights.make import make_checkpoints


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", type=Path, help="model config.json (e.g. configs/tiny-6l.json)")
    ap.add_argument("out", type=Path, help="output directory (gets hf/ and released/)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--expert-dtype", choices=("fp4", "fp8"), default="fp4")
    ap.add_argument("--shard-mb", type=float, default=5 * 1024, help="max shard size in MiB")
    ap.add_argument(
        "--tokenizer", action="store_true", help="copy the DSV4 tokenizer (vocab 129280)"
    )
    args = ap.parse_args()
    config = json.loads(args.config.read_text())
    t0 = time.perf_counter()
    dirs = make_checkpoints(
        config,
        args.out,
        seed=args.seed,
        expert_dtype=args.expert_dtype,
        shard_bytes=int(args.shard_mb * (1 << 20)),
        tokenizer=args.tokenizer,
    )
    for d in dirs:
        files = sorted(d.glob("*.safetensors"))
        size = sum(f.stat().st_size for f in files)
        print(f"{d}: {len(files)} shard(s), {size / (1 << 20):.1f} MiB")
    print(f"done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
