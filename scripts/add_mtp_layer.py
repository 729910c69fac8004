"""Release a trained MTP layer into a checkpoint whose main weights must not change.

    python scripts/add_mtp_layer.py TRAINED RELEASED
        # e.g. TRAINED = train_tiny.py --mtp-only --out, RELEASED = sglang_dsv4/models/dsv4-tiny

Checks that every main tensor of ``TRAINED`` (all but ``mtp.*``) equals ``RELEASED``'s bit for
bit (same names, dtypes, shapes, bytes: ``--mtp-only`` training must leave them untouched), then
writes ``TRAINED``'s ``mtp.*`` tensors into ``RELEASED`` as one more shard: the existing shard
files keep their bytes and are renamed ``model-0000i-of-0000n`` for the new count (HF's sharded
layout), ``model.safetensors.index.json`` maps the new tensors; an older MTP shard is replaced.
``config.json`` and the tokenizer files must already be identical.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def read_tensors(ckpt: Path) -> dict:
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out |= {name: st.get_tensor(name) for name in st.keys()}  # noqa: SIM118
    return out


def _bytes(t):
    return t.reshape(-1).contiguous().view(torch.uint8)  # bit-exact: -0.0 != 0.0, NaN == NaN


def check_main_identical(trained: dict, released: dict) -> int:
    """Raise unless the non-MTP tensors agree bit for bit; returns how many were compared."""
    main = {k for k in trained if not k.startswith("mtp.")}
    old = {k for k in released if not k.startswith("mtp.")}
    if main != old:
        raise SystemExit(f"main tensor names differ: {sorted(main ^ old)[:10]}")
    for name in sorted(main):
        a, b = trained[name], released[name]
        if a.dtype != b.dtype or a.shape != b.shape or not _bytes(a).equal(_bytes(b)):
            raise SystemExit(f"main tensor {name} changed ({a.dtype} {tuple(a.shape)})")
    return len(main)


def release(trained_dir: Path, out: Path) -> dict:
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if not filecmp.cmp(trained_dir / name, out / name, shallow=False):
            raise SystemExit(f"{name} differs between {trained_dir} and {out}")
    trained, released = read_tensors(trained_dir), read_tensors(out)
    n_main = check_main_identical(trained, released)
    mtp = {k: v.contiguous() for k, v in trained.items() if k.startswith("mtp.")}
    if not mtp:
        raise SystemExit(f"{trained_dir} has no mtp.* tensors")
    index_path = out / "model.safetensors.index.json"
    weight_map = json.loads(index_path.read_text())["weight_map"]
    main_files = sorted({f for k, f in weight_map.items() if not k.startswith("mtp.")})
    n = len(main_files) + 1
    renamed = {f: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, f in enumerate(main_files)}
    for f in {f for k, f in weight_map.items() if k.startswith("mtp.")} - set(main_files):
        (out / f).unlink()  # an older MTP shard
    for old, new in renamed.items():
        (out / old).rename(out / new)
    mtp_file = f"model-{n:05d}-of-{n:05d}.safetensors"
    save_file(mtp, out / mtp_file, metadata={"format": "pt"})
    new_map = {k: renamed[f] for k, f in weight_map.items() if not k.startswith("mtp.")}
    new_map |= dict.fromkeys(mtp, mtp_file)
    main = {k: v for k, v in released.items() if not k.startswith("mtp.")}
    total = sum(t.numel() * t.element_size() for t in (main | mtp).values())
    index = {"metadata": {"total_size": total}, "weight_map": new_map}
    index_path.write_text(json.dumps(index, indent=1) + "\n")
    after = read_tensors(out)
    check_main_identical(after, released)
    if any(not _bytes(after[k]).equal(_bytes(v)) for k, v in mtp.items()):
        raise SystemExit("the written MTP tensors do not read back")
    return {"main_tensors_identical": n_main, "mtp_tensors": len(mtp), "shards": n}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("trained", type=Path)
    ap.add_argument("released", type=Path)
    args = ap.parse_args()
    print(json.dumps(release(args.trained, args.released)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
